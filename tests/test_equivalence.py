"""The course's samplers against diffusers' schedulers, on the same randomly initialised tiny UNet.

Reference implementation second (after the analytic tests in test_samplers.py): the course's stateless samplers
on course grids must reproduce diffusers' `scheduler.step` loops. Tolerance: max |course - diffusers| <= 1e-4 *
max(1, max |diffusers|). With a random UNet, the SD schedule's x0 = (x - sigma eps) / alpha at alpha_999 ~ 0.07
gives final values of magnitude ~10-50, so the bound is relative to the output's scale; the differences seen are
~1e-5 absolute (float32 time inputs and diffusers' float32 alphas_cumprod).
"""
from __future__ import annotations

import pytest
import torch

from course_lib import grids, samplers
from course_lib.models import Denoiser, DiffusersUNet
from course_lib.processes import RectifiedFlow, SDDiscrete

SD_KW = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                      layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return net.eval()


@pytest.fixture(scope="module")
def x1():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _close(course: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, float(ref.abs().max()))
    err = float((course - ref).abs().max())
    assert err <= REL_TOL * scale, f"max |course - diffusers| = {err:.3g} on values up to {scale:.3g}"


@torch.no_grad()
def _diffusers_loop(unet, scheduler, x, n):
    scheduler.set_timesteps(n)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # 1 for all three schedulers used here
    for t in scheduler.timesteps:
        out = unet(x, t).sample  # (scale_model_input is the identity for DDIM, DPM-Solver and flow matching)
        x = scheduler.step(out, t, x).prev_sample
    return x


def test_the_tiny_unet_is_not_degenerate(unet, x1):
    # equivalence on a model that outputs ~0 would prove little
    with torch.no_grad():
        out = unet(x1, torch.tensor([500, 20])).sample
    assert out.std() > 0.05
    assert (out[0] - out[1]).abs().max() > 0.05


# diffusers' DDIM steps from timestep t to t - T // n. With "leading" spacing that is always the next listed
# timestep; with "trailing" spacing it is only when n divides T = 1000 (n = 3 lists 999, 666, 332 but steps
# 999 -> 666 -> 333). The course grid always steps to the next listed time, so trailing is compared for n | 1000.
@pytest.mark.parametrize("spacing, n", [("leading", 1), ("leading", 4), ("leading", 10), ("leading", 13),
                                        ("trailing", 4), ("trailing", 10)])
@pytest.mark.parametrize("prediction_type, kind", [("epsilon", "eps"), ("v_prediction", "v")])
def test_ddim_matches_diffusers(unet, x1, spacing, n, prediction_type, kind):
    from diffusers import DDIMScheduler

    proc = SDDiscrete()
    sched = DDIMScheduler(**SD_KW, set_alpha_to_one=True, clip_sample=False, timestep_spacing=spacing,
                          prediction_type=prediction_type)
    ref = _diffusers_loop(unet, sched, x1, n)
    course = samplers.ddim(Denoiser(DiffusersUNet(unet), proc, kind), x1, grids.sd_grid(n, proc, spacing), proc)
    assert course.shape == ref.shape and course.dtype == ref.dtype
    _close(course, ref)


def test_ddim_comparison_detects_a_wrong_grid(unet, x1):
    # the same comparison fails when the course samples on the other spacing: the tolerance is meaningful
    from diffusers import DDIMScheduler

    proc = SDDiscrete()
    ref = _diffusers_loop(unet, DDIMScheduler(**SD_KW, clip_sample=False, timestep_spacing="leading"), x1, 4)
    wrong = samplers.ddim(Denoiser(DiffusersUNet(unet), proc, "eps"), x1, grids.sd_grid(4, proc, "trailing"), proc)
    with pytest.raises(AssertionError):
        _close(wrong, ref)


@pytest.mark.parametrize("n", [1, 2, 5, 12, 20])
def test_dpm_solver_pp_2m_matches_diffusers(unet, x1, n):
    from diffusers import DPMSolverMultistepScheduler

    proc = SDDiscrete()
    sched = DPMSolverMultistepScheduler(**SD_KW, algorithm_type="dpmsolver++", solver_order=2)
    ref = _diffusers_loop(unet, sched, x1, n)
    model = Denoiser(DiffusersUNet(unet), proc, "eps")
    course = samplers.dpm_solver_pp_2m(model, x1, grids.sd_grid(n, proc, "linspace"), proc)
    _close(course, ref)
    if n >= 5:  # second order really is used: DDIM on the same grid lands elsewhere
        first_order = samplers.ddim(model, x1, grids.sd_grid(n, proc, "linspace"), proc)
        assert float((first_order - ref).abs().max()) > 100 * REL_TOL * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("n", [1, 3, 8])
def test_flow_match_euler_matches_diffusers(unet, x1, n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    proc = RectifiedFlow()
    ref = _diffusers_loop(unet, FlowMatchEulerDiscreteScheduler(), x1, n)
    model = Denoiser(DiffusersUNet(unet), proc, "velocity")
    _close(samplers.euler(model, x1, grids.flow_match_grid(n), proc), ref)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_flow_match_euler_with_shift_matches_diffusers_on_its_own_sigmas(unet, x1, n):
    """The Euler update itself, with shift = 3, on the scheduler's own sigmas (the course's shifted grid differs
    from diffusers' for n > 1: see test_samplers.py::test_flow_match_grid_with_shift_matches_diffusers)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    proc = RectifiedFlow()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref = _diffusers_loop(unet, sched, x1, n)
    model = Denoiser(DiffusersUNet(unet), proc, "velocity")
    _close(samplers.euler(model, x1, sched.sigmas.to(torch.float64), proc), ref)


@pytest.mark.parametrize("n", [3, 8])
def test_flow_match_euler_with_shift_matches_diffusers_on_the_course_grid(unet, x1, n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    proc = RectifiedFlow()
    ref = _diffusers_loop(unet, FlowMatchEulerDiscreteScheduler(shift=3.0), x1, n)
    model = Denoiser(DiffusersUNet(unet), proc, "velocity")
    _close(samplers.euler(model, x1, grids.flow_match_grid(n, shift=3.0), proc), ref)
