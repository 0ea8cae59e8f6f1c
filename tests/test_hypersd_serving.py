"""Hyper-SD at Stable Diffusion scale: the serving path and the cost rows. One LoRA for every step count: a LoRA
student of the tiny SD pipeline, exported by the course (scale.export.export_student: diffusers and kohya keys,
base.json), loads with a plain
`pipe.load_lora_weights` into a StableDiffusionPipeline and samples with diffusers' TCDScheduler (eta = TCD's
gamma) at 1, 2, 4 and 8 steps equal to the course's TCD sampler (distill.tcd.sss) on the same noise to 1e-4
relative; the course reloads the same export (sd.load_sd_model); the kohya file gives the same samples; a LoRA for
another base model is refused with a clear error. The cost rows of its stages are estimates from the
measured UNet call times, labelled as such. tests/test_tcd.py proves sss == TCDScheduler for the UNet
itself; this file adds the LoRA, the export and the pipeline around it."""
from __future__ import annotations

import pytest
import torch

from course_lib import sd as sdlib
from course_lib.distill import tcd
from course_lib.guidance import cfg as guided
from course_lib.scale import export
from course_lib.scale.common import SourceError
from conftest import save_tiny_sd

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
PROMPTS = ["a red circle", "two cats"]
REL_TOL = 1e-4


def _close(course: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL) -> None:
    scale = max(1.0, float(ref.abs().max()))
    err = float((course - ref).abs().max())
    assert err <= tol * scale, f"max |course - diffusers| = {err:.3g} on values up to {scale:.3g}"


@pytest.fixture(scope="module")
def served(tiny_sd_folder, tmp_path_factory):
    """A LoRA student of the tiny pipeline (r = 4, lora_B drawn non-zero so the adapter changes the UNet), exported
    by the course; the course's own reload of the export."""
    root = tmp_path_factory.mktemp("hypersd-serving")
    pieces = sdlib.load_sd(tiny_sd_folder)
    student = sdlib.add_lora(pieces.model, r=4, alpha=4.0, seed=0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in student.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    folder = export.export_student(pieces, student, root, {"stage": "hypersd-test"})
    reloaded, _ = sdlib.load_sd_model(folder)
    return {"root": root, "lora": folder, "sd": pieces, "student": student, "reloaded": reloaded}


def _pipe(base, lora):
    from diffusers import StableDiffusionPipeline, TCDScheduler

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora))                       # plain diffusers: no course code on this side
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(pipe, z1, n, gamma, seed, guidance_scale=1.0):
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=n, guidance_scale=guidance_scale, eta=gamma, latents=z1.clone(),
                    generator=torch.Generator().manual_seed(seed), output_type="latent").images


@pytest.mark.parametrize("n,gamma", [(1, 0.3), (2, 0.3), (4, 0.3), (8, 0.3), (4, 0.0), (8, 0.7)])
def test_the_exported_lora_in_plain_diffusers_with_tcd_scheduler_equals_the_course_sampler(served, tiny_sd_folder,
                                                                                           n, gamma):
    pipe = _pipe(tiny_sd_folder, served["lora"])
    z1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    theirs = _diffusers(pipe, z1, n, gamma, seed=7)
    assert pipe.scheduler.timesteps.tolist() == tcd.tcd_timesteps(n).tolist()
    pieces, student = served["sd"], served["reloaded"]
    cond = pieces.text(PROMPTS)
    ours = tcd.sss(student, z1.clone(), tcd.tcd_timesteps(n), student.process, torch.Generator().manual_seed(7),
                   gamma=gamma, cond=cond)
    _close(ours, theirs)
    # the comparison has teeth: the base UNet (adapter off) samples something else
    with sdlib.adapter_disabled(student):
        base = tcd.sss(student, z1.clone(), tcd.tcd_timesteps(n), student.process, torch.Generator().manual_seed(7),
                       gamma=gamma, cond=cond)
    assert float((base - ours).abs().max()) > 1e-2


