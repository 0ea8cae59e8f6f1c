"""DMD2 at Stable Diffusion scale (course_lib.scale.dmd2) on the shipped mini Stable Diffusion, offline: a few
iterations on image-caption pairs (real latents through the teacher's VAE for the GAN), every network and optimizer in
the checkpoint, a killed run that resumes to exactly the weights of an uninterrupted one, the exported generator
loaded by plain diffusers whose LCMScheduler samples equal the course's own sampler on the same noise (one and four
steps, full and LoRA), a two-process run that keeps both networks identical on both processes, and the clear
errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from course_lib import minisd
from course_lib import sd as sdlib
from course_lib.distill import dmd
from course_lib.scale import dmd2
from course_lib.scale.common import SourceError
from course_lib.train import TRAINER_WEIGHTS
from killed_stage import assert_same_checkpoint, kill_midway
from pair_shards import shards
from scale_ddp_run import launch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
PROMPTS = ["a red handwritten seven", "a thick three"]
STEPS = 8


def _args(out: Path, *source: str, steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[str]:
    return ["--teacher", str(minisd.MINI_SD), *source, "--out", str(out), "--steps", str(steps), "--batch-size", "2",
            "--ttur", "2", "--lr", "1e-3", "--warmup", "0", "--ckpt-every", "1", "--precision", "bf16",
            "--grad-checkpointing", "--resolution", "16", "--cache-dtype", "float32", "--device", "cpu",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A one-step run (whole UNet) and a four-step LoRA run on the same image-caption pairs."""
    root = tmp_path_factory.mktemp("scale-dmd2")
    tar = shards(root / "pairs.tar")
    one = dmd2.main(_args(root / "one", "--data", str(tar)))
    four = dmd2.main(_args(root / "four", "--embeddings", str(root / "one" / "embeddings"),
                           extra=("--gen-steps", "4", "--lora", "4", "--lora-alpha", "4")))
    return {"root": root, "tar": tar, "one": one, "four": four}


