"""MeanFlow on the mini Stable Diffusion (recipes.flowmap_minisd): the flow-map student starts as the teacher, the
plain diffusers pipeline samples exactly the course's flow-map sampler, the recipe's step runs and resumes bit for
bit, SD's schedule read in rf time, and the shipped LoRA loads.

Truth: diffusers' own StableDiffusionPipeline and get_guidance_scale_embedding; the teacher's own DDIM step; an
uninterrupted run of the same recipe; the processes' closed forms."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import interrupt_on_call
from course_lib import grids, minisd, samplers, sd as sdlib, steps
from course_lib.conditioning import with_end_time
from course_lib.distill import flowmap as fm
from course_lib.distill.reflow import RFView
from course_lib.models import is_flow_map
from course_lib.processes import SDDiscrete
from course_lib.recipes import flowmap_minisd as R

PROMPTS = ["a red handwritten seven", "the digit 3 in thick blue ink", "a 0", "a thin green four"]
REL_TOL = 1e-4


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = REL_TOL) -> None:
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"max difference {err:.3g} on values up to {scale:.3g}"


def test_sd_schedule_inverse_log_snr_and_rf_view():
    """SDDiscrete.t_from_log_snr inverts its interpolated log-SNR; RFView of an SD model returns the model's own
    prediction at the vp state of the same (x0, eps), and its rf times end at sigma / (alpha + sigma) of t = 1."""
    p = SDDiscrete()
    t = torch.cat([torch.rand(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                   torch.tensor([1e-4, 1e-3, 0.5, 1.0], dtype=torch.float64)])
    assert float((p.t_from_log_snr(p.log_snr(t)) - t).abs().max()) < 1e-12
    view = RFView(minisd.load_mini_sd().model)
    tau = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)
    t_rf = view.rf_time(tau)
    assert abs(float(t_rf[0]) - R.t_max(p)) < 1e-12 and float((view.vp_time(t_rf) - tau).abs().max()) < 1e-9


def test_step_embedding_is_the_pipelines_guidance_embedding():
    """sd.step_cond(d) equals diffusers' get_guidance_scale_embedding(guidance_scale - 1 = d / 1000): what the plain
    pipeline feeds a UNet with time_cond_proj_dim."""
    from diffusers import StableDiffusionPipeline

    d = torch.tensor([1000.0, 500.0, 250.0, 125.0])
    ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, d / 1000.0, embedding_dim=256)
    _close(sdlib.step_cond(d, 256), ref, 1e-6)


def test_flow_map_student_starts_as_the_teachers_ddim_step():
    """Before training the student's jump t -> s is the (unguided) teacher's DDIM step for every s, and the guided
    teacher is the base UNet with guidance (the adapter off, no step input)."""
    from course_lib import guidance

    mini = minisd.load_mini_sd()
    student = R.flow_map_lora(mini)
    assert is_flow_map(student) and is_flow_map(fm.RFFlowMap(student))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert "net.unet.time_embedding.cond_proj.weight" in trainable and all(
        "lora_" in n or "cond_proj" in n for n in trainable)
    cond = mini.text(PROMPTS)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, s = torch.full((4,), 0.8), torch.tensor([0.0, 0.2, 0.5, 0.8])
    with torch.no_grad():
        _close(steps.flow_map(student, x, t, s, student.process, cond),
               steps.ddim(mini.model, x, t, s, mini.model.process, cond))
        teacher = R.guided_teacher(student, 4.0)
        _close(teacher(x, t, with_end_time(cond, s)).eps, guidance.cfg(mini.model, 4.0)(x, t, cond).eps)


def _trained(tmp_path, name: str, train_steps: int = 2, interrupt: bool = False, monkeypatch=None):
    mini = minisd.load_mini_sd()
    cfg = R.MiniSDConfig(steps=train_steps, batch=4, ckpt_every=1,
                         meanflow=fm.MeanFlowConfig(lr=1e-2, ema_decay=0.0, fd_h=fm.SD_FD_H))
    return mini, R.train_minisd(mini, cfg, ckpt_dir=tmp_path / name, n_images=16, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(mini SD, a student after 3 updates at a large learning rate, its folder saved by R.save)."""
    tmp = tmp_path_factory.mktemp("fmsd")
    mini, (student, done) = _trained(tmp, "ref", 3)
    folder = R.save(student, tmp / "lora", {"test": True})
    return mini, student, done, folder


def test_the_recipe_step_trains_and_an_interrupted_run_resumes_bit_for_bit(trained, tmp_path, monkeypatch):
    """Three MeanFlow updates move the LoRA and the step projection; an interrupted run of the same call, rerun,
    ends with exactly the weights of the uninterrupted one (the engine's checkpoint of the LoRA and projection)."""
    _, ref, done, _ = trained
    assert done.updates["student"] == 3
    assert float(ref.unet.time_embedding.cond_proj.weight.abs().max()) > 0
    real = interrupt_on_call(monkeypatch, fm, "meanflow_loss", 2)
    with pytest.raises(KeyboardInterrupt):
        _trained(tmp_path, "int", 3)
    monkeypatch.setattr(fm, "meanflow_loss", real)
    _, (student, again) = _trained(tmp_path, "int", 3)
    assert again.updates["student"] == 3
    mine = {k: v for k, v in student.state_dict().items() if "lora_" in k or "cond_proj" in k}
    theirs = ref.state_dict()
    assert mine and all(torch.equal(v, theirs[k]) for k, v in mine.items())


@pytest.mark.parametrize("n", [1, 2, 4])
def test_plain_diffusers_pipeline_is_the_course_flow_map_sampler(trained, n):
    """The saved LoRA served by a plain StableDiffusionPipeline (R.pipeline, guidance_scale = 1 + 1/n) gives the
    latents of samplers.flow_map on SD's trailing grid, from the same noise, after the student trained (its step
    projection and LoRA are not zero), and R.load rebuilds the same student."""
    mini, student, _, folder = trained
    x1 = R.noise(mini, len(PROMPTS), seed=5)
    ours = R.sample_latents(mini, student, PROMPTS, n, x1.clone())
    pipe = R.pipeline(folder)
    _close(R.pipeline_sample(pipe, PROMPTS, n, x1.clone()), ours)
    loaded = R.load(minisd.load_mini_sd(), folder)
    _close(R.sample_latents(mini, loaded, PROMPTS, n, x1.clone()), ours, 1e-6)
    ddim = samplers.ddim(mini.model, x1.clone(), grids.sd_grid(n, mini.model.process, "trailing"),
                         mini.model.process, cond=mini.text(PROMPTS))
    assert float((ddim - ours).abs().max()) > 1e-3            # the student is not the teacher any more


def test_a_lora_of_another_base_is_refused(trained):
    _, _, _, folder = trained
    other = sdlib.from_pipeline(sdlib.tiny_sd_pipeline(seed=0))
    with pytest.raises(ValueError, match="another base"):
        R.load(other, folder)


def test_shipped_flow_map_lora_loads_and_records_its_quality():
    mini = minisd.load_mini_sd()
    student = R.load_shipped(mini)
    assert is_flow_map(student) and student.lora is not None
    assert float(student.unet.time_embedding.cond_proj.weight.abs().max()) > 0
    meta = json.loads((R.shipped_dir() / R.FLOWMAP_JSON).read_text())
    got = meta["evaluation"]["mean_std"]
    assert {"meanflow 1 steps", "meanflow 2 steps", "teacher DDIM 25 steps"} <= set(got)