def test_guided_sampling_and_the_in_memory_student_agree_too(served, tiny_sd_folder):
    """With classifier-free guidance (guidance_scale = 1 + w, the course's guidance.cfg) and for the student as
    trained (in memory, before the export), 4 steps."""
    pipe = _pipe(tiny_sd_folder, served["lora"])
    z1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    w = 2.0
    theirs = _diffusers(pipe, z1, 4, 0.3, seed=8, guidance_scale=1 + w)
    cond = served["sd"].text(PROMPTS)
    for model in (served["student"], served["reloaded"]):
        ours = tcd.sss(guided(model, w), z1.clone(), tcd.tcd_timesteps(4), model.process,
                       torch.Generator().manual_seed(8), gamma=0.3, cond=cond)
        _close(ours, theirs)


def test_the_kohya_file_and_the_checked_pipeline_sample_the_same(served, tiny_sd_folder):
    z1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    ref = _diffusers(_pipe(tiny_sd_folder, served["lora"]), z1, 2, 0.3, seed=1)
    kohya = _diffusers(_pipe(tiny_sd_folder, served["lora"] / export.KOHYA_FILE), z1, 2, 0.3, seed=1)
    _close(kohya, ref, 1e-5)
    checked = export.tcd_pipeline(tiny_sd_folder, served["lora"])
    checked.set_progress_bar_config(disable=True)
    assert type(checked.scheduler).__name__ == "TCDScheduler"
    _close(_diffusers(checked, z1, 2, 0.3, seed=1), ref, 1e-6)


def test_a_lora_for_another_base_model_is_refused(served, tmp_path):
    other = save_tiny_sd(tmp_path / "other", seed=1)           # the same architecture, other weights
    with pytest.raises(SourceError, match="trained on another base model"):
        export.tcd_pipeline(other, served["lora"])
    from course_lib import minisd                               # another architecture (64-d text, other blocks)
    with pytest.raises(SourceError, match="another base model"):
        export.tcd_pipeline(minisd.MINI_SD, served["lora"])


# ----------------------------------------------------------------------------------------------------------------
# The cost rows of Hyper-SD's stages on SD 1.5: estimates from the measured UNet call times, labelled as such
# ----------------------------------------------------------------------------------------------------------------

def test_hypersd_cost_rows_are_estimates_from_the_measured_lcm_lora_rows(capsys):
    import json
    from pathlib import Path

    from course_lib.scale import cost

    table = Path(__file__).resolve().parents[1] / "docs" / "results" / "cost_table_h200.json"
    rows = json.loads(table.read_text())["rows"]
    u = cost.unet_call_times(rows)
    assert 0 < u["forward_no_grad"] < u["student_forward_backward"]
    est = cost.hypersd_estimates(rows)
    assert [r["stage"] for r in est][:4] == list(cost.HYPERSD_STAGES) and est[-1]["stage"] == "reward (ReFL)"
    assert all(r["estimate"] and r["status"] == "estimate" for r in est)
    # scale.hypersd's stages (no adversarial term) make LCD's calls: the estimate gives back the measured LCM-LoRA row
    lcd = next(r for r in rows if r["method"] == "lcm-lora" and r["online_steps"] == 0)
    tscd = est[0]
    assert tscd["seconds_per_sample"] == pytest.approx(lcd["seconds_per_step"] / lcd["batch_size_per_gpu"])
    adversarial = next(r for r in est if "adversarial" in r["stage"])
    assert adversarial["seconds_per_sample"] > tscd["seconds_per_sample"]
    assert tscd["wall_hours_per_1000_iterations"]["8"] == pytest.approx(tscd["gpu_hours_per_1000_iterations"] / 8)
    assert est[-1]["lower_bound"]
    cost.main(["--hypersd-estimates", str(table)])                  # no GPU needed
    out = capsys.readouterr().out
    rows_printed = [line.split("|")[1] for line in out.splitlines() if line.startswith("| ")]
    assert "ESTIMATES, not measured" in out and ">= " in out
    assert sum(cell.endswith("(estimate) ") for cell in rows_printed) == len(est)
    with pytest.raises(ValueError, match="both measured LCM-LoRA rows"):
        cost.hypersd_estimates([r for r in rows if r["method"] != "lcm-lora"])
