"""Flow maps (distill.flowmap): the end time in the conditioning, flow-map backbones, the flow-map sampler, MeanFlow's
and the shortcut models' targets, and the exact flow map of the 2D mixtures.

Truth: a central finite difference for MeanFlow's JVP; the closed-form flow map of a single Gaussian
(data2d.gaussian_flow_map) for the MeanFlow identity, the shortcut target and the exact ODE solve; a finer solve on
the 8-Gaussian mixture.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import interrupt_on_call, tiny_unet
from course_lib import samplers, steps
from course_lib.conditioning import Cond, backbone_inputs, labels, with_end_time
from course_lib.data2d import GaussianMixture, gaussian_flow_map, gmm8
from course_lib.distill import flowmap as fm
from course_lib.models import (MLP2D, Denoiser, flow_map_student, is_flow_map, load_denoiser, load_model, save_denoiser,
                               save_model)
from course_lib.predictions import Pred, velocity
from course_lib.processes import RectifiedFlow, VPCosine

F64 = torch.float64
RF = RectifiedFlow()
GAUSS = GaussianMixture(torch.ones(1), torch.tensor([[0.7, -0.4]]), torch.tensor([[[0.5, 0.2], [0.2, 0.3]]]))


def _teacher(process=RF, kind="velocity", num_classes=None, seed=0, dtype=F64) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(MLP2D(hidden=32, depth=2, num_classes=num_classes), process, kind).to(dtype)


def _flow_map(seed=0, process=RF, kind="velocity", dtype=F64, num_classes=None) -> Denoiser:
    """A flow-map MLP2D whose step embedding is random (its output depends on s)."""
    student = flow_map_student(_teacher(process, kind, num_classes, seed)).to(dtype)
    torch.manual_seed(seed + 1)
    nn.init.normal_(student.net.step_emb.mlp[2].weight, std=0.3)
    return student


class GaussFlowMap:
    """The exact flow map of one Gaussian (closed form) as a flow-map model: its DDIM jump t -> s is X(x, t -> s)."""

    def __init__(self, mixture=GAUSS, process=RF):
        self.mixture, self.process = mixture, process
        self.denoiser = mixture.denoiser(process)

    def __call__(self, x, t, cond=None):
        s = cond.s
        X = gaussian_flow_map(self.mixture, x, t, s, self.process)
        return fm.jump_pred(x, X, t, s, self.process, self.denoiser(x, t))


def _points(n=16, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    t = 0.1 + 0.85 * torch.rand(n, generator=g, dtype=dtype)
    r = t * torch.rand(n, generator=g, dtype=dtype)
    return torch.randn(n, 2, generator=g, dtype=dtype), t, r


# ================================================================================================================
# the end time in the conditioning
# ================================================================================================================

def test_cond_s_is_batched_kept_by_null_and_drop_and_reaches_backbones_as_end_time():
    s = torch.linspace(0, 0.5, 6)
    c = Cond(y=torch.arange(6) % 3, null_y=3, s=s)
    assert torch.equal(c[2:].s, s[2:]) and torch.equal(c[1].s, s[1:2]) and len(Cond(s=s)) == 6
    assert torch.equal(Cond.cat([c[:2], c[2:]]).s, s)
    assert c.null().s is s and c.drop(1.0, torch.Generator().manual_seed(0)).s is s
    assert c.to(dtype=torch.bfloat16).s.dtype == torch.float32                      # a time stays float32
    assert backbone_inputs(c)["end_time"] is s and "end_time" not in backbone_inputs(labels(c.y, 3))
    assert with_end_time(None, s).s is s and with_end_time(c, None).s is None and with_end_time(None, None) is None
    with pytest.raises(ValueError, match="per sample"):
        Cond(s=torch.tensor(0.5))
    with pytest.raises(ValueError, match="one batch size"):
        Cond(y=torch.arange(3), null_y=3, s=s)


# ================================================================================================================
# flow-map backbones
# ================================================================================================================

@pytest.mark.parametrize("num_classes", [None, 4])
def test_a_flow_map_mlp_copied_from_its_teacher_is_the_teacher_for_every_s(num_classes):
    teacher = _teacher(num_classes=num_classes, kind="v", process=VPCosine())
    student = flow_map_student(teacher).to(F64)
    x, t, _ = _points()
    cond = None if num_classes is None else labels(torch.arange(16) % 4, 4)
    want = teacher(x, t, cond)
    for s in (t, 0.5 * t, torch.zeros_like(t)):
        got = student(x, t, with_end_time(cond, s))
        assert torch.equal(got.x0, want.x0) and torch.equal(got.eps, want.eps)
    assert is_flow_map(student) and not is_flow_map(teacher)
    assert student.config()["net"]["flow_map"] is True and "flow_map" not in teacher.config()["net"]
    # the step embedding is wired in: once it is not zero, the prediction depends on s (and not at s = t alone)
    nn.init.normal_(student.net.step_emb.mlp[2].weight)
    assert not torch.allclose(student(x, t, with_end_time(cond, 0.5 * t)).x0, want.x0)


def test_flow_map_inputs_are_never_silently_dropped_or_defaulted():
    teacher, student = _teacher(), _flow_map()
    x, t, r = _points()
    with pytest.raises(ValueError, match="not a flow map"):
        teacher(x, t, Cond(s=r))
    with pytest.raises(ValueError, match="needs the end time"):
        student(x, t)
    with pytest.raises(ValueError, match="earlier time"):
        student(x, t, Cond(s=t + 0.01))
    with pytest.raises(ValueError, match="no flow map"):
        GAUSS.denoiser(RF)(x, t, Cond(s=r))
    with pytest.raises(ValueError, match="already a flow map"):
        flow_map_student(student)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_a_flow_map_unet_copied_from_its_teacher_is_the_teacher(num_classes):
    teacher = Denoiser(tiny_unet(num_classes=num_classes), RF, "velocity")
    student = flow_map_student(teacher)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g)
    cond = None if num_classes is None else labels(torch.tensor([0, 2, 3]), 3)
    want = teacher(x, t, cond).x0
    assert torch.equal(student(x, t, with_end_time(cond, 0.3 * t)).x0, want)
    with pytest.raises(ValueError, match="needs the end time"):
        student(x, t, cond)
    with pytest.raises(ValueError, match="not a flow map"):
        teacher(x, t, with_end_time(cond, t))


def test_a_guided_flow_map_unet_packs_label_weight_and_step():
    net = tiny_unet(num_classes=3, guidance_range=(0.0, 4.0), flow_map=True)
    keys = set(net.state_dict())
    assert "unet.class_embedding.weight" in keys                                     # a teacher's table loads
    assert any(k.startswith("unet.class_embedding.guidance.") for k in keys)
    assert any(k.startswith("unet.class_embedding.step.") for k in keys)
    x = torch.randn(2, 1, 8, 8)
    out = net(x, torch.tensor([500.0, 800.0]), torch.tensor([0, 1]), guidance=torch.tensor([1.0, 2.0]),
              end_time=torch.tensor([100.0, 800.0]))
    assert out.shape == x.shape


def test_time_scale_multiplies_the_time_inputs_and_is_saved_only_when_set():
    torch.manual_seed(0)
    small = MLP2D(hidden=16, depth=2, flow_map=True, time_scale=0.01)
    plain = MLP2D(hidden=16, depth=2, flow_map=True)
    plain.load_state_dict(small.state_dict())
    x, ts, te = torch.randn(3, 2), torch.tensor([900.0, 500.0, 20.0]), torch.tensor([100.0, 500.0, 0.0])
    torch.testing.assert_close(small(x, ts, end_time=te), plain(x, 0.01 * ts, end_time=0.01 * te))
    assert small.config()["time_scale"] == 0.01 and "time_scale" not in plain.config()
    assert MLP2D(**small.config()).time_scale == 0.01
    unet = tiny_unet(time_scale=0.01)
    assert unet.config()["time_scale"] == 0.01 and "time_scale" not in tiny_unet().config()


@pytest.mark.parametrize("arch", ["mlp2d", "unet"])
def test_a_flow_map_saves_and_loads(tmp_path, arch):
    if arch == "mlp2d":
        model, x = _flow_map(dtype=torch.float32), torch.randn(4, 2)
    else:
        model, x = flow_map_student(Denoiser(tiny_unet(num_classes=3), RF, "velocity")), torch.randn(4, 1, 8, 8)
        nn.init.normal_(model.net.unet.class_embedding.step.mlp[2].weight, std=0.1)
    t = torch.rand(4)
    cond = Cond(s=0.5 * t) if arch == "mlp2d" else with_end_time(labels(torch.arange(4) % 3, 3), 0.5 * t)
    save_model(tmp_path / "m", model)
    save_denoiser(tmp_path / "d", model)
    for loaded in (load_model(tmp_path / "m")[0], load_denoiser(tmp_path / "d")[0]):
        assert is_flow_map(loaded)
        assert torch.equal(loaded(x, t, cond).x0, model(x, t, cond).x0)


# ================================================================================================================
# the flow-map sampler
# ================================================================================================================

def test_flow_map_sampler_takes_the_models_jumps():
    model = _flow_map()
    x, _, _ = _points()
    one = samplers.flow_map(model, x, torch.tensor([1.0, 0.0], dtype=F64), RF)
    t1, t0 = torch.ones(16, dtype=F64), torch.zeros(16, dtype=F64)
    pred = model(x, t1, Cond(s=t0))
    torch.testing.assert_close(one, pred.x0)                                           # rf: X(t -> 0) = x0_hat
    torch.testing.assert_close(one, x - (t1 - t0)[:, None] * (pred.eps - pred.x0))     # x - (t - s) u
    ts = torch.tensor([1.0, 0.6, 0.25, 0.0], dtype=F64)
    path = samplers.flow_map(model, x, ts, RF, return_path=True)
    assert path.shape == (4, 16, 2)
    for i in range(3):
        torch.testing.assert_close(path[i + 1], steps.flow_map(model, path[i], ts[i], ts[i + 1], RF))
    cond = labels(torch.arange(16) % 4, 4)
    classy = _flow_map(num_classes=4)
    want = steps.ddim_step(classy(x, t1, with_end_time(cond, t0)), t1, t0, RF)
    torch.testing.assert_close(samplers.flow_map(classy, x, ts[[0, -1]], RF, cond=cond), want)


# ================================================================================================================
# MeanFlow
# ================================================================================================================

def test_meanflow_target_is_v_minus_t_minus_r_times_a_finite_difference_of_u():
    model = _flow_map()
    x, t, r = _points()
    v = torch.randn_like(x)
    u, u_tgt = fm.meanflow_target(model, x, t, r, v)
    h = 1e-7                                  # timestep 1000 t: sin(1000 t) needs a small step
    with torch.no_grad():
        du_dt = (fm.average_velocity(model, x + h * v, t + h, r) - fm.average_velocity(model, x - h * v, t - h, r)) / (2 * h)
        assert torch.equal(u, fm.average_velocity(model, x, t, r))
    want = v - (t - r)[:, None] * du_dt
    torch.testing.assert_close(u_tgt, want, rtol=0, atol=1e-6)
    assert not u_tgt.requires_grad and u.requires_grad
    wrong_sign = v + (t - r)[:, None] * du_dt
    assert (wrong_sign - want).abs().max() > 1e-2                                     # the test can tell the sign


def test_the_meanflow_identity_holds_for_the_exact_average_velocity():
    """u(z_t, r, t) = (z_t - X(z_t, t -> r)) / (t - r) of one Gaussian, with v the exact (marginal) velocity, is its
    own MeanFlow target; the conditional velocity eps - x0 is not (it agrees only on average)."""
    exact, denoiser = GaussFlowMap(), GAUSS.denoiser(RF)
    x, t, r = _points()
    u_exact = (x - gaussian_flow_map(GAUSS, x, t, r, RF)) / (t - r)[:, None]
    torch.testing.assert_close(fm.average_velocity(exact, x, t, r), u_exact)
    v = velocity(denoiser(x, t), t, RF)
    u, u_tgt = fm.meanflow_target(exact, x, t, r, v)
    torch.testing.assert_close(u_tgt, u_exact, rtol=0, atol=1e-10)
    # the loss: zero when distilling the exact teacher's velocity, not from scratch
    exact.process = RF
    g = torch.Generator().manual_seed(1)
    x0 = GAUSS.sample(16, g, dtype=F64)[0]
    eps = torch.randn(16, 2, generator=g, dtype=F64)
    distilled = fm.meanflow_loss(exact, x0, eps, t, r, teacher=denoiser, p=0.0)
    assert distilled.shape == (16,) and distilled.max() < 1e-18
    assert fm.meanflow_loss(exact, x0, eps, t, r, p=0.0).min() > 1e-6


def test_meanflow_loss_is_the_adaptively_weighted_squared_error_with_the_weight_stopped():
    model = _flow_map()
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(8, 2, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64)
    t, r = (v.to(F64) for v in fm.meanflow_times(8, g, ratio=0.5))
    z = RF.marginal(x0, t, eps)
    u, u_tgt = fm.meanflow_target(model, z, t, r, eps - x0)
    sq = (u - u_tgt).pow(2).sum(1)
    plain = fm.meanflow_loss(model, x0, eps, t, r, p=0.0)
    torch.testing.assert_close(plain, sq)
    weighted = fm.meanflow_loss(model, x0, eps, t, r, p=1.0, c=1e-3)
    torch.testing.assert_close(weighted, sq / (sq + 1e-3))
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(weighted.sum(), params)
    want = torch.autograd.grad((sq / (sq.detach() + 1e-3)).sum(), params)               # sg(w) ||err||^2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="rectified-flow"):
        fm.meanflow_loss(_flow_map(process=VPCosine(), kind="v"), x0, eps, t, r)


def test_meanflow_times_are_sorted_logit_normal_pairs():
    t, r = fm.meanflow_times(20000, torch.Generator().manual_seed(0), ratio=0.25)
    assert ((0 < r) & (r <= t) & (t < 1)).all()
    assert abs(float((r < t).float().mean()) - 0.25) < 0.02
    # r = t samples keep the larger of the two logit-normal draws: its median is above sigmoid(-0.4)
    assert float(t.median()) > float(torch.sigmoid(torch.tensor(-0.4)))


@pytest.mark.parametrize("mean, std", [(fm.MF_TIME_MEAN, fm.MF_TIME_STD), (0.0, 1.6)], ids=["paper", "course-2d"])
def test_meanflow_times_reach_t_near_one_as_the_logit_normal_says(mean, std):
    """t is the larger of two draws sigmoid(mean + std n): P(t > 0.9) = 1 - Phi((logit 0.9 - mean) / std)^2, about
    0.9% for the paper's lognorm(-0.4, 1) and 16% for the course's 2D proposal (recipes.flowmap.MF_TIME_2D), where
    every one-step sample starts at t = 1."""
    from course_lib.recipes.flowmap import MF_TIME_2D

    assert MF_TIME_2D == (0.0, 1.6)
    n = 200_000
    t, _ = fm.meanflow_times(n, torch.Generator().manual_seed(1), mean=mean, std=std)
    z = (torch.log(torch.tensor(9.0, dtype=torch.float64)) - mean) / std
    p = float(1 - (0.5 * (1 + torch.erf(z / 2 ** 0.5))) ** 2)
    assert float((t > 0.9).double().mean()) == pytest.approx(p, abs=5 * (p * (1 - p) / n) ** 0.5)    # 5 std errors


def test_meanflow_runs_through_the_unet_with_forward_mode():
    model = flow_map_student(Denoiser(tiny_unet(num_classes=3), RF, "velocity"))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t, r = fm.meanflow_times(4, g, ratio=1.0)
    loss = fm.meanflow_loss(model, x0, eps, t, r, cond=labels(torch.arange(4) % 3, 3))
    loss.mean().backward()
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert model.net.unet.class_embedding.step.mlp[2].weight.grad.abs().sum() > 0


# ================================================================================================================
# shortcut models
# ================================================================================================================

@pytest.mark.parametrize("process", [RF, VPCosine()], ids=["rf", "vp-cosine"])
def test_the_shortcut_target_of_the_exact_flow_map_is_its_own_jump(process):
    exact = GaussFlowMap(process=process)
    x, _, _ = _points()
    d = torch.tensor([1 / 2, 1 / 4, 1 / 8, 1 / 16] * 4, dtype=F64)
    t = torch.ones(16, dtype=F64) - d * (torch.arange(16) % 3)                        # t - 2d >= 0
    target = fm.shortcut_target(exact, x, t, d, process)
    torch.testing.assert_close(target, gaussian_flow_map(GAUSS, x, t, t - 2 * d, process), rtol=0, atol=1e-10)
    one_jump = steps.flow_map(exact, x, t, t - 2 * d, process)
    torch.testing.assert_close(target, one_jump, rtol=0, atol=1e-10)
    # the smallest step rests on the instantaneous prediction: two DDIM steps of the model at s = t
    d_min = torch.full((16,), 1 / 128, dtype=F64)
    ddim = lambda y, a, b: steps.ddim(exact.denoiser, y, a, b, process)
    want = ddim(ddim(x, t, t - d_min), t - d_min, t - 2 * d_min)
    torch.testing.assert_close(fm.shortcut_target(exact, x, t, d_min, process), want, rtol=0, atol=1e-12)


def test_shortcut_loss_is_flow_matching_at_d_zero_and_the_papers_velocity_error_above():
    model = _flow_map()
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(16, 2, generator=g, dtype=F64), torch.randn(16, 2, generator=g, dtype=F64)
    t, d = (v.to(F64) for v in fm.shortcut_times(16, g, M=8, fraction=0.5))
    loss = fm.shortcut_loss(model, x0, eps, t, d)
    assert loss.shape == (16,) and (d[:8] > 0).all() and (d[8:] == 0).all()
    z = RF.marginal(x0, t, eps)
    u = lambda x, a, b: fm.average_velocity(model, x, a, b)
    fm_rows = (u(z, t, t) - (eps - x0)).pow(2).mean(1)                                 # flow matching, d = 0
    torch.testing.assert_close(loss[8:], fm_rows[8:])
    # self-consistency in the paper's velocities: s_tgt = (s(x_t, t, d) + s(x', t - d, d)) / 2 (d = 1/8: at s = t)
    dd = d[:, None]
    small = (d <= 1 / 8)
    q = lambda a, b: torch.where(small, a, b)
    with torch.no_grad():
        s1 = u(z, t, q(t, t - d))
        s2 = u(z - dd * s1, t - d, q(t - d, t - 2 * d))
    sc_rows = (u(z, t, t - 2 * d) - (s1 + s2) / 2).pow(2).mean(1)
    torch.testing.assert_close(fm.shortcut_loss(model, x0, eps, t, d, d_min=1 / 8)[:8], sc_rows[:8])
    loss.sum().backward()


def test_shortcut_times_sit_on_power_of_two_grids():
    t, d = fm.shortcut_times(4000, torch.Generator().manual_seed(0), M=128, fraction=0.25)
    sc = d > 0
    assert int(sc.sum()) == 1000 and sc[:1000].all()
    jump = 2 * d[sc]
    assert set(torch.log2(jump).round().tolist()) == {0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0}
    k = t[sc] / jump
    torch.testing.assert_close(k, k.round())
    assert ((t[sc] - jump) >= 0).all() and (t <= 1).all() and (t[~sc] > 0).all()


# ================================================================================================================
# the exact flow map of a mixture
# ================================================================================================================

@pytest.mark.parametrize("process", [RF, VPCosine()], ids=["rf", "vp-cosine"])
def test_exact_flow_map_is_the_closed_form_on_one_gaussian(process):
    x, t, s = _points(32)
    t[:4], s[:4] = 1.0, 0.0                                                            # the whole way, noise to data
    s[4:8] = t[4:8]                                                                    # no step at all
    got = fm.exact_flow_map(GAUSS, process, x, t, s)
    want = gaussian_flow_map(GAUSS, x, t, s, process)
    assert torch.equal(got[4:8], x[4:8])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)        # 128 Heun steps (the bench's exact_map: ~1e-3)
    err = lambda n: float((fm.exact_flow_map(GAUSS, process, x[:4], t[:4], s[:4], n=n) - want[:4]).abs().max())
    assert err(64) / err(128) > 3.5                                 # second order
    assert got.dtype == F64 and fm.exact_flow_map(GAUSS, process, x.float(), t, s).dtype == torch.float32


def test_exact_flow_map_of_the_8_gaussians_agrees_with_a_finer_solve():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=F64) * 1.5
    t = torch.rand(64, generator=g, dtype=F64)
    s = t * torch.rand(64, generator=g, dtype=F64)
    t[:8], s[:8] = 1.0, 0.0
    coarse = fm.exact_flow_map("gmm", RF, x, t, s)
    fine = fm.exact_flow_map("gmm", RF, x, t, s, n=1024)
    assert (coarse - fine).abs().max() < 3e-4                                          # measured: 1.1e-4
    assert (coarse - fm.exact_flow_map("gmm", RF, x, t, s, n=8)).abs().max() > 1e-3   # the comparison can fail
    # the exact flow map as a model: its DDIM jump is the solve, its prediction at s = t the exact denoiser's
    exact = fm.ExactFlowMap(gmm8(), RF)
    torch.testing.assert_close(steps.flow_map(exact, x, t, s, RF), coarse)
    at_t = exact(x, t, Cond(s=t))
    torch.testing.assert_close(at_t.x0, gmm8().denoiser(RF)(x, t).x0)


# ================================================================================================================
# sCM
# ================================================================================================================

VP = VPCosine()


class GaussConsistency:
    """The exact consistency function of one Gaussian on vp-cosine: x0_hat = X(x_t, t -> 0), constant along the ODE."""

    process = VP

    def __call__(self, x, t, cond=None):
        X = gaussian_flow_map(GAUSS, x, t, torch.zeros_like(t), VP)
        return Pred(X, (x - VP.alpha(t)[:, None] * X) / VP.sigma(t)[:, None])


def test_scm_tangent_is_cos_phi_times_a_finite_difference_of_the_consistency_function():
    model = _teacher(VP, "v", seed=4)
    x, t, _ = _points()
    dxdphi = torch.randn_like(x)
    F, g = fm.scm_tangent(model, x, t, dxdphi, c=None)
    phi = VP.a * t + VP.b
    h = 1e-7                                                                           # a step in phi
    f = lambda y, tt: model(y, tt).x0
    with torch.no_grad():
        dfdphi = (f(x + h * dxdphi, t + h / VP.a) - f(x - h * dxdphi, t - h / VP.a)) / (2 * h)
        torch.testing.assert_close(F, fm.trigflow_velocity(model, x, t))
    torch.testing.assert_close(g, torch.cos(phi)[:, None] * dfdphi, rtol=0, atol=1e-6)
    assert (g - torch.cos(phi)[:, None] * dfdphi).abs().max() < 1e-3 * g.abs().max()
    # warm-up r = 0 keeps only -cos^2 (F - dx/dphi); normalisation divides by ||g|| + c per sample
    _, g0 = fm.scm_tangent(model, x, t, dxdphi, warmup=0.0, c=None)
    torch.testing.assert_close(g0, -torch.cos(phi)[:, None] ** 2 * (F.detach() - dxdphi))
    _, gn = fm.scm_tangent(model, x, t, dxdphi)
    torch.testing.assert_close(gn, g / (g.norm(dim=1, keepdim=True) + 0.1))
    assert (gn.norm(dim=1) < 1).all()


def test_the_scm_tangent_of_the_exact_consistency_function_is_zero():
    model = GaussConsistency()
    x, t, _ = _points()
    dxdphi = velocity(GAUSS.denoiser(VP)(x, t), t, VP) / VP.a                          # the exact ODE, in phi
    _, g = fm.scm_tangent(model, x, t, dxdphi, c=None)
    assert g.abs().max() < 1e-9
    _, g_wrong = fm.scm_tangent(model, x, t, -dxdphi, c=None)                          # the other direction
    assert g_wrong.abs().max() > 1e-2


def test_scm_loss_moves_F_along_the_normalised_tangent():
    model = _teacher(VP, "v", seed=5)
    g_ = torch.Generator().manual_seed(0)
    x0, z = torch.randn(8, 2, generator=g_, dtype=F64), torch.randn(8, 2, generator=g_, dtype=F64)
    t = fm.scm_times(8, g_, VP).to(F64)
    loss = fm.scm_loss(model, x0, z, t, warmup=0.5)
    x_t = VP.marginal(x0, t, z)
    phi = VP.a * t + VP.b
    dxdphi = torch.cos(phi)[:, None] * z - torch.sin(phi)[:, None] * x0
    F, g = fm.scm_tangent(model, x_t, t, dxdphi, warmup=0.5)
    torch.testing.assert_close(loss, g.pow(2).mean(1))                                 # F - F^- = 0 in value
    params = list(model.parameters())
    got = torch.autograd.grad(loss.sum(), params)
    want = torch.autograd.grad((-2 * g * F).mean(1).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    teacher = _teacher(VP, "v", seed=6)
    distilled = fm.scm_loss(model, x0, z, t, teacher=teacher, logw=torch.zeros(8, dtype=F64))
    assert distilled.shape == (8,) and torch.isfinite(distilled).all()
    with pytest.raises(ValueError, match="TrigFlow"):
        fm.scm_loss(_teacher(), x0, z, t)
    assert fm.scm_warmup(0) == 0.0 and fm.scm_warmup(5000) == 0.5 and fm.scm_warmup(20000) == 1.0


def test_scm_times_are_log_normal_in_tan_phi():
    t = fm.scm_times(20000, torch.Generator().manual_seed(0), VP, -1.0, 1.4)
    assert ((t >= 0) & (t <= 1)).all()
    log_tan = torch.log(torch.tan(VP.a * t.double() + VP.b))
    assert abs(float(log_tan.mean()) + 1.0) < 0.05 and abs(float(log_tan.std()) - 1.4) < 0.05


# ================================================================================================================
# drivers
# ================================================================================================================

def test_an_interrupted_shortcut_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """Ctrl-C in the middle of a shortcut run (student, its EMA and the EMA target of the self-consistency targets)
    saves a checkpoint; rerunning the same call finishes with exactly the weights of an uninterrupted run."""
    from course_lib import data2d
    from course_lib.config import seeded
    from course_lib.train import TrainConfig

    steps_total = 16

    def run(folder):
        with seeded(0):
            model = Denoiser(MLP2D(hidden=16, depth=2, flow_map=True), RF, "velocity")
        tc = TrainConfig(steps=steps_total, batch_size=32, seed=0, ckpt_every=4)
        cfg = fm.ShortcutConfig(lr=1e-3, ema_decay=0.9, target_decay=0.5, M=8, fraction=0.5)
        return fm.train_shortcut(model, data2d.batches("gmm"), cfg, run=tc, ckpt_dir=folder, progress=False)

    ref_student, ref = run(tmp_path / "ref")
    real = interrupt_on_call(monkeypatch, fm, "shortcut_loss", 7)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "int")
    monkeypatch.setattr(fm, "shortcut_loss", real)
    student, done = run(tmp_path / "int")
    assert done.updates["student"] == steps_total and is_flow_map(student)
    for (k, p), q in zip(ref_student.state_dict().items(), student.state_dict().values()):
        assert torch.equal(p, q), k
    for (k, p), q in zip(ref.targets["target"].state_dict().items(), done.targets["target"].state_dict().values()):
        assert torch.equal(p, q), k


def test_meanflow_distillation_lowers_its_loss_on_a_fixed_batch():
    """A few updates on one repeated batch of the 8 Gaussians lower MeanFlow's loss on that batch, and the driver
    returns a frozen flow-map student."""
    from course_lib import data2d
    from course_lib.train import TrainConfig

    x0 = data2d.sample_2d("gmm", 64, torch.Generator().manual_seed(0))[0]
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(64, 2, generator=g)
    teacher = _teacher(dtype=torch.float32)
    t, r = fm.meanflow_times(64, g, ratio=1.0)
    loss = lambda m: float(fm.meanflow_loss(m, x0, eps, t, r, teacher=teacher, p=0.0).mean())
    start = flow_map_student(teacher)
    before = loss(start)
    student, _ = fm.train_meanflow(start, lambda n, g: {"x": x0[:n]}, fm.MeanFlowConfig(lr=3e-3, ema_decay=0.0),
                                   run=TrainConfig(steps=30, batch_size=64, seed=0), teacher=teacher, progress=False)
    assert is_flow_map(student) and not any(p.requires_grad for p in student.parameters())
    assert loss(student) < 0.7 * before


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_scm_makes_the_model_more_consistent_along_the_ode(method):
    """sCT (the 8 Gaussians' exact ODE) and sCD (a teacher's ODE, the student initialised as the teacher): 150 updates
    shrink the consistency violation ||cos(phi) df/dphi||^2 along that ODE (the un-normalised tangent). The models
    embed 10 t (time_scale 0.01): with the course's 1000 t both violations grow a hundredfold (sCM's Sec. 4.1)."""
    from course_lib import data2d
    from course_lib.train import TrainConfig

    torch.manual_seed(7)
    teacher = Denoiser(MLP2D(hidden=32, depth=2, time_scale=0.01), VP, "v") if method == "scd" else None
    g = torch.Generator().manual_seed(0)
    x0 = data2d.sample_2d("gmm", 512, g)[0]
    t = fm.scm_times(512, g, VP)
    x_t = VP.marginal(x0, t, torch.randn(512, 2, generator=g))
    if teacher is None:
        ode = velocity(data2d.exact_denoiser("gmm", VP)(x_t.double(), t.double()), t.double(), VP).float() / VP.a
    else:
        ode = fm.trigflow_velocity(teacher, x_t, t).detach()
    violation = lambda m: float(fm.scm_tangent(m, x_t, t, ode, c=None)[1].pow(2).mean())
    torch.manual_seed(8)
    start = Denoiser(MLP2D(hidden=32, depth=2, time_scale=0.01), VP, "v") if teacher is None else teacher
    import copy
    start = copy.deepcopy(start).requires_grad_(True)
    before = violation(start)
    cfg = fm.SCMConfig(lr=3e-3, ema_decay=0.0, tangent_warmup=0)
    student, _ = fm.train_scm(start, data2d.batches("gmm"), cfg, run=TrainConfig(steps=150, batch_size=128, seed=0),
                              teacher=teacher, progress=False)
    assert not is_flow_map(student) and student.net.time_scale == 0.01
    assert violation(student.requires_grad_(True)) < 0.7 * before


def test_flow_map_error_is_zero_for_the_exact_map_and_grows_with_the_jump_of_a_ddim_step():
    ts = torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=F64)
    g = lambda: torch.Generator().manual_seed(0)
    exact = fm.flow_map_error(fm.ExactFlowMap("gmm", RF, n=32), "gmm", RF, ts, 64, g(), exact_steps=32)
    assert exact.shape == (4, 4)
    later = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)                       # [i, j]: ts[i] -> ts[j] < ts[i]
    assert torch.isnan(exact[~later]).all() and (exact[later] < 1e-9).all()
    ddim = fm.flow_map_error(gmm8().denoiser(RF), "gmm", RF, ts, 64, g(), exact_steps=32)
    assert (ddim[later] > 1e-3).all()
    assert ddim[1, 2] < ddim[1, 3] < ddim[0, 3] and ddim[2, 3] < ddim[0, 3]      # longer jumps, larger errors
    student = flow_map_student(_teacher(dtype=torch.float32))                       # a copy: DDIM steps of its teacher
    torch.testing.assert_close(fm.flow_map_error(student, "gmm", RF, ts, 64, g(), exact_steps=32),
                               fm.flow_map_error(_teacher(dtype=torch.float32), "gmm", RF, ts, 64, g(), exact_steps=32),
                               equal_nan=True)
