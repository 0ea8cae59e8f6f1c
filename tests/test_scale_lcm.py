"""LCM-LoRA at Stable Diffusion scale (course_lib.scale.lcm_lora) on the shipped mini Stable Diffusion, offline:
a few training steps on image-caption pairs through the teacher's VAE, a killed run that resumes to exactly the
weights of an uninterrupted one, the export loaded by plain diffusers (load_lora_weights, diffusers' and kohya's
keys) whose 4-step LCMScheduler sample equals the course's own LCM sampler on the same noise, the prompts-only run
(the teacher's own samples as z_0), the plan, and the clear errors: a LoRA for another base model, a guidance weight
it was not distilled for, a latent teacher without its autoencoder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from course_lib import minisd
from course_lib.sd import adapter_disabled
from course_lib.distill import lcm
from course_lib.recipes import lcm as lcm_recipes
from course_lib.scale import cost, export, lcm_lora
from course_lib.scale.common import SourceError
from course_lib.train import TRAINER_WEIGHTS
from conftest import save_nudged_mini_sd
from killed_stage import assert_same_checkpoint, kill_midway
from pair_shards import shards

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
PROMPTS = ["a red handwritten seven", "a thick three"]
STEPS = 30
# Same float32 UNet, same integer timesteps, same noise: the course's sampler and LCMScheduler differ only in where
# they round (LCM's scalings and alpha, sigma in float64 here, float32 in diffusers) over 4 steps; test_lcm.py holds
# the sampler to the same relative 1e-4 on the tiny pipeline. (Measured here: 3e-5 on latents up to 54, 5e-7 on the
# decoded images in [0, 1], which the test holds to 1e-4.)
REL_TOL = 1e-4


def _args(out: Path, *source: str, steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[str]:
    return ["--teacher", str(minisd.MINI_SD), *source, "--out", str(out), "--steps", str(steps), "--batch-size", "2",
            "--lora", "4", "--lora-alpha", "4", "--w", "4.0", "--lr", "5e-3", "--warmup", "0", "--ckpt-every", "1",
            "--precision", "bf16", "--grad-checkpointing", "--resolution", "16", "--cache-dtype", "float32",
            "--device", "cpu", "--no-progress", *extra]



@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """An uninterrupted run on image-caption pairs, and another base model (the mini SD with its UNet nudged)."""
    root = tmp_path_factory.mktemp("scale-lcm")
    tar = shards(root / "pairs.tar")
    done = lcm_lora.main(_args(root / "full", "--data", str(tar)))
    save_nudged_mini_sd(root / "other")
    return {"root": root, "tar": tar, "done": done, "run": root / "full"}


@pytest.mark.slow
def test_lcm_lora_trains_on_image_latents_and_a_killed_run_resumes_to_the_same_weights(work, tmp_path):
    done, run = work["done"], work["run"]
    assert done.step == STEPS and len(done.losses["student"]) == STEPS
    assert all(l == l for l in done.losses["student"])
    saved = load_file(str(run / "checkpoint" / TRAINER_WEIGHTS))
    trained = {k: v for k, v in saved.items() if k.startswith("net.")}
    assert trained and all("lora" in k for k in trained)                       # only the adapter is checkpointed
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k)   # it moved off lora_B = 0
    stage = json.loads((run / "stage.json").read_text())
    assert stage["stage"] == "lcm-lora" and stage["data_mode"] == "images"
    cache = json.loads((run / "embeddings" / "index.json").read_text())
    assert cache["images"] and "vae" in cache["key"]                           # latents from the teacher's VAE
    # kill a second run midway (same data through the first run's cache) and rerun the same command
    args = _args(tmp_path / "killed", "--embeddings", str(run / "embeddings"))
    stopped = kill_midway("course_lib.scale.lcm_lora", args, tmp_path / "killed" / "checkpoint", STEPS)
    lcm_lora.main(args)
    assert_same_checkpoint(run, tmp_path / "killed", f"resuming from step {stopped}")


def test_export_loads_in_diffusers_and_4_lcm_steps_equal_the_course_sampler(work):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    folder = work["run"] / "lora"
    assert {p.name for p in folder.iterdir()} >= {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors",
                                                   "lcm.json", "base.json"}
    meta = json.loads((folder / "lcm.json").read_text())
    assert meta["kind"] == "lcm-lora" and meta["w_fixed"] == 4.0 and meta["original_inference_steps"] == 50
    pipe = StableDiffusionPipeline.from_pretrained(minisd.MINI_SD, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(folder))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        latents = pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, output_type="latent",
                       generator=torch.Generator().manual_seed(3)).images
        images = lcm_lora.generate(pipe, folder, PROMPTS, steps=4, seed=3)
    assert pipe.scheduler.timesteps.tolist() == lcm.lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    # the course's own path: load_lcm_lora (fingerprint checked) + its multistep sampler on the same noise
    sd = minisd.load_mini_sd()
    student = lcm_recipes.load_lcm_lora(sd.model, folder)
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(2, 4, 8, 8, generator=g)
    ours = lcm.multistep(student, z1, lcm.lcm_timesteps(4), student.process, g, cond=sd.text(PROMPTS))
    scale = max(1.0, float(latents.abs().max()))
    assert float((ours - latents).abs().max()) <= REL_TOL * scale
    course_images = (lcm.sample(sd, student, PROMPTS, steps=4, seed=3) + 1) / 2
    assert images.shape == (2, 3, 16, 16) and float((course_images - images).abs().max()) <= 1e-4
    # the adapter matters (the comparison has teeth): the base UNet gives another sample
    g = torch.Generator().manual_seed(3)
    torch.randn(2, 4, 8, 8, generator=g)
    with adapter_disabled(student):
        base = lcm.multistep(student, z1, lcm.lcm_timesteps(4), student.process, g, cond=sd.text(PROMPTS))
    assert float((base - ours).abs().max()) > 1e-3


def test_the_kohya_file_loads_in_diffusers_and_gives_the_same_unet(work):
    from diffusers import StableDiffusionPipeline

    folder = work["run"] / "lora"
    kohya = load_file(str(folder / export.KOHYA_FILE))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    assert any("resnets" in k and "conv1" in k for k in kohya)                  # LCM-LoRA's convolutions too
    assert all(float(v) == 4.0 for k, v in kohya.items() if k.endswith(".alpha"))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2))
    outs = []
    for source in (folder, folder / export.KOHYA_FILE):
        pipe = StableDiffusionPipeline.from_pretrained(minisd.MINI_SD, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.load_lora_weights(str(source))
        with torch.no_grad():
            outs.append(pipe.unet(x, torch.tensor([759.0, 259.0]), encoder_hidden_states=text).sample)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():                        # and the adapter matters (every module's LoRA went through kohya)
        pipe.unet.disable_adapters()
        base = pipe.unet(x, torch.tensor([759.0, 259.0]), encoder_hidden_states=text).sample
    assert float((base - outs[1]).abs().max()) > 1e-3


def test_a_lora_for_another_base_model_is_refused(work):
    from course_lib import sd as sdlib

    folder = work["run"] / "lora"
    other = sdlib.load_sd(work["root"] / "other")
    with pytest.raises(ValueError, match="distilled on another base model"):
        lcm_recipes.load_lcm_lora(other.model, folder)
    with pytest.raises(SourceError, match="trained on another base model"):
        lcm_lora.lcm_pipeline(work["root"] / "other", folder)
    # resuming a run folder with another teacher: the checkpoint says whose LoRA it is
    args = _args(work["run"], "--embeddings", str(work["run"] / "embeddings"))
    args[1] = str(work["root"] / "other")
    with pytest.raises(SystemExit, match="another base model"):
        lcm_lora.main(args)


def test_a_guidance_weight_outside_the_trained_one_is_refused(work, tmp_path):
    folder = work["run"] / "lora"
    pipe = lcm_lora.lcm_pipeline(minisd.MINI_SD, folder)
    with pytest.raises(ValueError, match=r"fixed w = 4 \(diffusers' guidance_scale 5\)"):
        lcm_lora.generate(pipe, folder, PROMPTS, guidance_scale=5.0)
    sd = minisd.load_mini_sd()
    student = lcm_recipes.load_lcm_lora(sd.model, folder)
    with pytest.raises(ValueError, match="distilled at the fixed guidance weight w = 4.0"):
        lcm.sample(sd, student, PROMPTS, steps=4, w=6.0)
    with pytest.raises(SystemExit, match="course's w >= 0"):
        lcm_lora.main(_args(tmp_path / "neg", "--data", str(work["tar"]), extra=("--w", "-1")))
    assert not (tmp_path / "neg").exists()


def test_a_latent_teacher_without_its_autoencoder_is_refused(work, tmp_path):
    shutil.copytree(minisd.MINI_SD, tmp_path / "no-vae", ignore=shutil.ignore_patterns("vae"))
    args = _args(tmp_path / "out", "--data", str(work["tar"]))
    args[1] = str(tmp_path / "no-vae")
    with pytest.raises(SystemExit, match="has no vae/: LCM distils in the teacher's own latent space"):
        lcm_lora.main(args)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="exactly one data source"):
        lcm_lora.main(_args(tmp_path / "out", "--data", str(work["tar"]), "--prompts", "course"))


def test_prompts_only_learns_from_the_teachers_own_samples(work, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    done = lcm_lora.main(_args(tmp_path / "p", "--prompts", str(tmp_path / "prompts.txt"), steps=2,
                               extra=("--online-steps", "2")))
    assert done.step == 2 and all(l == l for l in done.losses["student"])
    assert json.loads((tmp_path / "p" / "stage.json").read_text())["data_mode"] == "online"
    assert not json.loads((tmp_path / "p" / "embeddings" / "index.json").read_text())["images"]
    assert (tmp_path / "p" / "lora" / "lora_kohya.safetensors").is_file()
    # or from a cache of the teacher's samples made once (course_lib.scale.triplets)
    from course_lib.scale import triplets

    triplets.generate_triplets(minisd.MINI_SD, tmp_path / "p" / "embeddings", tmp_path / "tri", n=4, w=4.0, steps=2,
                               shard_size=4, batch_size=4, device="cpu", progress=False)
    done = lcm_lora.main(_args(tmp_path / "t", "--embeddings", str(tmp_path / "p" / "embeddings"), "--triplets",
                               str(tmp_path / "tri"), steps=2))
    assert done.step == 2 and json.loads((tmp_path / "t" / "stage.json").read_text())["data_mode"] == "triplets"


def test_the_plan_counts_the_papers_lora_size_and_says_it_is_an_estimate(capsys):
    p = lcm_lora.main(["--plan"])
    out = capsys.readouterr().out
    assert "ESTIMATE pending a GPU measurement" in out and "--plan --measure" in out
    assert abs(p["lora_params"] - cost.PAPER_LORA_PARAMS_SD15) / cost.PAPER_LORA_PARAMS_SD15 < 0.01
    (one, eight), (one_p, eight_p) = [[r for r in p["rows"] if r["data"] == d] for d in ("images", "online")]
    assert one["global_batch"] == eight["global_batch"] == 96 and one["grad_accum"] == 8 and eight["gpus"] == 8
    assert abs(one["gpu_hours"] - eight["gpu_hours"]) < 1e-9 and abs(one["wall_hours"] - 8 * eight["wall_hours"]) < 1e-9
    assert one_p["wall_hours"] > one["wall_hours"]                          # the online teacher costs extra forwards
    m = lcm_lora.main(["--plan", "--measure", "--tiny", "--batch-size", "2", "--lora", "4", "--device", "cpu"])
    assert m["measured"]["seconds_per_step"] > 0 and m["source"].startswith("measured on cpu")
    assert "scaled by its UNet forwards" in m["source"] and m["measured_online"] is None
    # both modes measured: each row comes from its own measurement (seconds per sample x batch x accumulation)
    both = lcm_lora.main(["--plan", "--measure", "--measure-online", "--online-steps", "2", "--tiny", "--batch-size",
                          "2", "--lora", "4", "--device", "cpu"])
    assert "both data modes" in both["source"] and both["measured_online"]["online_steps"] == 2
    for mode, key in (("images", "measured"), ("online", "measured_online")):
        row = next(r for r in both["rows"] if r["data"] == mode and r["gpus"] == 1)
        assert row["seconds_per_step"] == pytest.approx(both[key]["seconds_per_step"] * row["grad_accum"])
