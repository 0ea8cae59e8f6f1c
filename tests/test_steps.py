"""Per-sample solver steps (course_lib.steps): equal to the grid samplers run sample by sample, differentiable,
and Heun's second evaluation only where the step does not end at t = 0."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from course_lib import grids, samplers, steps
from course_lib.conditioning import labels
from course_lib.models import Denoiser, MLP2D
from course_lib.processes import EDM, RectifiedFlow, SDDiscrete, VPCosine
from conftest import mlp_denoiser

F64 = torch.float64
PROCS = [VPCosine(), SDDiscrete(), RectifiedFlow(), EDM()]
_model = partial(mlp_denoiser, hidden=32, kind="eps")


def _per_sample_grids(n: int) -> torch.Tensor:
    """(B, n + 1) decreasing grids, a different one per sample; rows 0 and 2 end at t = 0, rows 1 and 3 above it."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for end in [0.0, 0.05, 0.0, 0.2]:
        inner = torch.sort(torch.rand(n - 1, generator=g, dtype=F64) * (0.95 - end) + end, descending=True).values
        rows.append(torch.cat([torch.tensor([0.7 + 0.3 * float(torch.rand(1, generator=g))], dtype=F64), inner,
                               torch.tensor([end], dtype=F64)]))
    return torch.stack(rows)


@pytest.mark.parametrize("proc", PROCS, ids=[p.name for p in PROCS])
@pytest.mark.parametrize("name", ["ddim", "euler", "heun"])
def test_per_sample_steps_equal_grid_samplers_run_sample_by_sample(proc, name):
    model, n = _model(proc).eval(), 3
    ts = _per_sample_grids(n)                                               # (4, n + 1)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * proc.sigma(ts[:, 0])[:, None]
    xb = x
    with torch.no_grad():
        for i in range(n):
            xb = steps.STEPS[name](model, xb, ts[:, i], ts[:, i + 1], proc)
        for b in range(4):
            ref = samplers.get_sampler(name)(model, x[b:b + 1], ts[b], proc)
            torch.testing.assert_close(xb[b:b + 1], ref, rtol=1e-12, atol=1e-12)


def test_heun_evaluates_the_corrector_only_where_s_is_not_zero():
    proc = RectifiedFlow()
    model = samplers.CountingModel(_model(proc).eval())
    x = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.5, 0.5, 0.3, 0.3], dtype=F64)
    steps.heun(model, x, t, torch.tensor([0.0, 0.2, 0.0, 0.1], dtype=F64), proc)
    assert model.rows == 4 + 2                                              # one full call, then the two rows with s > 0
    model.reset()
    steps.heun(model, x, t, torch.zeros(4, dtype=F64), proc)
    assert model.rows == 4 and model.calls == 1


def test_heun_passes_the_matching_labels_to_its_partial_second_call():
    proc = VPCosine()
    model = _model(proc, num_classes=3).eval()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=F64)
    s = torch.tensor([0.0, 0.5, 0.0, 0.3], dtype=F64)
    cond = labels(torch.tensor([0, 1, 2, 1]), 3)
    with torch.no_grad():
        got = steps.heun(model, x, t, s, proc, cond=cond)
        for b in range(4):
            ref = steps.heun(model, x[b:b + 1], t[b:b + 1], s[b:b + 1], proc, cond=cond[b:b + 1])
            torch.testing.assert_close(got[b:b + 1], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ddim", "euler", "heun"])
def test_gradients_flow_through_a_step_into_the_model_parameters(name):
    proc = VPCosine()
    torch.manual_seed(0)
    model = Denoiser(MLP2D(hidden=16, depth=2), proc, "eps")
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(3))
    t = torch.linspace(0.9, 0.4, 6)
    s = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.0])
    out = steps.STEPS[name](model, x, t, s, proc)
    out.pow(2).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # and the gradient is right: compare d out / d (output bias) with finite differences
    bias = model.net.out.bias
    g_auto = bias.grad.clone()
    h = 1e-3
    with torch.no_grad():
        fd = []
        for k in range(2):
            bias[k] += h
            up = steps.STEPS[name](model, x, t, s, proc).pow(2).sum()
            bias[k] -= 2 * h
            down = steps.STEPS[name](model, x, t, s, proc).pow(2).sum()
            bias[k] += h
            fd.append(float(up - down) / (2 * h))
    torch.testing.assert_close(g_auto, torch.tensor(fd), rtol=2e-2, atol=2e-2)


def test_steps_accept_float_times_and_keep_bf16_data_bf16():
    proc = SDDiscrete()
    model = _model(proc).eval().bfloat16()
    x = torch.randn(3, 2).bfloat16()
    out = steps.ddim(model, x, 0.75, 0.5, proc)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_grid_samplers_are_built_from_the_steps():
    # the exported DDIM update used by checkers and PD is the one steps.ddim applies
    proc = VPCosine()
    model = _model(proc).eval()
    x = torch.randn(5, 2, dtype=F64)
    t, s = torch.full((5,), 0.8, dtype=F64), torch.full((5,), 0.3, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(steps.ddim(model, x, t, s, proc), samplers.ddim_step(model(x, t), t, s, proc),
                                   rtol=0, atol=0)
        torch.testing.assert_close(steps.ddim(model, x, t, s, proc),
                                   samplers.ddim(model, x, torch.tensor([0.8, 0.3], dtype=F64), proc), rtol=0, atol=0)
    assert samplers.ddim_step is steps.ddim_step
    assert grids.uniform(2).dtype == F64
