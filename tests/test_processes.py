"""Noising processes (course_lib.processes) and prediction conversions (course_lib.predictions).

Analytic truth first: closed-form alpha/sigma at the ends, derivatives against finite differences and autograd,
exact round trips of every conversion. Reference second: SD's schedule against diffusers' own alphas_cumprod.
"""
from __future__ import annotations

import math

import pytest
import torch

from course_lib import predictions, processes
from course_lib.predictions import PARAMETERIZATIONS, Pred, from_pred, to_pred, velocity
from course_lib.processes import EDM, PROCESSES, AffineProcess, RectifiedFlow, SDDiscrete, VPCosine, make_process

F64 = torch.float64
ALL_PROCESSES = [VPCosine(), SDDiscrete(), RectifiedFlow(), EDM()]
IDS = [p.name for p in ALL_PROCESSES]


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _random_times(n: int, seed: int, lo: float = 0.01, hi: float = 0.99) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)


# ----------------------------------------------------------------------------------------------------------------
# alpha and sigma at the ends of [0, 1]
# ----------------------------------------------------------------------------------------------------------------

def test_vp_cosine_log_snr_is_plus_minus_20_at_the_ends():
    p = VPCosine()
    lam = p.log_snr(_t(0.0, 1.0))
    torch.testing.assert_close(lam, _t(20.0, -20.0), rtol=0, atol=1e-10)
    # the generic definition log(alpha^2 / sigma^2) agrees with the closed form
    torch.testing.assert_close(AffineProcess.log_snr(p, _t(0.0, 1.0)), _t(20.0, -20.0), rtol=0, atol=1e-9)
    # alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda) for a variance-preserving process
    a, s = p.alpha(_t(0.0, 1.0)), p.sigma(_t(0.0, 1.0))
    torch.testing.assert_close(a**2, torch.sigmoid(_t(20.0, -20.0)), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(s**2, torch.sigmoid(_t(-20.0, 20.0)), rtol=1e-12, atol=1e-15)


def test_vp_cosine_custom_log_snr_range():
    p = make_process("vp-cosine", log_snr_min=-15.0, log_snr_max=12.0)
    torch.testing.assert_close(p.log_snr(_t(0.0, 1.0)), _t(12.0, -15.0), rtol=0, atol=1e-10)


def test_vp_cosine_is_variance_preserving_and_log_snr_decreases():
    p = VPCosine()
    t = torch.linspace(0, 1, 201, dtype=F64)
    torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-14)
    assert (p.log_snr(t).diff() < 0).all()


def test_vp_cosine_t_from_log_snr_inverts_log_snr():
    p = VPCosine()
    t = torch.linspace(0, 1, 101, dtype=F64)
    torch.testing.assert_close(p.t_from_log_snr(p.log_snr(t)), t, rtol=0, atol=1e-12)
    lam = torch.linspace(-20, 20, 101, dtype=F64)
    torch.testing.assert_close(p.log_snr(p.t_from_log_snr(lam)), lam, rtol=0, atol=1e-9)


def test_sd_ends_and_diffusers_alphas_cumprod():
    from diffusers import DDIMScheduler

    p = SDDiscrete()
    torch.testing.assert_close(p.alpha(_t(0.0)), _t(1.0), rtol=0, atol=0)
    torch.testing.assert_close(p.sigma(_t(0.0)), _t(0.0), rtol=0, atol=0)
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.to(F64)
    t = (torch.arange(1000, dtype=F64) + 1) / 1000  # discrete timestep i sits at t = (i + 1) / 1000
    # diffusers accumulates the product in float32; the course in float64
    torch.testing.assert_close(p.alpha(t) ** 2, ref, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-12)
    # at t = 1 (timestep 999) SD's schedule keeps a little signal: abar_999 ~ 0.0047
    assert 0.004 < float(p.alpha(_t(1.0)) ** 2) < 0.0055


def test_sd_timestep_and_t_of_timestep_are_inverse():
    p = SDDiscrete()
    i = torch.arange(1000, dtype=F64)
    t = p.t_of_timestep(i)
    torch.testing.assert_close(t, (i + 1) / 1000)
    torch.testing.assert_close(p.timestep(t), i, rtol=0, atol=1e-9)


def test_sd_interpolates_log_abar_linearly_between_grid_points():
    p = SDDiscrete()
    t_lo, t_hi = _t(0.5), _t(0.501)  # timesteps 499 and 500
    mid = p.alpha(_t(0.5005))
    torch.testing.assert_close(torch.log(mid), 0.5 * (torch.log(p.alpha(t_lo)) + torch.log(p.alpha(t_hi))))


