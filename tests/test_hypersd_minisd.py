"""Hyper-SD on the mini Stable Diffusion (recipes.hypersd, the mini-SD half of notebook 11): the unified LoRA's
TSCD stages run on the mini SD's DDIM grid and an interrupted stage resumes bit for bit when the same call is made
again; a missing stage output or a missing LoRA file is a clear error; the SHIPPED LoRA (data/hypersd) loads with a
plain `StableDiffusionPipeline.load_lora_weights` and diffusers' TCDScheduler samples it as the course's sampler
(distill.tcd.sss) does, at 1, 2, 4 and 8 steps, to the serving test's tolerance."""
from __future__ import annotations

import json

import pytest
import torch

from course_lib import minisd
from course_lib import sd as sdlib
from course_lib.distill import hypersd as h
from course_lib.distill import tcd
from course_lib.recipes import hypersd as R
from conftest import interrupt_on_call

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
SMALL = R.MiniSDRecipe(stage_steps=2, reward_steps=2, batch=4)
REL_TOL = 1e-4                    # tests/test_hypersd_serving.py's


def _train(folder, recipe=SMALL):
    sd = minisd.load_mini_sd()
    parts = R.train_minisd(sd, recipe, minisd.digit_batches(sd, n_images=20), ckpt_dir=folder, progress=False,
                           log=lambda *a: None)
    return sd, parts


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_sd_grid_holds_every_stage_edge_and_the_teacher_step_stays_in_its_segment():
    proc = minisd.load_mini_sd().model.process
    grid = R.sd_grid(proc)
    taus = torch.round(grid * proc.T - 1).to(torch.int64)
    assert taus[0] == 0 and taus[1] == 19 and taus[-1] == 999 and len(grid) == 51   # {0} + LCM's DDIM grid
    for k in h.SEGMENTS:
        edges = h.segment_edges(k, grid=grid)
        assert bool(torch.isin(edges, grid).all()) and edges[0] == grid[0] and edges[-1] == grid[-1]
        s_next = h.segment_start(grid[1:], k, grid=grid)
        assert bool((s_next <= grid[:-1] + 1e-12).all()), "a teacher step t_{n+1} -> t_n crossed an edge"


def test_a_stage_trains_the_lora_and_an_interrupted_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    sd, ref = _train(tmp_path / "ref")
    assert set(ref) == {"tscd", "tscd-reward"}
    assert not _same(ref["tscd"][0], ref["tscd-reward"][0])               # the reward stage moved the adapter
    assert any(float(v.abs().max()) > 0 for k, v in ref["tscd"][0].items() if "lora_B" in k)   # B starts at 0
    # interrupt inside stage k = 4 (its second update: k8's two calls, then two): Ctrl-C writes a checkpoint
    real = interrupt_on_call(monkeypatch, h, "tscd_loss_at", 4)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "int")
    assert (tmp_path / "int" / "k8").is_dir() and not (tmp_path / "int" / "k2").exists()
    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(h, "tscd_loss_at", counting)
    _, resumed = _train(tmp_path / "int")                                # the same call again
    # k8 reloads (no update), k4 resumes at its second update (1), k2 and k1 (2 + 2), the reward stage's TSCD term (2)
    assert counted["n"] == 1 + 2 + 2 + 2, "the rerun did not reload stage k8 and resume stage k4"
    for name in ref:
        assert _same(ref[name][0], resumed[name][0]), f"{name}: the resumed run differs from the uninterrupted one"


def test_a_missing_stage_output_and_a_missing_lora_file_are_clear_errors(tmp_path):
    for name in ("k8", "k4"):
        (tmp_path / name).mkdir()
    (tmp_path / "k4" / "trainer.safetensors").write_bytes(b"")       # stage k4 has a checkpoint, k8 has none
    with pytest.raises(FileNotFoundError, match="stage k8's output is missing"):
        R.train_minisd(minisd.load_mini_sd(), SMALL, ckpt_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="holds no Hyper-SD LoRA"):
        R.load_minisd(minisd.load_mini_sd(), tmp_path / "k8")
    with pytest.raises(ValueError, match="shipped Hyper-SD LoRAs"):
        R.load_shipped_minisd(minisd.load_mini_sd(), "hypersd")


def _plain_pipeline(lora):
    from diffusers import StableDiffusionPipeline, TCDScheduler

    pipe = StableDiffusionPipeline.from_pretrained(minisd.MINI_SD, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora))                       # plain diffusers: no course code on this side
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", list(R.SD_SHIPPED))
def test_the_shipped_lora_in_a_plain_pipeline_with_tcd_scheduler_equals_the_course_sampler(name):
    folder = R.sd_shipped_dir() / R.SD_SHIPPED[name]
    if name != "tscd" and not folder.is_dir():
        pytest.skip(f"{folder} is not shipped")
    meta = json.loads((folder / R.HYPERSD_JSON).read_text())
    assert meta["kind"] == "hyper-sd-lora" and meta["scheduler"] == "TCDScheduler"
    pipe = _plain_pipeline(folder)
    sd = minisd.load_mini_sd()
    student = R.load_shipped_minisd(sd, name)
    prompts = ["a red 3", "the digit 7 in blue"]
    cond = sd.text(prompts)
    h_ = student.denoiser.unet.config.sample_size
    for n in R.SD_STEPS:
        gamma = R.SD_GAMMAS[n]
        z1 = torch.randn(2, 4, h_, h_, generator=torch.Generator().manual_seed(5 + n))
        with torch.no_grad():
            theirs = pipe(prompts, num_inference_steps=n, guidance_scale=1.0, eta=gamma, latents=z1.clone(),
                          generator=torch.Generator().manual_seed(7), output_type="latent").images
        ours = tcd.sss(student, z1.clone(), tcd.tcd_timesteps(n), student.process, torch.Generator().manual_seed(7),
                       gamma=gamma, cond=cond)
        scale = max(1.0, float(theirs.abs().max()))
        assert float((ours - theirs).abs().max()) <= REL_TOL * scale, f"{n} steps"
        with sdlib.adapter_disabled(student.denoiser):               # the comparison has teeth: the LoRA matters
            base = tcd.sss(student, z1.clone(), tcd.tcd_timesteps(n), student.process,
                           torch.Generator().manual_seed(7), gamma=gamma, cond=cond)
        assert float((base - ours).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="another base model"):          # its fingerprint guards the base
        other = minisd.load_mini_sd()
        with torch.no_grad():
            next(other.model.unet.parameters()).add_(1e-3)
        R.load_minisd(other, folder)