def test_dmd2_trains_both_networks_with_the_two_time_scale_rule_and_checkpoints_every_optimizer(work):
    done, run = work["one"], work["root"] / "one"
    assert done.step == STEPS and done.updates == {"generator": STEPS // 2, "critic": STEPS}
    assert all(v == v for losses in done.losses.values() for v in losses)
    saved = load_file(str(run / "checkpoint" / TRAINER_WEIGHTS))
    for prefix in ("net.generator.net.unet.", "net.critic.fake.net.unet.", "net.critic.head.heads.", "opt.generator.",
                   "opt.critic."):
        assert any(k.startswith(prefix) for k in saved), f"the checkpoint has no {prefix}* tensors"
    assert not any(k.startswith("net.critic.head.features.") for k in saved)     # the fake score is stored once
    # the GAN head reads the fake score's bottleneck, and the critic's AdamW state covers head and fake score
    head = [k for k in saved if k.startswith("net.critic.head.heads.0.")]
    assert head and dmd2.read_meta(run)["gan"] is True
    # DMD2's released optimizer for both networks (dmd.DMD2_BETAS), the command's weight decay
    nets = json.loads((run / "checkpoint" / "config.json").read_text())["networks"]
    for name in ("generator", "critic"):
        assert (nets[name]["betas"], nets[name]["weight_decay"]) == ([0.9, 0.999], 0.01)
    # the generator moved away from the teacher (the comparison below is with the teacher's own weights)
    teacher = minisd.load_mini_sd().model.unet.state_dict()
    moved = max(float((saved[f"net.generator.net.unet.{k}"] - v).abs().max()) for k, v in teacher.items())
    assert moved > 1e-4


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(work, tmp_path):
    run = work["root"] / "one"
    args = _args(tmp_path / "killed", "--embeddings", str(run / "embeddings"))
    stopped = kill_midway("course_lib.scale.dmd2", args, tmp_path / "killed" / "checkpoint", STEPS)
    dmd2.main(args)
    assert_same_checkpoint(run, tmp_path / "killed", f"resuming from step {stopped}")


@pytest.mark.parametrize("name", ["one", "four"])
def test_the_generator_loads_in_diffusers_and_lcmscheduler_equals_the_course_sampler(work, name):
    run = work["root"] / name
    meta = dmd2.read_meta(run)
    k = meta["gen_steps"]
    assert meta["timesteps"] == ([999] if k == 1 else [999, 749, 499, 249])
    pipe = dmd2.dmd2_pipeline(run)
    with torch.no_grad():
        latents = pipe(PROMPTS, num_inference_steps=k, guidance_scale=0.0, output_type="latent",
                       generator=torch.Generator().manual_seed(3)).images
        images = dmd2.generate(pipe, run, PROMPTS, seed=3)
    assert pipe.scheduler.timesteps.tolist() == meta["timesteps"]
    sd = minisd.load_mini_sd()
    if meta["lora"]:
        assert (run / meta["folder"] / "pytorch_lora_weights.safetensors").is_file()
        G = sdlib.load_lora(sd.model, run / meta["folder"])
    else:
        G = sdlib.load_sd(run / meta["folder"]).model
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        ours = dmd.sample(G, z, k, G.process, g, sd.text(PROMPTS))
    scale = max(1.0, float(latents.abs().max()))
    assert float((ours - latents).abs().max()) <= 1e-4 * scale
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # the trained generator differs from the teacher used as a k-step generator on the same noise (the test has teeth)
    teacher = minisd.load_mini_sd().model
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        before = dmd.sample(teacher, z, k, teacher.process, g, sd.text(PROMPTS))
    assert float((before - ours).abs().max()) > 1e-3


def test_a_lora_run_checkpoints_only_the_adapter_and_uses_the_unet_without_it_as_real_score(work):
    run = work["root"] / "four"
    saved = load_file(str(run / "checkpoint" / TRAINER_WEIGHTS))
    gen = [k for k in saved if k.startswith("net.generator.")]
    assert gen and all("lora" in k for k in gen)
    assert work["four"].updates == {"generator": STEPS // 2, "critic": STEPS}
    _, G, real, _ = dmd2.build(minisd.MINI_SD, 4, 4.0, gan=False, seed=0)
    with torch.no_grad():
        for p in G.unet.parameters():
            if p.requires_grad:
                p.add_(0.1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.4])
    c = minisd.load_mini_sd().text(PROMPTS)
    teacher = minisd.load_mini_sd().model
    with torch.no_grad():
        torch.testing.assert_close(real(x, t, c).x0, teacher(x, t, c).x0)      # adapter off: the teacher
        assert float((G(x, t, c).x0 - teacher(x, t, c).x0).abs().max()) > 1e-3


def _fp32(out: Path, emb: str, steps: int, ckpt_every: int = 1) -> list[str]:
    args = [("fp32" if a == "bf16" else a) for a in _args(out, "--embeddings", emb, steps=steps)]
    args[args.index("--ckpt-every") + 1] = str(ckpt_every)
    return args


@pytest.fixture(scope="module")
def ddp(work):
    """A two-process DDP run of 4 steps in fp32: its records per rank and its folder (the FSDP test compares to it)."""
    out = work["root"] / "ddp"
    return launch(work["root"] / "ddp-rank", "dmd2", _fp32(out, str(work["root"] / "one" / "embeddings"), 4)), out


@pytest.mark.slow
def test_two_processes_keep_identical_generator_and_critic(ddp):
    (r0, r1), out = ddp[0].values(), ddp[1]
    assert r0["world"] == r1["world"] == 2
    assert len(r0["batches"]) == len(r1["batches"]) > 0 and not set(r0["batches"]) & set(r1["batches"])
    assert r0["weights"] == r1["weights"]                    # generator AND critic: gradients averaged over both
    assert any(k.startswith("critic.head.") for k in r0["weights"])
    assert (out / "generator" / "model_index.json").is_file()


def test_clear_errors(work, tmp_path):
    with pytest.raises(SystemExit, match="GAN term needs them"):
        dmd2.main(_args(tmp_path / "p", "--prompts", str(tmp_path / "none.txt")))
    shutil.copytree(minisd.MINI_SD, tmp_path / "no-vae", ignore=shutil.ignore_patterns("vae"))
    args = _args(tmp_path / "out", "--embeddings", str(work["root"] / "one" / "embeddings"))
    args[1] = str(tmp_path / "no-vae")
    with pytest.raises(SystemExit, match="has no vae/"):
        dmd2.main(args)
    with pytest.raises(SourceError, match="not a finished run"):
        dmd2.read_meta(tmp_path)


def test_the_mini_sd_generator_trains_saves_and_loads(tmp_path):
    """recipes.dmd (the shipped mini-SD student's recipe) on a tiny random pipeline: a few iterations of the
    same method step, then the saved UNet loads back as the same generator."""
    from course_lib.recipes import dmd as dmd_recipes

    sd = sdlib.from_pipeline(sdlib.tiny_sd_pipeline(seed=0))
    before = {k: v.clone() for k, v in sd.model.unet.state_dict().items()}
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = sd.text(["a red seven"] * 6)
    sample = lambda n, g: {"x": x[:n], "cond": type(text)(text=text.text[:n], null_text=text.null_text)}
    G, done = dmd_recipes.distill_dmd2_sd(sd, sample, dmd_recipes.recipe(),
                                          run=dmd_recipes.train_config(4, 2, checkpoints=True),
                                          progress=False, ckpt_dir=tmp_path / "ckpt")
    assert done.updates == {"generator": 1, "critic": 4} and not G.training
    # the shipped generator's optimizer (dmd_recipes.RECIPE: the course's betas (0, 0.999), no weight decay)
    nets = json.loads((tmp_path / "ckpt" / "config.json").read_text())["networks"]
    for name in ("generator", "critic"):
        assert (nets[name]["betas"], nets[name]["weight_decay"]) == ([0.0, 0.999], 0.0)
    assert all(torch.equal(v, sd.model.unet.state_dict()[k]) for k, v in before.items())   # the teacher untouched
    assert dmd_recipes.first_time(G) == dmd_recipes.recipe().t_gen
    folder = dmd_recipes.save(G, tmp_path / "g", {"kind": "dmd2", "recipe": {"t_gen": 0.8}})
    again = dmd_recipes.load(sd, folder)
    assert dmd_recipes.first_time(again) == 0.8                   # the time told at the first step, from the JSON
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        c = sd.text(["a red seven", "a blue two"])
        t = torch.full((2,), 0.8)
        torch.testing.assert_close(again(z, t, c).x0, G(z, t, c).x0)
        # one-step sampling calls the generator once at its first time, on the seed's noise
        z1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(dmd_recipes.sample(sd, again, ["a red seven", "a blue two"], 1, seed=5),
                                   sd.vae.decode(again(z1, t, c).x0).clamp(-1, 1))
    assert dmd_recipes.first_time(dmd_recipes.load(sd, dmd_recipes.save(G, tmp_path / "old", {"kind": "dmd2"}))) == 1.0
    with pytest.raises(FileNotFoundError, match="recreate it with"):
        dmd_recipes.load(sd, tmp_path)


def test_recipe_settings_from_the_command_line_are_typed_and_checked():
    from course_lib.recipes import dmd as dmd_recipes

    cfg = dmd_recipes.override(dmd_recipes.RECIPE, ["lr_g=2e-5", "ttur=10", "gan=false", "t_range=0.1,0.9"])
    assert (cfg.lr_g, cfg.ttur, cfg.gan, cfg.t_range) == (2e-5, 10, False, (0.1, 0.9))
    assert cfg.lr_critic == dmd_recipes.RECIPE.lr_critic                          # the rest is the recipe's
    for bad in ("lr=1e-4", "ttur", "gan=maybe", "ttur=1.5"):
        with pytest.raises(ValueError):
            dmd_recipes.override(dmd_recipes.RECIPE, [bad])


def _launch(tmp_path: Path, name: str, args: list[str]) -> dict:
    return launch(tmp_path / f"{name}-rank", "dmd2", args)


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains_and_resumes_bit_for_bit(work, ddp, tmp_path):
    """--fsdp (the engine's FSDP2 path) against DDP on the same batches, in fp32: the same losses and, after AdamW
    (whose first steps move each weight by about lr whatever the gradient's size), the same weights up to the
    elements whose gradient is rounding noise. Then a run stopped at step 2 and resumed ends bit for bit where the
    uninterrupted FSDP run does (checkpoints hold whole tensors, each process reloads its shards). A checkpoint every
    2 steps: each gathers every shard, the FSDP runs' largest cost on a CPU."""
    emb = str(work["root"] / "one" / "embeddings")
    fp32 = lambda out, steps: _fp32(out, emb, steps, ckpt_every=2)
    (ddp_rank0, _), ddp_out, fsdp_out = ddp[0].values(), ddp[1], tmp_path / "fsdp"
    fsdp = _launch(tmp_path, "fsdp", fp32(fsdp_out, 4) + ["--fsdp"])
    assert fsdp[0]["weights"] == fsdp[1]["weights"] and fsdp[0]["batches"] == ddp_rank0["batches"]
    assert (fsdp_out / "generator" / "model_index.json").is_file()
    a, b = (load_file(str(d / "checkpoint" / TRAINER_WEIGHTS)) for d in (fsdp_out, ddp_out))
    assert a.keys() == b.keys()                                   # one checkpoint format for both
    config = lambda d: json.loads((d / "checkpoint" / "config.json").read_text())
    assert config(fsdp_out)["train_config"]["fsdp"] is True and config(ddp_out)["train_config"]["fsdp"] is False
    la, lb = (config(d)["losses"] for d in (fsdp_out, ddp_out))
    for net in ("generator", "critic"):
        assert la[net] == pytest.approx(lb[net], rel=1e-5)
        d = torch.cat([(a[k] - b[k]).abs().flatten() for k in a if k.startswith(f"net.{net}.")])
        assert float(d.max()) < 4e-3 and float((d > 1e-5).float().mean()) < 0.02, (net, float(d.max()))
    _launch(tmp_path, "part", fp32(tmp_path / "part", 2) + ["--fsdp"])
    _launch(tmp_path, "part", fp32(tmp_path / "part", 4) + ["--fsdp"])          # resumes at step 2
    assert_same_checkpoint(fsdp_out, tmp_path / "part", "an FSDP run resumed at step 2")
    # a four-step LoRA generator: each process draws the same backward-simulation depth (ctx.shared), so the
    # processes gather the weights the same number of times
    four = _launch(tmp_path, "four", _args(tmp_path / "four", "--embeddings", emb, steps=2,
                                           extra=("--ckpt-every", "2")) +
                   ["--fsdp", "--gen-steps", "4", "--lora", "4", "--lora-alpha", "4"])
    assert four[0]["weights"] == four[1]["weights"] and (tmp_path / "four" / "generator" / "lora").is_dir()


def test_fsdp_refuses_what_it_cannot_do(work, tmp_path):
    emb = str(work["root"] / "one" / "embeddings")
    with pytest.raises(SystemExit, match="launch with"):                  # one process: nothing to shard over
        dmd2.main(_args(tmp_path / "one", "--embeddings", emb, extra=("--fsdp",)))
    from course_lib.train import Network, TrainConfig, train_networks

    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="launch with"):
        train_networks({"n": Network(net)}, lambda ctx, b: ctx.nets["n"](b).pow(2).sum(1),
                       lambda n, g: torch.randn(n, 2, generator=g), TrainConfig(steps=1, batch_size=2, fsdp=True),
                       progress=False)