def test_rf_ends():
    p = RectifiedFlow()
    torch.testing.assert_close(p.alpha(_t(0.0, 1.0)), _t(1.0, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(p.sigma(_t(0.0, 1.0)), _t(0.0, 1.0), rtol=0, atol=0)


def test_edm_ends():
    p = EDM()
    torch.testing.assert_close(p.alpha(_t(0.0, 1.0)), _t(1.0, 1.0), rtol=0, atol=0)
    torch.testing.assert_close(p.sigma(_t(0.0, 1.0)), _t(0.0, 80.0), rtol=0, atol=0)
    p = EDM(sigma_max=10.0)
    torch.testing.assert_close(p.sigma(_t(0.5)), _t(5.0))


# ----------------------------------------------------------------------------------------------------------------
# derivatives
# ----------------------------------------------------------------------------------------------------------------

def _autograd(f, t: torch.Tensor) -> torch.Tensor:
    """Elementwise df/dt by autograd; a function that does not depend on t (EDM's alpha = 1) has derivative 0."""
    tt = t.clone().requires_grad_(True)
    y = f(tt)
    if not y.requires_grad:
        return torch.zeros_like(t)
    (g,) = torch.autograd.grad(y.sum(), tt)
    return g


@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=IDS)
def test_derivatives_match_finite_differences_and_autograd(proc):
    # midpoints of SD's 1/1000 cells, so that the central differences stay inside one linear piece of log abar
    t = (torch.tensor([37, 150, 420, 777, 963], dtype=F64) + 0.5) / 1000
    h = 1e-6
    for f, df in [(proc.alpha, proc.d_alpha), (proc.sigma, proc.d_sigma)]:
        fd = (f(t + h) - f(t - h)) / (2 * h)
        ag = _autograd(f, t)
        got = df(t)
        assert got.shape == t.shape and got.dtype == F64
        torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(got, ag, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# marginal, prior, registry
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=IDS)
def test_marginal_is_alpha_x0_plus_sigma_eps_per_sample(proc):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 2, generator=g, dtype=F64), torch.randn(4, 3, 2, generator=g, dtype=F64)
    t = _t(0.1, 0.4, 0.7, 1.0)
    xt = proc.marginal(x0, t, eps)
    for b in range(4):
        torch.testing.assert_close(xt[b], proc.alpha(t[b]) * x0[b] + proc.sigma(t[b]) * eps[b])


@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=IDS)
def test_prior_has_std_sigma_1_and_follows_the_generator(proc):
    x = proc.prior((20000,), generator=torch.Generator().manual_seed(0), dtype=F64)
    s1 = float(proc.sigma(_t(1.0)))
    assert abs(float(x.std()) / s1 - 1) < 0.03
    y = proc.prior((20000,), generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(x, y)


@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=IDS)
def test_config_rebuilds_the_same_process(proc):
    cfg = dict(proc.config())
    again = make_process(cfg.pop("name"), **cfg)
    assert type(again) is type(proc) and again.config() == proc.config()
    t = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(again.alpha(t), proc.alpha(t), rtol=0, atol=0)
    torch.testing.assert_close(again.sigma(t), proc.sigma(t), rtol=0, atol=0)


def test_make_process_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        make_process("ddpm-linear")
    msg = str(e.value)
    assert "ddpm-linear" in msg
    for name in PROCESSES:
        assert name in msg


# ----------------------------------------------------------------------------------------------------------------
# prediction conversions
# ----------------------------------------------------------------------------------------------------------------

def _consistent_pred(proc, seed: int, shape=(64, 3)):
    """Random x0, eps and t in (0.01, 0.99), and x_t = alpha x0 + sigma eps (float64)."""
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(*shape, generator=g, dtype=F64), torch.randn(*shape, generator=g, dtype=F64)
    t = _random_times(shape[0], seed)
    return Pred(x0, eps), proc.marginal(x0, t, eps), t


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=IDS)
def test_to_pred_then_from_pred_returns_the_network_output(proc, kind):
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(64, 3, generator=g, dtype=F64), torch.randn(64, 3, generator=g, dtype=F64)
    t = _random_times(64, 3)
    pred = to_pred(out, x, t, proc, kind)
    assert pred.x0.shape == x.shape and pred.eps.shape == x.shape
    torch.testing.assert_close(from_pred(pred, t, proc, kind), out, rtol=1e-10, atol=1e-10)
    # whatever the network output, the Pred it is turned into is consistent with x_t
    torch.testing.assert_close(proc.marginal(pred.x0, t, pred.eps), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=IDS)
def test_from_pred_then_to_pred_returns_the_pred(proc, kind):
    pred, x, t = _consistent_pred(proc, seed=4)
    out = from_pred(pred, t, proc, kind)
    back = to_pred(out, x, t, proc, kind)
    torch.testing.assert_close(back.x0, pred.x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back.eps, pred.eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=IDS)
