"""InstaFlow's SD stages (course_lib.scale.instaflow_reflow / instaflow_distill) on the tiny offline Stable Diffusion: a few training
steps, a killed run that resumes to exactly the weights of an uninterrupted one, the LoRA variant whose teacher is
the same UNet with its adapter disabled, the export loaded by plain diffusers, and a two-process (DDP, gloo) run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from course_lib import sd
from course_lib.scale import data, instaflow_distill, instaflow_reflow, triplets
from course_lib.train import TRAINER_WEIGHTS
from killed_stage import assert_same_checkpoint, kill_midway
from scale_ddp_run import launch
from conftest import save_tiny_sd

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-train")
    save_tiny_sd(root / "tiny", seed=0)
    (root / "prompts.txt").write_text("a handwritten seven\na thick three\na small zero\n", encoding="utf-8")
    data.build_embeddings(root / "tiny", root / "prompts.txt", root / "emb", shard_size=2, device="cpu",
                          dtype="float32", progress=False)
    triplets.generate_triplets(root / "tiny", root / "emb", root / "tri", n=8, w=1.0, steps=2, shard_size=4,
                               batch_size=4, device="cpu", progress=False)
    return root


def _reflow_args(work: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--teacher", str(work / "tiny"), "--embeddings", str(work / "emb"), "--triplets", str(work / "tri"),
            "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--ckpt-every", "1", "--ema-decay", "0.9",
            "--lr", "1e-3", "--warmup", "0", "--precision", "fp32", "--no-grad-checkpointing", "--device", "cpu",
            "--no-progress", *extra]



@pytest.mark.slow
def test_reflow_killed_and_resumed_equals_uninterrupted_and_exports_a_diffusers_pipeline(work, tmp_path):
    from diffusers import StableDiffusionPipeline

    steps = 12
    done = instaflow_reflow.main(_reflow_args(work, tmp_path / "full", steps))
    assert done.step == steps and len(done.losses["student"]) == steps
    stopped = kill_midway("course_lib.scale.instaflow_reflow", _reflow_args(work, tmp_path / "killed", steps),
                          tmp_path / "killed" / "checkpoint", steps)
    instaflow_reflow.main(_reflow_args(work, tmp_path / "killed", steps))                 # the same command resumes
    a = assert_same_checkpoint(tmp_path / "full", tmp_path / "killed", f"resuming from step {stopped}")
    assert any(k.startswith("ema.student.") for k in a)
    # the reflow moved the weights away from SD's, and the export is the EMA student, loadable without the course
    init = sd.load_sd(work / "tiny").model.unet.state_dict()
    trained = {k[len("net.student.net.unet."):]: v for k, v in a.items() if k.startswith("net.student.net.unet.")}
    assert trained.keys() == init.keys() and any(not torch.equal(init[k], v) for k, v in trained.items())
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "full" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    ema = {k[len("ema.student.net.unet."):]: v for k, v in a.items() if k.startswith("ema.student.net.unet.")}
    exported = pipe.unet.state_dict()
    assert ema.keys() == exported.keys() and all(torch.equal(exported[k], v) for k, v in ema.items())
    image = pipe("a thick three", num_inference_steps=1, guidance_scale=1.0, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
    stage = json.loads((tmp_path / "full" / "stage.json").read_text())
    assert stage["stage"] == "reflow" and stage["settings"]["steps"] == steps
    from course_lib.scale import export                        # re-export from the checkpoint: the same student
    again = StableDiffusionPipeline.from_pretrained(export.reexport(tmp_path / "full", tmp_path / "re")).unet
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ema.items())


def test_lora_reflow_with_the_adapter_disabled_teacher_then_one_step_distillation(work, tmp_path):
    from diffusers import StableDiffusionPipeline

    done = instaflow_reflow.main(["--teacher", str(work / "tiny"), "--embeddings", str(work / "emb"), "--out",
                        str(tmp_path / "lora"), "--lora", "4", "--online", "--online-steps", "2", "--w", "1.0",
                        "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--ema-decay", "0", "--warmup", "0",
                        "--precision", "bf16", "--grad-checkpointing", "--device", "cpu", "--no-progress"])
    saved = load_file(str(tmp_path / "lora" / "checkpoint" / TRAINER_WEIGHTS))
    assert {k for k in saved if k.startswith("net.")} and all("lora" in k for k in saved if k.startswith("net."))
    unet = done.nets["student"].unet
    base = StableDiffusionPipeline.from_pretrained(work / "tiny").unet
    x, text = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 16, 32)
    with torch.no_grad():
        unet.disable_adapters()                                # the teacher: one UNet, adapter off
        teacher_out = unet(x, 999.0, encoder_hidden_states=text).sample
        unet.enable_adapters()
        student_out = unet(x, 999.0, encoder_hidden_states=text).sample
        torch.testing.assert_close(teacher_out, base(x, 999.0, encoder_hidden_states=text).sample)
    assert float((student_out - teacher_out).abs().max()) > 1e-4
    assert (tmp_path / "lora" / "lora" / "lora_kohya.safetensors").is_file()

    # stage 2 from a full 2-RF: its own pairs (w = 0, Euler), then the one-step loss on decoded images (Lap1)
    instaflow_reflow.main(_reflow_args(work, tmp_path / "2rf", 2))
    triplets.generate_triplets(tmp_path / "2rf" / "pipeline", work / "emb", tmp_path / "pairs", n=4, w=0.0, steps=2,
                               sampler="euler", shard_size=4, batch_size=4, device="cpu", progress=False)
    with pytest.raises(SystemExit, match="pairs of the flow it starts from"):
        instaflow_distill.main(["--init", str(tmp_path / "2rf" / "pipeline"), "--embeddings", str(work / "emb"),
                      "--triplets", str(work / "tri"), "--out", str(tmp_path / "bad"), "--device", "cpu"])
    assert not (tmp_path / "bad").exists()
    done = instaflow_distill.main(["--init", str(tmp_path / "2rf" / "pipeline"), "--embeddings", str(work / "emb"),
                         "--triplets", str(tmp_path / "pairs"), "--out", str(tmp_path / "one"), "--distance", "perceptual",
                         "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--ema-decay", "0", "--warmup", "0",
                         "--precision", "fp32", "--no-grad-checkpointing", "--device", "cpu", "--no-progress"])
    assert done.step == 2 and all(l == l for l in done.losses["student"])
    try:
        import lpips  # noqa: F401
    except ImportError:                                       # offline: the documented substitute, and it says so
        assert json.loads((tmp_path / "one" / "stage.json").read_text())["settings"]["distance"] == "lap1"
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "one" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a small zero", num_inference_steps=1, guidance_scale=1.0, output_type="pt").images.shape == (1, 3, 16, 16)


@pytest.mark.slow
def test_two_process_reflow_draws_different_batches_and_keeps_identical_weights(work, tmp_path):
    r0, r1 = launch(tmp_path / "rank", "instaflow_reflow", _reflow_args(work, tmp_path / "ddp", 3), timeout=240).values()
    assert r0["world"] == r1["world"] == 2
    assert len(r0["batches"]) == 3 and not set(r0["batches"]) & set(r1["batches"])     # each rank its own batches
    assert r0["weights"] == r1["weights"]                                             # gradients were averaged
    config = json.loads((tmp_path / "ddp" / "checkpoint" / "config.json").read_text())
    assert config["world_size"] == 2 and config["step"] == 3
    assert (tmp_path / "ddp" / "pipeline" / "model_index.json").is_file()
