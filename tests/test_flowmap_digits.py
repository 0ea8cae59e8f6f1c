"""Flow maps on images: the finite-difference tangent against torch.func.jvp (MLP2D, the course UNet with attention,
diffusers' UNet2DConditionModel) and the vp flow map read in rf time (flowmap.RFFlowMap). The digits rows of
`bench flowmap` (bench.flowmap_digits) are tested with the benchmark's rows in test_bench_flowmap.py.

Truth: the float64 JVP of a float64 copy of each model; the teacher's DDIM step (a copied flow-map student's jump).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import tiny_unet
from course_lib import samplers
from course_lib.conditioning import Cond, labels
from course_lib.distill import flowmap as fm
from course_lib.models import MLP2D, Denoiser, flow_map_student
from course_lib.processes import RectifiedFlow, VPCosine

RF, VP = RectifiedFlow(), VPCosine()
TOL = 2e-2           # relative error of the float32 FD tangent at FD_H (measured: 1e-3 to 7e-3)


def _flow_map(net: nn.Module, process=RF, kind="velocity") -> Denoiser:
    student = flow_map_student(Denoiser(net, process, kind))
    torch.manual_seed(1)
    for p in student.parameters():                   # the step embedding too: u depends on r
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.1)
    return student


def _meanflow_case(model, shape, cond=None, n=6):
    g = torch.Generator().manual_seed(0)
    t = 0.2 + 0.7 * torch.rand(n, generator=g)
    r = (t - 0.1) * torch.rand(n, generator=g)
    return torch.randn(n, *shape, generator=g), t, r, torch.randn(n, *shape, generator=g)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("case", ["mlp2d", "unet-attention"])
def test_the_fd_meanflow_target_is_the_jvp_one_within_tolerance_and_not_at_a_coarse_h(case):
    """MeanFlow's u_tgt with the finite-difference tangent (fd_h = FD_H) agrees with the exact JVP's (float64 model,
    float64 JVP) to TOL on a flow-map MLP2D and a flow-map course UNet with attention; at h = 1e-2 it does not (the
    time embedding of 1000 t turns in dt ~ 1e-3)."""
    if case == "mlp2d":
        torch.manual_seed(0)
        model, shape, cond = _flow_map(MLP2D(hidden=32, depth=2)), (2,), None
    else:
        model, shape = _flow_map(tiny_unet(num_classes=3, attention=True)), (1, 8, 8)
        cond = labels(torch.arange(6) % 3, 3)
    z, t, r, v = _meanflow_case(model, shape, cond)
    m64 = copy.deepcopy(model).double()
    _, exact = fm.meanflow_target(m64, z.double(), t.double(), r.double(), v.double(), cond)
    _, fd = fm.meanflow_target(model, z, t, r, v, cond, fd_h=fm.FD_H)
    _, jvp32 = fm.meanflow_target(model, z, t, r, v, cond)
    _, coarse = fm.meanflow_target(model, z, t, r, v, cond, fd_h=1e-2)
    assert _rel(jvp32, exact) < 1e-4
    assert _rel(fd, exact) < TOL
    assert _rel(coarse, exact) > 3 * TOL


def test_the_fd_meanflow_target_is_one_sided_at_r_equal_t_and_v_there():
    """With r = t (the flow-matching samples) and t - r < h the backward step stops at the diagonal: no flow-map
    call at t < r, and the target is v where r = t."""
    torch.manual_seed(0)
    model = _flow_map(MLP2D(hidden=32, depth=2))
    z, t, _, v = _meanflow_case(model, (2,))
    r = torch.cat([t[:3], t[3:] - 3e-5])
    u, tgt = fm.meanflow_target(model, z, t, r, v, fd_h=fm.FD_H)
    assert torch.isfinite(tgt).all()
    torch.testing.assert_close(tgt[:3], v[:3])
    _, exact = fm.meanflow_target(model, z, t, r, v)
    torch.testing.assert_close(tgt, exact, atol=1e-3, rtol=1e-3)


def test_the_fd_scm_tangent_is_the_jvp_one_within_tolerance():
    """sCM's normalised tangent g with fd_h = FD_H agrees with the exact JVP's on a vp-cosine UNet."""
    torch.manual_seed(0)
    model = Denoiser(tiny_unet(num_classes=3, attention=True), VP, "v")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 8, 8, generator=g)
    t = fm.scm_times(6, g, VP, *fm.SCD_TIME)
    x = VP.marginal(x0, t, torch.randn(6, 1, 8, 8, generator=g))
    cond = labels(torch.arange(6) % 3, 3)
    dxdphi = torch.randn(6, 1, 8, 8, generator=g)
    m64 = copy.deepcopy(model).double()
    _, exact = fm.scm_tangent(m64, x.double(), t.double(), dxdphi.double(), cond, c=None)
    _, fd = fm.scm_tangent(model, x, t, dxdphi, cond, c=None, fd_h=fm.FD_H)
    assert _rel(fd, exact) < TOL


def test_the_fd_tangent_runs_through_diffusers_attention_and_equals_the_jvp():
    """Through diffusers' UNet2DConditionModel (the tiny test pipeline's, cross-attention through SDPA): the exact
    JVP (math attention kernel) and the FD tangent (the default kernels) agree to TOL against the float64 JVP."""
    from course_lib.sd import from_pipeline, tiny_sd_pipeline

    model = from_pipeline(tiny_sd_pipeline()).model
    g = torch.Generator().manual_seed(0)
    cond = Cond(text=torch.randn(4, 16, 32, generator=g))
    x, v = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = 0.2 + 0.7 * torch.rand(4, generator=g)
    f = lambda m: (lambda x_, t_: m(x_, t_, cond).eps)
    m64 = copy.deepcopy(model).double()
    exact = fm.directional_derivative(f(m64), (x.double(), t.double()), (v.double(), torch.ones(4).double()))[1]
    errs = fm.fd_tangent_error(f(model), (x, t), (v, torch.ones(4)), (fm.FD_H, 1e-2), exact)
    assert errs[fm.FD_H] < TOL < errs[1e-2]


def test_a_vp_flow_map_read_in_rf_time_jumps_like_the_teachers_ddim_step():
    """flowmap.RFFlowMap(flow_map_student(vp teacher)): its rf jump t -> s (flow-map sampler on a grid) is the
    teacher's DDIM step on the vp grid of the same SNRs, divided by the vp scale sqrt((1 - s)^2 + s^2)."""
    teacher = Denoiser(tiny_unet(num_classes=3), VP, "v")
    student = fm.RFFlowMap(flow_map_student(teacher)).eval()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 1, 8, 8, generator=g)
    cond = labels(torch.arange(4) % 3, 3)
    ts = torch.tensor([1.0, 0.6, 0.25, 0.0], dtype=torch.float64)
    with torch.no_grad():
        got = samplers.flow_map(student, x1, ts, RF, cond=cond)
        want = samplers.ddim(teacher, x1, student.vp_time(ts), VP, cond=cond)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert fm.is_flow_map(student) and isinstance(student.process, RectifiedFlow)
