"""Hyper-SD at Stable Diffusion scale (course_lib.scale.hypersd) on the shipped mini Stable Diffusion, offline: the
stages tscd-8 -> 4 -> 2 -> 1, each from the previous stage's LoRA, the method step equal to notebook 11's TSCD loss
with the guided, adapter-disabled teacher, the reward stage's gradient through the VAE decoder, the final LoRA in
plain diffusers with TCDScheduler at 1 and 4 steps (and its kohya keys), a killed stage that resumes to exactly the
weights of an uninterrupted one, a two-process run, and the clear errors that overwrite nothing: a LoRA for another
base model, a missing stage output, a reward model that cannot be loaded, a rerun with other settings."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from course_lib import minisd
from course_lib import sd as sdlib
from course_lib.distill import hypersd as method
from course_lib.distill import tcd
from course_lib.distill.consistency import draw_times
from course_lib.guidance import cfg as guided
from course_lib.scale import export, hypersd, methods, rewards
from course_lib.scale.common import SourceError
from course_lib.train import TRAINER_WEIGHTS, StepContext
from conftest import save_nudged_mini_sd
from killed_stage import assert_same_checkpoint, kill_midway
from pair_shards import shards
from scale_ddp_run import launch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
PROMPTS = ["a red handwritten seven", "a thick three"]
STEPS = 6
TSCD = ("tscd-8", "tscd-4", "tscd-2", "tscd-1")


def _args(stage: str, out: Path, *source: str, steps: int = STEPS, extra: tuple[str, ...] = (),
          teacher: Path = minisd.MINI_SD) -> list[str]:
    return ["--stage", stage, "--teacher", str(teacher), *source, "--out", str(out), "--steps", str(steps),
            "--batch-size", "2", "--lora", "4", "--lora-alpha", "4", "--w", "3.0", "--lr", "5e-3", "--warmup", "0",
            "--ckpt-every", "1", "--precision", "bf16", "--grad-checkpointing", "--intervals", "8", "--resolution",
            "16", "--cache-dtype", "float32", "--device", "cpu", "--no-progress", *extra]


def _snapshot(folder: Path) -> dict:
    """Every file under folder with its content hash: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The four TSCD stages on image-caption pairs, and another base model (the mini SD with its UNet nudged)."""
    root = tmp_path_factory.mktemp("scale-hypersd")
    tar = shards(root / "pairs.tar")
    done = {s: hypersd.main(_args(s, root / "run", "--data", str(tar))) for s in TSCD}
    save_nudged_mini_sd(root / "other")
    return {"root": root, "tar": tar, "done": done, "run": root / "run"}


def test_the_stages_chain_each_from_the_previous_lora_and_train_only_the_adapter(work):
    run = work["run"]
    previous = None
    for stage in TSCD:
        k = hypersd.segments_of(stage)
        done = work["done"][stage]
        assert done.step == STEPS and all(l == l for l in done.losses["student"])
        saved = load_file(str(run / stage / "checkpoint" / TRAINER_WEIGHTS))
        trained = {k_: v for k_, v in saved.items() if k_.startswith("net.")}
        assert trained and all("lora" in k_ for k_ in trained)                 # only the adapter is checkpointed
        meta = json.loads((run / stage / "lora" / hypersd.META).read_text())
        assert meta["stage"] == stage and meta["k"] == k and meta["steps"] == STEPS
        # the grid: SD timesteps 0, 124, ..., 999 (--intervals 8); the k segments' edges are the k-step sampler's
        grid = torch.tensor(meta["grid_timesteps"])
        assert grid.tolist() == [0] + [125 * i - 1 for i in range(1, 9)]
        edges = method.segment_edges(k, grid=grid)
        assert edges[1:].tolist() == sorted(tcd.tcd_timesteps(k, original_steps=8).tolist())   # TCDScheduler's
        lora = load_file(str(run / stage / "lora" / sdlib.LORA_WEIGHTS))
        if previous is None:
            assert meta["init"] is None
        else:                       # initialised from the previous stage's file, and moved away from it
            digest = hypersd.file_digest(run / previous / "lora" / sdlib.LORA_WEIGHTS)
            assert meta["init"] == digest
            before = load_file(str(run / previous / "lora" / sdlib.LORA_WEIGHTS))
            assert lora.keys() == before.keys()
            assert max(float((lora[n] - before[n]).abs().max()) for n in lora) > 1e-4
        previous = stage


def test_the_method_step_is_notebook_11s_tscd_loss_with_the_guided_adapter_disabled_teacher(work):
    """methods.hypersd_step on a LoRA student equals distill.hypersd.tscd_loss_at computed by hand with the same
    draws: teacher = the UNet with its adapter off, guided with w; target = the online student; s = segment_start."""
    sd = minisd.load_mini_sd()
    sdlib.load_lora(sd.model, work["run"] / "tscd-4" / "lora")          # a LoRA that changes the UNet
    model, w, k = sd.model, 3.0, 2
    grid = methods.tscd_grid(model.process, 8)
    step = methods.hypersd_step(model, k, grid, w)
    emb_batches = hypersd.batches(_embeddings(work))
    batch = emb_batches(2, torch.Generator().manual_seed(0))
    ctx = StepContext("student", 0, torch.Generator().manual_seed(1), {"student": model})
    with torch.no_grad():
        got = step(ctx, batch)
        g = torch.Generator().manual_seed(1)
        x0, cond = batch["x"], batch["cond"]
        t_cur, t_next = draw_times(grid, 2, g, None, x0.device, x0.dtype)
        s = method.segment_start(t_next, k, grid=grid)
        eps = torch.randn(x0.shape, generator=g).to(x0)
        teacher = guided(sdlib.AdapterOff(model), w)
        want = method.tscd_loss_at(model, model, teacher, x0, eps, t_next, t_cur, s, model.process, cond=cond)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert bool((s < t_next).all()) and set(s.tolist()) <= set(method.segment_edges(k, grid=grid).float().tolist())
    # the teacher really is the base model guided with w: with the adapter on (a wrong teacher) the loss differs
    with torch.no_grad():
        wrong = method.tscd_loss_at(model, model, guided(model, w), x0, eps, t_next, t_cur, s, model.process,
                                    cond=cond)
    assert float((wrong - want).abs().max()) > 1e-6


def _embeddings(work):
    from course_lib.scale.data import Embeddings

    return Embeddings(work["run"] / "embeddings")


def _pipe(lora):
    from diffusers import StableDiffusionPipeline, TCDScheduler

    pipe = StableDiffusionPipeline.from_pretrained(minisd.MINI_SD, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora))                        # plain diffusers
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps=8)   # = --intervals
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, z1, n, seed=7):
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=n, guidance_scale=1.0, eta=1.0, latents=z1.clone(),
                    generator=torch.Generator().manual_seed(seed), output_type="latent").images


def test_the_final_lora_samples_in_plain_diffusers_with_tcd_at_1_and_4_steps(work):
    folder = work["run"] / "tscd-1" / "lora"
    assert {p.name for p in folder.iterdir()} >= {sdlib.LORA_WEIGHTS, export.KOHYA_FILE, "base.json", hypersd.META}
    pipe = _pipe(folder)
    z1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sd = minisd.load_mini_sd()
    student = sdlib.load_lora(sd.model, folder)
    cond = sd.text(PROMPTS)
    for n in (1, 4):
        visited = tcd.tcd_timesteps(n, original_steps=8)             # the training grid's: --intervals 8
        theirs = _sample(pipe, z1, n)
        assert theirs.shape == (2, 4, 8, 8) and bool(torch.isfinite(theirs).all())
        assert pipe.scheduler.timesteps.tolist() == visited.tolist()
        # the course's own sampler on the same LoRA and noise (TCD's gamma = diffusers' eta)
        ours = tcd.sss(student, z1.clone(), visited, student.process, torch.Generator().manual_seed(7),
                       gamma=1.0, cond=cond)
        assert float((ours - theirs).abs().max()) <= 1e-4 * max(1.0, float(theirs.abs().max()))
        with sdlib.adapter_disabled(student):                      # the adapter matters
            base = tcd.sss(student, z1.clone(), visited, student.process,
                           torch.Generator().manual_seed(7), gamma=1.0, cond=cond)
        assert float((base - ours).abs().max()) > 1e-4
    # the kohya file gives the same samples; the checked pipeline too
    kohya = load_file(str(folder / export.KOHYA_FILE))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    torch.testing.assert_close(_sample(_pipe(folder / export.KOHYA_FILE), z1, 4), _sample(pipe, z1, 4),
                               rtol=1e-5, atol=1e-5)
    checked = hypersd.pipeline(minisd.MINI_SD, folder)
    checked.set_progress_bar_config(disable=True)
    assert type(checked.scheduler).__name__ == "TCDScheduler"
    torch.testing.assert_close(_sample(checked, z1, 4), _sample(pipe, z1, 4), rtol=1e-6, atol=1e-6)


def test_a_lora_for_another_base_model_is_refused_and_nothing_is_overwritten(work):
    folder = work["run"] / "tscd-1" / "lora"
    with pytest.raises(SourceError, match="trained on another base model"):
        hypersd.pipeline(work["root"] / "other", folder)
    before = _snapshot(work["run"])
    # the next stage on another teacher: its input LoRA was trained on the mini SD
    with pytest.raises(SystemExit, match="trained on another base model"):
        hypersd.main(_args("tscd-4", work["run"], "--data", str(work["tar"]), teacher=work["root"] / "other"))
    # rerunning a finished stage with other settings: its checkpoint says so
    with pytest.raises(SystemExit, match="another run of this stage"):
        hypersd.main(_args("tscd-8", work["run"], "--data", str(work["tar"]), extra=("--w", "2.0")))
    assert _snapshot(work["run"]) == before


def test_a_missing_stage_output_names_the_command_to_run_first(work, tmp_path):
    with pytest.raises(SystemExit, match=r"Run it first: python -m course_lib\.scale\.hypersd --stage tscd-8 "
                                         r"--teacher .* --out"):
        hypersd.main(_args("tscd-4", tmp_path / "fresh", "--data", str(work["tar"])))
    assert not (tmp_path / "fresh").exists()
    # an unfinished previous stage (its LoRA without hypersd.json) counts as missing
    shutil.copytree(work["run"] / "tscd-2", tmp_path / "part" / "tscd-2")
    (tmp_path / "part" / "tscd-2" / "lora" / hypersd.META).unlink()
    before = _snapshot(tmp_path / "part")
    with pytest.raises(SystemExit, match="stage tscd-1 starts from stage tscd-2's LoRA"):
        hypersd.main(_args("tscd-1", tmp_path / "part", "--data", str(work["tar"])))
    assert _snapshot(tmp_path / "part") == before
    assert hypersd.command_for("tscd-8", ["--stage", "reward", "--reward", "aesthetic", "--out", "x"]) == \
        "python -m course_lib.scale.hypersd --stage tscd-8 --out x"


def test_a_reward_model_that_cannot_be_loaded_is_refused_and_nothing_is_overwritten(work, tmp_path, monkeypatch):
    monkeypatch.setenv(rewards.ROOT_ENV, str(tmp_path / "no-models"))
    before = _snapshot(work["run"])
    with pytest.raises(SystemExit, match="(?s)'aesthetic' is not available offline.*download from"):
        hypersd.main(_args("reward", work["run"], "--data", str(work["tar"]), extra=("--reward", "aesthetic")))
    with pytest.raises(SystemExit, match="the reward stage needs --reward"):
        hypersd.main(_args("reward", work["run"], "--data", str(work["tar"])))
    assert _snapshot(work["run"]) == before and not (work["run"] / "reward").exists()


class RednessDouble(rewards.SDReward):
    """A TEST DOUBLE in place of a real reward model (the test cannot download one): the mean of the red channel
    minus the blue one, recording what it was given."""

    name, score_range = "test double", "red minus blue"

    def __init__(self):
        super().__init__()
        self.seen: list = []

    def forward(self, images, prompts):
        self.seen.append((images.requires_grad, tuple(images.shape), list(prompts)))
        return (images[:, 0] - images[:, 2]).mean((1, 2))


def test_the_reward_stage_scores_the_decoded_prediction_with_gradients(work, tmp_path, monkeypatch):
    double = RednessDouble()
    monkeypatch.setitem(rewards.LOADERS, "aesthetic", lambda root, device: double)
    shutil.copytree(work["run"], tmp_path / "run")
    done = hypersd.main(_args("reward", tmp_path / "run", "--data", str(work["tar"]), steps=3,
                              extra=("--reward", "aesthetic", "--lambda-reward", "1.0")))
    assert done.step == 3 and all(l == l for l in done.losses["student"])
    captions = set(_embeddings(work).prompts())
    assert len(double.seen) == 3
    for needs_grad, shape, prompts in double.seen:     # decoded images (gradient through the VAE), their captions
        assert needs_grad and shape == (2, 3, 16, 16) and len(prompts) == 2 and set(prompts) <= captions
    meta = json.loads((tmp_path / "run" / "reward" / "lora" / hypersd.META).read_text())
    assert meta["reward"]["model"] == "aesthetic" and meta["k"] == 1
    assert meta["init"] == hypersd.file_digest(work["run"] / "tscd-1" / "lora" / sdlib.LORA_WEIGHTS)


@pytest.mark.slow
def test_a_killed_stage_resumes_to_the_weights_of_an_uninterrupted_one(work, tmp_path):
    run = work["run"]
    for part in ("embeddings", "tscd-8"):                # the same input: the first stage's LoRA and the data
        shutil.copytree(run / part, tmp_path / "killed" / part)
    args = _args("tscd-4", tmp_path / "killed", "--data", str(work["tar"]))
    stopped = kill_midway("course_lib.scale.hypersd", args, tmp_path / "killed" / "tscd-4" / "checkpoint", STEPS)
    hypersd.main(args)
    assert_same_checkpoint(run / "tscd-4", tmp_path / "killed" / "tscd-4", f"resuming from step {stopped}")
    a, b = (load_file(str(r / "tscd-4" / "lora" / sdlib.LORA_WEIGHTS)) for r in (run, tmp_path / "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_draw_different_batches_and_keep_identical_loras(work, tmp_path):
    args = _args("tscd-8", tmp_path / "ddp", "--embeddings", str(work["run"] / "embeddings"), steps=3)
    r0, r1 = launch(tmp_path / "rank", "hypersd", args).values()
    assert r0["world"] == r1["world"] == 2
    assert r0["batches"] != r1["batches"] and len(r0["batches"]) == len(r1["batches"]) == 3
    assert r0["weights"] == r1["weights"]
    lora = [k for k in r0["weights"] if "lora_B" in k]
    assert lora
    config = json.loads((tmp_path / "ddp" / "tscd-8" / "checkpoint" / "config.json").read_text())
    assert config["step"] == 3
    assert (tmp_path / "ddp" / "tscd-8" / "lora" / hypersd.META).is_file()


def test_the_shipped_config_parses_and_the_help_lists_the_stages(capsys):
    from course_lib.scale.common import parse

    a = parse("hypersd", hypersd.__doc__, hypersd.add_args, ["--stage", "tscd-8"])
    assert (a.teacher, a.lora, a.lora_alpha, a.intervals, a.w) == ("stable-diffusion-v1-5/stable-diffusion-v1-5", 64,
                                                                   64, 40, 7.5)
    assert all(a.intervals % hypersd.segments_of(s) == 0 for s in hypersd.STAGES)
    with pytest.raises(SystemExit):
        hypersd.main(["--help"])
    out = capsys.readouterr().out
    assert all(s in out for s in hypersd.STAGES) and "ESTIMATES" in out


def test_the_cost_table_times_the_stage_step_and_its_rows_then_say_measured(capsys):
    """`cost --table` on a GPU times scale.hypersd's own step (methods.hypersd_step); with that row the tscd-k rows
    are measured, the others stay estimates (here on the CPU with a tiny UNet: the plumbing only)."""
    from course_lib.scale import cost

    rows = cost.table(tiny=True, device="cpu", rows=(("lcm-lora", 2, True, 4, 0), ("lcm-lora", 2, True, 4, 2),
                                                     ("hypersd", 2, True, 4, 0)), progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 3 and rows[2]["k"] == 8 and rows[2]["seconds_per_step"] > 0
    est = cost.hypersd_estimates(rows)
    by = {r["stage"]: r for r in est}
    for stage in cost.HYPERSD_STAGES:
        assert by[stage]["status"] == "measured" and not by[stage]["estimate"]
        assert by[stage]["seconds_per_sample"] == pytest.approx(rows[2]["seconds_per_step"] / 2)
    assert by["reward (ReFL)"]["estimate"] and by["reward (ReFL)"]["lower_bound"]
    cost.print_hypersd_estimates(est)
    cost.print_table(rows)
    out = capsys.readouterr().out
    assert "tscd-8 (measured)" in out and "reward (ReFL) (estimate)" in out and "Hyper-SD plan" in out
    # a measured row from another device is not mixed with these call times
    other = [*rows[:2], {**rows[2], "device": "another GPU"}]
    assert all(r["estimate"] for r in cost.hypersd_estimates(other))