def test_targets_match_their_definitions(proc):
    pred, x, t = _consistent_pred(proc, seed=5)
    a, s = proc.alpha(t)[:, None], proc.sigma(t)[:, None]
    torch.testing.assert_close(from_pred(pred, t, proc, "eps"), pred.eps)
    torch.testing.assert_close(from_pred(pred, t, proc, "x0"), pred.x0)
    torch.testing.assert_close(from_pred(pred, t, proc, "v"), a * pred.eps - s * pred.x0)
    # velocity = d/dt (alpha(t) x0 + sigma(t) eps) at fixed (x0, eps), by central differences
    h = 1e-6
    fd = (proc.marginal(pred.x0, t + h, pred.eps) - proc.marginal(pred.x0, t - h, pred.eps)) / (2 * h)
    torch.testing.assert_close(from_pred(pred, t, proc, "velocity"), fd, rtol=1e-6, atol=1e-6)


def test_rf_velocity_is_eps_minus_x0():
    proc = RectifiedFlow()
    pred, x, t = _consistent_pred(proc, seed=6)
    torch.testing.assert_close(velocity(pred, t, proc), pred.eps - pred.x0, rtol=0, atol=1e-15)
    # and a velocity network's output u gives x0 = x - t u, eps = x + (1 - t) u
    u = pred.eps - pred.x0
    back = to_pred(u, x, t, proc, "velocity")
    torch.testing.assert_close(back.x0, x - t[:, None] * u)
    torch.testing.assert_close(back.eps, x + (1 - t[:, None]) * u)


def test_v_of_a_variance_preserving_process_has_the_salimans_ho_inverse():
    # Salimans & Ho (2022), Sec. 4: for alpha^2 + sigma^2 = 1, x0 = alpha x - sigma v
    proc = VPCosine()
    pred, x, t = _consistent_pred(proc, seed=7)
    v = from_pred(pred, t, proc, "v")
    a, s = proc.alpha(t)[:, None], proc.sigma(t)[:, None]
    torch.testing.assert_close(a * x - s * v, pred.x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s * x + a * v, pred.eps, rtol=1e-10, atol=1e-10)


def test_conversions_broadcast_over_image_shaped_tensors():
    proc = SDDiscrete()
    pred, x, t = _consistent_pred(proc, seed=8, shape=(5, 3, 4, 4))
    for kind in PARAMETERIZATIONS:
        out = from_pred(pred, t, proc, kind)
        assert out.shape == x.shape
        back = to_pred(out, x, t, proc, kind)
        torch.testing.assert_close(back.x0, pred.x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fn", ["to_pred", "from_pred"])
def test_unknown_parameterization_is_an_error_listing_valid_ones(fn):
    proc = RectifiedFlow()
    x, t = torch.zeros(2, 2), torch.full((2,), 0.5)
    with pytest.raises(ValueError) as e:
        if fn == "to_pred":
            to_pred(x, x, t, proc, "score")
        else:
            from_pred(Pred(x, x), t, proc, "score")
    msg = str(e.value)
    assert "score" in msg
    for kind in PARAMETERIZATIONS:
        assert kind in msg


def test_pred_mix_keeps_x_t_and_weights_both_fields():
    proc = VPCosine()
    a, x, t = _consistent_pred(proc, seed=9)
    g = torch.Generator().manual_seed(10)
    x0b = torch.randn(x.shape, generator=g, dtype=F64)
    b = Pred(x0b, (x - proc.alpha(t)[:, None] * x0b) / proc.sigma(t)[:, None])  # another Pred consistent with x
    m = a.mix(b, 1.5)
    torch.testing.assert_close(m.x0, 2.5 * a.x0 - 1.5 * b.x0)
    torch.testing.assert_close(proc.marginal(m.x0, t, m.eps), x, rtol=1e-10, atol=1e-10)
    assert math.isclose(float((a.mix(b, 0.0).x0 - a.x0).abs().max()), 0.0)


def test_predictions_module_lists_the_four_parameterizations():
    assert set(predictions.PARAMETERIZATIONS) == {"eps", "x0", "v", "velocity"}


@pytest.mark.parametrize("proc", [VPCosine(), RectifiedFlow(), EDM(sigma_max=3.0)], ids=["vp-cosine", "rf", "edm"])
def test_closed_form_sigma_derivative_equals_the_generic_autograd_fallback(proc):
    # AffineProcess.d_sigma (autograd) is what a process without a closed form uses (SDDiscrete does)
    t = _random_times(16, seed=11)
    torch.testing.assert_close(proc.d_sigma(t), AffineProcess.d_sigma(proc, t), rtol=1e-12, atol=1e-12)
