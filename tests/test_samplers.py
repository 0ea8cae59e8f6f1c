"""Time grids (course_lib.grids), samplers (course_lib.samplers) and guidance (course_lib.guidance).

Analytic truth first: data concentrated at one point (every sampler that follows the ODE exactly lands on it),
straight rectified-flow paths (Euler is exact), Gaussian data (closed-form flow map, measured convergence
order). Reference second: SD timesteps and the flow-matching grid against diffusers' schedulers.
"""
from __future__ import annotations

import pytest
import torch

from course_lib import grids, guidance, samplers, steps
from course_lib.conditioning import labels
from course_lib.models import Denoiser, MLP2D
from course_lib.predictions import Pred
from course_lib.processes import EDM, RectifiedFlow, SDDiscrete, VPCosine, bcast

F64 = torch.float64
SD_KW = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ALL_PROCESSES = [VPCosine(), SDDiscrete(), RectifiedFlow(), EDM()]
PROC_IDS = [p.name for p in ALL_PROCESSES]
SAMPLER_NAMES = list(samplers.SAMPLERS)


# ================================================================================================================
# grids
# ================================================================================================================

def _all_grids(n: int) -> dict[str, torch.Tensor]:
    vp, sd, edm = VPCosine(), SDDiscrete(), EDM()
    return {
        "uniform": grids.uniform(n),
        "uniform(0.9, 0.05)": grids.uniform(n, 0.9, 0.05),
        "karras": grids.karras(n, edm),
        "sd-leading": grids.sd_grid(n, sd, "leading"),
        "sd-leading-offset1": grids.sd_grid(n, sd, "leading", steps_offset=1),
        "sd-trailing": grids.sd_grid(n, sd, "trailing"),
        "sd-linspace": grids.sd_grid(n, sd, "linspace"),
        "flow-match": grids.flow_match_grid(n),
        "flow-match-shift3": grids.flow_match_grid(n, shift=3.0),
        "log-snr": grids.log_snr_uniform(n, vp),
        "log-snr(0.9, 0.05)": grids.log_snr_uniform(n, vp, 0.9, 0.05),
        "default-vp": grids.default_grid(n, vp),
        "default-sd": grids.default_grid(n, sd),
        "default-edm": grids.default_grid(n, edm),
    }


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 13, 50, 999])
def test_grid_length_contract(n):
    for name, ts in _all_grids(n).items():
        assert ts.dtype == F64, name
        assert ts.shape == (n + 1,), name
        assert (ts.diff() < 0).all(), f"{name} is not strictly decreasing: {ts}"
        expected_end = 0.05 if "0.05" in name else 0.0
        assert float(ts[-1]) == expected_end, name
        assert float(ts[0]) <= 1.0 and float(ts[-1]) >= 0.0, name


@pytest.mark.parametrize("n", [1, 4, 10])
def test_grid_start_times(n):
    g = _all_grids(n)
    for name in ["uniform", "karras", "sd-trailing", "sd-linspace", "flow-match", "flow-match-shift3", "log-snr"]:
        assert float(g[name][0]) == pytest.approx(1.0, abs=1e-12), name
    assert float(g["uniform(0.9, 0.05)"][0]) == 0.9
    assert float(g["log-snr(0.9, 0.05)"][0]) == 0.9
    # leading spacing starts below 1: its first timestep is (n - 1) * (1000 // n)
    assert float(g["sd-leading"][0]) == pytest.approx(((n - 1) * (1000 // n) + 1) / 1000)


def test_uniform_grid_has_equal_steps():
    ts = grids.uniform(8, 0.9, 0.1)
    torch.testing.assert_close(ts.diff(), torch.full((8,), -0.1, dtype=F64))


def test_log_snr_grid_is_equally_spaced_in_log_snr():
    vp = VPCosine()
    ts = grids.log_snr_uniform(10, vp, 0.9, 0.05)
    lam = vp.log_snr(ts)
    torch.testing.assert_close(lam.diff(), torch.full((10,), float(lam[1] - lam[0]), dtype=F64))
    # ending at t = 0 (log-SNR = +20): all steps but the last one (to the clipped end) stay equal in log-SNR
    ts = grids.log_snr_uniform(10, vp)
    d = vp.log_snr(ts[:-1]).diff()
    torch.testing.assert_close(d, torch.full_like(d, float(d[0])))


def test_karras_grid_is_equation_5():
    # Karras et al. (2022), Eq. 5: sigma^(1/rho) is linear in i, from sigma_max to sigma_min, then 0
    edm, rho = EDM(), 7.0
    ts = grids.karras(12, edm, sigma_min=0.002, rho=rho)
    sig = ts[:-1] * edm.sigma_max
    torch.testing.assert_close(sig[[0, -1]], torch.tensor([80.0, 0.002], dtype=F64))
    r = sig ** (1 / rho)
    torch.testing.assert_close(r.diff(), torch.full((11,), float(r[1] - r[0]), dtype=F64))


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10, 13, 20, 25, 50, 100])
def test_sd_timesteps_match_diffusers(scheduler, n):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    # diffusers' two schedulers define "leading" and "linspace" differently; the course follows DDIM for
    # "leading" (DDIM's default) and DPM-Solver for "linspace" (DPM-Solver's default); "trailing" agrees in both
    cls, spacings = {"ddim": (DDIMScheduler, ["leading", "trailing"]),
                     "dpm": (DPMSolverMultistepScheduler, ["linspace", "trailing"])}[scheduler]
    for spacing in spacings:
        s = cls(**SD_KW, timestep_spacing=spacing)
        s.set_timesteps(n)
        assert torch.equal(grids.sd_timesteps(n, spacing), s.timesteps.to(F64)), (spacing, n)
    s = DDIMScheduler(**SD_KW, timestep_spacing="leading", steps_offset=1)
    s.set_timesteps(n)
    assert torch.equal(grids.sd_timesteps(n, "leading", steps_offset=1), s.timesteps.to(F64))


@pytest.mark.parametrize("scheduler, spacing, n", [("ddim", "trailing", 48), ("dpm", "linspace", 30),
                                                   ("dpm", "linspace", 26)])
def test_sd_timesteps_match_diffusers_where_rounding_is_delicate(scheduler, spacing, n):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    s = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[scheduler](**SD_KW, timestep_spacing=spacing)
    s.set_timesteps(n)
    assert torch.equal(grids.sd_timesteps(n, spacing), s.timesteps.to(F64))


@pytest.mark.parametrize("n", [1, 3, 8, 50])
def test_flow_match_grid_matches_diffusers(n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(n)
    torch.testing.assert_close(grids.flow_match_grid(n), s.sigmas.to(F64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [3, 8])
def test_flow_match_grid_with_shift_matches_diffusers(n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(n)
    torch.testing.assert_close(grids.flow_match_grid(n, shift=3.0), s.sigmas.to(F64), rtol=0, atol=1e-6)


def test_flow_match_shift_pushes_times_towards_noise():
    plain, shifted = grids.flow_match_grid(6), grids.flow_match_grid(6, shift=3.0)
    assert (shifted[1:-1] > plain[1:-1]).all()
    # SD3's shift t' = s t / (1 + (s - 1) t) is applied to equally spaced times: undone, they are equally spaced
    u = shifted[:-1] / (3.0 - 2.0 * shifted[:-1])
    torch.testing.assert_close(u.diff(), torch.full((5,), float(u[1] - u[0]), dtype=F64))


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_grids_reject_n_below_one_or_not_int(bad):
    vp, sd, edm = VPCosine(), SDDiscrete(), EDM()
    fns = [lambda: grids.uniform(bad), lambda: grids.karras(bad, edm), lambda: grids.sd_timesteps(bad),
           lambda: grids.sd_grid(bad, sd), lambda: grids.flow_match_grid(bad),
           lambda: grids.log_snr_uniform(bad, vp), lambda: grids.default_grid(bad, vp)]
    for fn in fns:
        with pytest.raises(ValueError, match="n >= 1"):
            fn()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_sd_grid_with_more_steps_than_training_timesteps_is_rejected_or_keeps_the_contract(spacing):
    # diffusers raises for num_inference_steps > num_train_timesteps; repeated times would break the contract
    try:
        ts = grids.sd_grid(1001, SDDiscrete(), spacing)
    except ValueError:
        return
    assert (ts.diff() < 0).all(), "sd_grid(1001) repeats timesteps"


def test_sd_timesteps_unknown_spacing():
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        grids.sd_timesteps(4, "uniform")


# ================================================================================================================
# models with known answers
# ================================================================================================================

def point_mass_model(c: torch.Tensor, proc):
    """The exact denoiser when the data is the single point c: x0_hat = c, eps_hat = (x - alpha c) / sigma."""

    def model(x, t, cond=None):
        a, s = bcast(proc.alpha(t), x), bcast(proc.sigma(t), x)
        x0 = c.expand_as(x)
        return Pred(x0, (x - a * x0) / s)

    return model


def gaussian_model(mu: float, s: float, proc):
    """The exact denoiser for data N(mu, s^2 I): x0_hat = mu + alpha s^2 (x - alpha mu) / (alpha^2 s^2 + sigma^2)."""

    def model(x, t, cond=None):
        a, sg = bcast(proc.alpha(t), x), bcast(proc.sigma(t), x)
        x0 = mu + a * s**2 * (x - a * mu) / (a * a * s * s + sg * sg)
        return Pred(x0, (x - a * x0) / sg)

    return model


def gaussian_flow_map(x, t0: float, t1: float, mu: float, s: float, proc):
    """Exact probability-flow ODE solution from t0 to t1 for N(mu, s^2 I) data:
    x_t1 = alpha_1 mu + (std_1 / std_0) (x_t0 - alpha_0 mu), std_t = sqrt(alpha_t^2 s^2 + sigma_t^2)."""
    t0, t1 = torch.tensor(t0, dtype=F64), torch.tensor(t1, dtype=F64)
    std = lambda t: torch.sqrt(proc.alpha(t) ** 2 * s**2 + proc.sigma(t) ** 2)  # noqa: E731
    return proc.alpha(t1) * mu + std(t1) / std(t0) * (x - proc.alpha(t0) * mu)


class Counting:
    """Wraps a model and counts its calls (network function evaluations)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, cond=None):
        self.calls += 1
        return self.model(x, t, cond)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _x1(proc, shape=(8, 2), seed=0):
    return proc.prior(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ================================================================================================================
# NFE accounting
# ================================================================================================================

def test_nfe_table():
    for n in [1, 2, 5, 10]:
        assert samplers.nfe("euler", n) == n
        assert samplers.nfe("ddim", n) == n
        assert samplers.nfe("dpmpp2m", n) == n
        assert samplers.nfe("heun", n) == 2 * n - 1


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_steps_for_nfe_is_the_largest_step_count_within_budget(name):
    for budget in range(1, 25):
        n = samplers.steps_for_nfe(name, budget)
        assert n >= 1
        assert samplers.nfe(name, n) <= budget < samplers.nfe(name, n + 1)
    with pytest.raises(ValueError):
        samplers.steps_for_nfe(name, 0)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_samplers_call_the_model_exactly_nfe_times(name, n):
    proc = VPCosine()
    model = Counting(gaussian_model(0.3, 0.5, proc))
    samplers.get_sampler(name)(model, _x1(proc), grids.uniform(n), proc)
    assert model.calls == samplers.nfe(name, n)


def test_heun_corrects_every_step_when_the_grid_does_not_end_at_zero():
    proc = VPCosine()
    model = Counting(gaussian_model(0.3, 0.5, proc))
    samplers.heun(model, _x1(proc), grids.uniform(4, 1.0, 0.05), proc)
    assert model.calls == 8


def test_unknown_sampler_lists_valid_ones():
    for fn in [lambda: samplers.get_sampler("lms"), lambda: samplers.nfe("lms", 3),
               lambda: samplers.steps_for_nfe("lms", 3)]:
        with pytest.raises(ValueError) as e:
            fn()
        for name in SAMPLER_NAMES:
            assert name in str(e.value)


# ================================================================================================================
# exactness
# ================================================================================================================

@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=PROC_IDS)
@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("n", [1, 7])
def test_point_mass_data_is_reached_exactly(proc, name, n, request):
    """With data at the single point c the ODE solution is x_t = alpha_t c + sigma_t z, z = (x_1 - alpha_1 c) / sigma_1.
    DDIM and DPM-Solver++ are exact on it for every process (eps_hat and x0_hat are constant along it); Euler
    and Heun are exact when alpha and sigma are linear in t (rf, edm), where the velocity is constant."""
    g = torch.Generator().manual_seed(3)
    c = torch.randn(1, 2, generator=g, dtype=F64) * 2
    x1 = _x1(proc)
    ts = grids.default_grid(n, proc)
    out = samplers.get_sampler(name)(point_mass_model(c, proc), x1, ts, proc)
    t0, t1 = ts[-1:], ts[:1]
    z = (x1 - proc.alpha(t1) * c) / proc.sigma(t1)
    exact = proc.alpha(t0) * c + proc.sigma(t0) * z  # = c, except VP-cosine's sigma(0) = e^-10
    linear_in_t = isinstance(proc, (RectifiedFlow, EDM))
    err = float((out - exact).abs().max())
    if name in samplers.STOCHASTIC:
        # every step jumps with x0_hat = c: the last one lands on alpha_0 c + sigma_0 eps_hat, whatever the noise
        dev = float((out - proc.alpha(t0) * c).abs().max())
        assert dev <= 1e-10 * float(proc.sigma(t1)) + 10 * float(proc.sigma(t0)), dev
        return
    if name in ("ddim", "dpmpp2m") or linear_in_t:
        assert err < 1e-10 * float(proc.sigma(t1)), err
        if not isinstance(proc, VPCosine):
            torch.testing.assert_close(out, c.expand_as(out), rtol=0, atol=1e-9 * float(proc.sigma(t1)))
    else:
        # curved schedules: Euler and Heun are not exact (this checks the exactness above is not vacuous)
        assert err > 1e-3


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_straight_rectified_flow_paths_are_integrated_exactly(name, n):
    """A deterministic coupling x0 = m * x1 + b (m > 0) with straight paths x_t = (1 - t) x0 + t x1: the exact
    model inverts x_t for x1 and its velocity x1 - x0 is constant along each path, so Euler is exact in one step."""
    proc = RectifiedFlow()
    g = torch.Generator().manual_seed(4)
    m, b = 0.2 + torch.rand(1, 3, generator=g, dtype=F64), torch.randn(1, 3, generator=g, dtype=F64)

    def model(x, t, cond=None):
        tt = bcast(t, x)
        z = (x - (1 - tt) * b) / ((1 - tt) * m + tt)
        return Pred(m * z + b, z)

    x1 = _x1(proc, (16, 3))
    out = samplers.get_sampler(name)(model, x1, grids.uniform(n), proc)
    torch.testing.assert_close(out, m * x1 + b, rtol=0, atol=1e-12)


def test_dpm_solver_first_step_is_ddim():
    """Lu et al. (2022b): first-order DPM-Solver++ is DDIM; the first 2M step is first order, for any model."""
    torch.manual_seed(0)
    proc = VPCosine()
    net = Denoiser(MLP2D(hidden=32, depth=2), proc, "eps")  # float32: MLP2D's time embedding is float32
    x1 = _x1(proc, (8, 2)).float()
    for ts in [torch.tensor([0.9, 0.4], dtype=F64), torch.tensor([1.0, 0.7], dtype=F64)]:
        ddim = samplers.ddim(net, x1, ts, proc)
        assert (ddim - x1).abs().max() > 0.1  # the step does something
        torch.testing.assert_close(samplers.dpm_solver_pp_2m(net, x1, ts, proc), ddim, rtol=1e-5, atol=1e-5)


# ================================================================================================================
# convergence order on Gaussian data
# ================================================================================================================

MU, S = 0.7, 0.5

# Grids where the asymptotic regime is clean at n = 16, 32, 64. DPM-Solver++(2M) works in log-SNR, and on grids
# that reach log-SNR = -20 / +20 its error changes sign as n grows (ratios jump around); away from the clipped
# ends (t in [0.9, 0.05]) it shows its order. Heun's last step to t = 0 is an Euler step, which keeps order 2.
ORDER_CASES = [
    ("euler", "uniform", 1),
    ("ddim", "uniform", 1),
    ("heun", "uniform", 2),
    ("euler", "log-snr(0.9, 0.05)", 1),
    ("heun", "log-snr(0.9, 0.05)", 2),
    ("dpmpp2m", "log-snr(0.9, 0.05)", 2),
    ("dpmpp2m", "uniform(0.9, 0.05)", 2),
]


@pytest.mark.parametrize("name, grid, order", ORDER_CASES)
def test_convergence_order_on_gaussian_data(name, grid, order):
    proc = VPCosine()
    model = gaussian_model(MU, S, proc)
    x1 = _x1(proc, (64, 2))
    errors = []
    for n in [16, 32, 64]:
        ts = _all_grids(n)[grid]
        out = samplers.get_sampler(name)(model, x1, ts, proc)
        exact = gaussian_flow_map(x1, float(ts[0]), float(ts[-1]), MU, S, proc)
        errors.append(float((out - exact).abs().max()))
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    if order == 2:
        assert all(r > 3.0 for r in ratios), (errors, ratios)
    else:
        assert all(1.5 < r < 2.7 for r in ratios), (errors, ratios)
    assert errors[-1] < 0.05


# ================================================================================================================
# interface
# ================================================================================================================

@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("shape", [(4, 2), (2, 3, 4, 4)])
def test_return_path_shape_and_ends(name, shape):
    proc = VPCosine()
    model = gaussian_model(MU, S, proc)
    x1 = _x1(proc, shape)
    ts = grids.uniform(3)
    sampler = samplers.get_sampler(name)
    path = sampler(model, x1, ts, proc, return_path=True, generator=_gen())
    assert path.shape == (4, *shape)
    assert torch.equal(path[0], x1)
    assert torch.equal(path[-1], sampler(model, x1, ts, proc, generator=_gen()))
    # intermediate states sit between noise and data: each differs from its neighbours
    assert all(not torch.equal(path[i], path[i + 1]) for i in range(3))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_samplers_are_pure(name):
    proc = VPCosine()
    model = gaussian_model(MU, S, proc)
    x1 = _x1(proc)
    x1_copy = x1.clone()
    sampler = samplers.get_sampler(name)
    a = sampler(model, x1, grids.uniform(5), proc, generator=_gen())
    b = sampler(model, x1, grids.uniform(5), proc, generator=_gen())
    assert torch.equal(x1, x1_copy), "the sampler changed its input"
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_samplers_keep_the_input_dtype(name):
    proc = SDDiscrete()
    x1 = _x1(proc).float()
    out = samplers.get_sampler(name)(point_mass_model(torch.ones(1, 2), proc), x1, grids.sd_grid(4, proc), proc)
    assert out.dtype == torch.float32


# ================================================================================================================
# classifier-free guidance
# ================================================================================================================

def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, generator=g)
    t = torch.rand(6, generator=g) * 0.9 + 0.05
    y = labels(torch.randint(0, 3, (6,), generator=g), 3)
    return x, t, y


def test_cfg_with_w_zero_is_the_conditional_model(class_model):
    x, t, y = _inputs()
    with torch.no_grad():
        got = guidance.cfg(class_model, 0.0)(x, t, y)
        cond, uncond = class_model(x, t, y), class_model(x, t, y.null())
    assert torch.equal(got.x0, cond.x0) and torch.equal(got.eps, cond.eps)
    assert not torch.allclose(cond.x0, uncond.x0, atol=1e-4)  # the labels matter, so the check above has teeth


@pytest.mark.parametrize("w", [0.5, 3.0])
def test_cfg_equals_separate_conditional_and_unconditional_calls(class_model, w):
    x, t, y = _inputs(1)
    proc = class_model.process
    with torch.no_grad():
        got = guidance.cfg(class_model, w)(x, t, y)
        cond, uncond = class_model(x, t, y), class_model(x, t, y.null())
    torch.testing.assert_close(got.x0, (1 + w) * cond.x0 - w * uncond.x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.eps, (1 + w) * cond.eps - w * uncond.eps, rtol=1e-5, atol=1e-5)
    # weights sum to one, so the guided Pred is still consistent with x_t
    torch.testing.assert_close(proc.marginal(got.x0, t, got.eps), x, rtol=1e-4, atol=1e-4)


def test_samplers_pass_cond_to_every_call(class_model):
    x, t, y = _inputs(2)
    proc = class_model.process
    seen = []
    m = guidance.cfg(class_model, 1.0)
    with torch.no_grad():
        out = samplers.ddim(lambda x, t, cond: seen.append(cond) or m(x, t, cond), x, grids.uniform(3), proc, cond=y)
        by_hand = x
        for i in range(3):
            ti, si = (torch.full((len(x),), float(v)) for v in grids.uniform(3)[i:i + 2])
            by_hand = steps.ddim(m, by_hand, ti, si, proc, y)
    assert len(seen) == 3 and all(c is y for c in seen)
    assert torch.equal(out, by_hand)
    with pytest.raises(TypeError, match="conditioning.labels"):
        samplers.ddim(class_model, x, grids.uniform(3), proc, cond=y.y)


# ================================================================================================================
# stochastic samplers: TCD (Zheng et al. 2024) and multistep consistency sampling (Song et al. 2023)
# ================================================================================================================

@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=PROC_IDS)
def test_tcd_with_gamma_zero_is_ddim(proc):
    model = gaussian_model(MU, S, proc)
    x1, ts = _x1(proc), grids.default_grid(5, proc)
    torch.testing.assert_close(samplers.tcd(model, x1, ts, proc, gamma=0.0, generator=_gen()),
                               samplers.ddim(model, x1, ts, proc), rtol=0, atol=0)


@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=PROC_IDS)
def test_tcd_with_gamma_one_is_consistency_sampling(proc):
    model = gaussian_model(MU, S, proc)
    x1, ts = _x1(proc), grids.default_grid(5, proc)
    a = samplers.tcd(model, x1, ts, proc, gamma=1.0, generator=_gen(7), return_path=True)
    b = samplers.consistency(model, x1, ts, proc, generator=_gen(7), return_path=True)
    assert torch.equal(a, b)
    # and it is Song et al.'s Algorithm 1 where sigma(0) = 0: x_s = alpha_s x0_hat + sigma_s z with fresh z
    if float(proc.sigma(torch.zeros((), dtype=F64))) == 0.0:
        g, x = _gen(7), x1
        for i in range(len(ts) - 2):
            t, s = torch.full((len(x),), float(ts[i]), dtype=F64), torch.full((len(x),), float(ts[i + 1]), dtype=F64)
            z = torch.randn(x.shape, generator=g, dtype=F64)
            x = bcast(proc.alpha(s), x) * model(x, t).x0 + bcast(proc.sigma(s), x) * z
            torch.testing.assert_close(a[i + 1], x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", samplers.STOCHASTIC)
def test_stochastic_samplers_follow_their_generator(name):
    proc = RectifiedFlow()
    model = gaussian_model(MU, S, proc)
    x1, ts = _x1(proc), grids.uniform(4)
    run = samplers.get_sampler(name)
    a, b, c = (run(model, x1, ts, proc, generator=_gen(seed)) for seed in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # one step draws no noise: the generator is untouched and the result is DDIM's
    g = _gen(3)
    one = run(model, x1, grids.uniform(1), proc, generator=g)
    assert torch.equal(g.get_state(), _gen(3).get_state())
    torch.testing.assert_close(one, samplers.ddim(model, x1, grids.uniform(1), proc), rtol=0, atol=0)


def test_tcd_rejects_gamma_outside_the_unit_interval():
    proc = RectifiedFlow()
    with pytest.raises(ValueError, match="gamma"):
        samplers.tcd(gaussian_model(MU, S, proc), _x1(proc), grids.uniform(2), proc, gamma=1.5)


def _exact_consistency_function(mixture, proc):
    """The exact consistency function of Gaussian data: the probability-flow map to t = 0 (data2d.gaussian_flow_map)."""
    from course_lib.data2d import gaussian_flow_map

    def f(x, t, cond=None):
        x0 = gaussian_flow_map(mixture, x, t, torch.zeros_like(t), proc)
        return Pred(x0, (x - bcast(proc.alpha(t), x) * x0) / bcast(proc.sigma(t), x))

    return f


@pytest.mark.parametrize("proc", [RectifiedFlow(), EDM(), SDDiscrete()], ids=["rf", "edm", "sd"])
def test_multistep_consistency_samples_have_the_data_mean_and_variance(proc):
    """1D Gaussian data N(mu, s^2). With the exact consistency function (the flow map to 0) every step maps an exact
    x_t to an exact data sample, and re-noising gives an exact x_s: the samples are N(mu, s^2) after any number of
    steps. With the exact *denoiser* E[x0 | x_t] instead, each step shrinks: Var(out) = k^2 (alpha^2 v + sigma^2) with
    k = alpha s^2 / (alpha^2 s^2 + sigma^2), v the previous output variance (Var(x_1) = sigma_1^2 for the prior)."""
    from course_lib.data2d import GaussianMixture

    mu, s, n = 0.7, 0.5, 200_000
    mixture = GaussianMixture.isotropic(torch.tensor([[mu]], dtype=F64), s)
    x1 = proc.prior((n, 1), generator=_gen(11), dtype=F64)
    ts = grids.default_grid(4, proc)
    se_mean, se_var = s / n**0.5, s**2 * (2 / n) ** 0.5
    # exact consistency function: the data distribution
    out = samplers.consistency(_exact_consistency_function(mixture, proc), x1, ts, proc, generator=_gen(12))
    assert abs(float(out.mean()) - mu) < 5 * se_mean
    assert abs(float(out.var()) - s**2) < 5 * se_var
    # exact denoiser: the variance recursion above (checks the re-noising variance alpha_s^2 v + sigma_s^2)
    out = samplers.consistency(mixture.denoiser(proc), x1, ts, proc, generator=_gen(12))
    v, m = float(proc.sigma(ts[:1])) ** 2, None        # Var and mean of the sampler's outputs, step by step
    for i in range(len(ts) - 1):
        t = ts[i: i + 1]
        a, sg = float(proc.alpha(t)), float(proc.sigma(t))
        var_x, mean_x = (v, 0.0) if i == 0 else (a * a * v + sg * sg, a * m)   # x_1 ~ N(0, sigma_1^2): the prior
        k = a * s**2 / (a * a * s**2 + sg * sg)
        v, m = k * k * var_x, mu + k * (mean_x - a * mu)
    assert abs(float(out.mean()) - m) < 5 * (v / n) ** 0.5
    assert abs(float(out.var()) - v) < 5 * v * (2 / n) ** 0.5
    assert v < 0.9 * s**2                                   # the shrinkage is real, so the two checks differ


# ================================================================================================================
# NFE: counted network evaluations equal samplers.nfe, with and without classifier-free guidance
# ================================================================================================================

@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_counted_nfe_equals_the_nfe_table(class_model, name, guided):
    proc = class_model.process
    B = 6
    x1 = proc.prior((B, 2), generator=_gen(0))
    y = labels(torch.arange(B) % 3, 3)
    for n in range(1, 6):
        counter = samplers.CountingModel(class_model, batch_size=B)
        model = guidance.cfg(counter, 1.5) if guided else counter
        samplers.get_sampler(name)(model, x1, grids.default_grid(n, proc), proc, generator=_gen(n), cond=y)
        assert counter.nfe == samplers.nfe(name, n, guided=guided), (name, n)
        assert counter.rows == B * samplers.nfe(name, n, guided=guided)


def test_counting_model_defaults_to_the_first_calls_batch():
    proc = VPCosine()
    counter = samplers.CountingModel(gaussian_model(MU, S, proc))
    samplers.heun(counter, _x1(proc), grids.uniform(3), proc)
    assert counter.nfe == 5 and counter.calls == 5


def test_guided_nfe_and_steps_for_nfe():
    assert samplers.nfe("heun", 3, guided=True) == 10
    assert samplers.nfe("ddim", 4, guided=True) == 8
    for name in SAMPLER_NAMES:
        for budget in range(2, 20):
            n = samplers.steps_for_nfe(name, budget, guided=True)
            assert samplers.nfe(name, n, guided=True) <= budget < samplers.nfe(name, n + 1, guided=True)
    with pytest.raises(ValueError):
        samplers.steps_for_nfe("ddim", 1, guided=True)


# ================================================================================================================
# generate: device and generator
# ================================================================================================================

def test_generate_uses_the_models_device_and_the_generator(class_model):
    proc = class_model.process
    assert samplers.model_device(class_model) == torch.device("cpu")
    assert samplers.model_device(lambda x, t, cond=None: None) == torch.device("cpu")
    y = labels(torch.arange(8) % 3, 3)
    a = samplers.generate(class_model, proc, (8, 2), "tcd", 4, generator=_gen(5), cond=y)
    b = samplers.generate(class_model, proc, (8, 2), "tcd", 4, generator=_gen(5), cond=y)
    c = samplers.generate(class_model, proc, (8, 2), "tcd", 4, generator=_gen(6), cond=y)
    assert a.device.type == "cpu" and torch.equal(a, b) and not torch.allclose(a, c)
    # the prior is x_1 = sigma_1 z with z drawn from the generator on the CPU
    x1 = samplers.generate(class_model, proc, (8, 2), "ddim", 1, generator=_gen(5), cond=y, return_path=True)[0]
    torch.testing.assert_close(x1, float(proc.sigma(torch.ones((), dtype=F64))) * torch.randn(8, 2, generator=_gen(5)))


# ================================================================================================================
# TCD against diffusers' TCDScheduler, same UNet, same noise
# ================================================================================================================

@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5])
def test_tcd_matches_diffusers_tcd_scheduler(gamma):
    """diffusers floors the integer timestep of s' = (1 - gamma) s; on the trailing 4-step grid (timesteps 999, 749,
    499, 249) (1 - gamma)(i + 1) is an integer for these gamma, so both use the same s'. diffusers' last step lands on
    timestep 0 (abar_0 < 1) where the course ends at t = 0, so the states are compared up to the last step, and the
    last step against diffusers' own x0 estimate."""
    from diffusers import TCDScheduler, UNet2DModel

    from course_lib.models import DiffusersUNet

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       norm_num_groups=8).eval()
    proc = SDDiscrete()
    x1 = torch.randn(2, 3, 8, 8, generator=_gen(1))
    sched = TCDScheduler(**SD_KW, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(timesteps=[999, 749, 499, 249], original_inference_steps=50)  # any timestep allowed
    g, x, ref = _gen(9), x1, [x1]
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(x, t).sample
            x = sched.step(out, t, x, eta=gamma, generator=g).prev_sample
            ref.append(x)
    ts = grids.sd_grid(4, proc, "trailing")
    path = samplers.tcd(Denoiser(DiffusersUNet(unet), proc, "eps"), x1, ts, proc, return_path=True, gamma=gamma,
                        generator=_gen(9))
    for i in range(1, 4):
        scale = max(1.0, float(ref[i].abs().max()))
        assert float((path[i] - ref[i]).abs().max()) <= 1e-4 * scale, i
    # last step: the course returns x0_hat at timestep 249; diffusers returns sqrt(abar_0) x0_hat + sqrt(1 - abar_0) eps
    abar0 = float(sched.alphas_cumprod[0])
    with torch.no_grad():
        eps = unet(path[3], sched.timesteps[-1]).sample
    mixed = abar0**0.5 * path[4] + (1 - abar0) ** 0.5 * eps
    assert float((mixed - ref[4]).abs().max()) <= 1e-4 * max(1.0, float(ref[4].abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["ddim", "tcd", "consistency"])
def test_one_seed_gives_the_same_samples_on_every_device(class_model, name):
    import copy

    proc = class_model.process
    y = torch.arange(16) % 3
    cpu = samplers.generate(class_model, proc, (16, 2), name, 4, generator=_gen(3), cond=y)
    gpu_model = copy.deepcopy(class_model).cuda()
    gpu = samplers.generate(gpu_model, proc, (16, 2), name, 4, generator=_gen(3), cond=y)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


# --- the one "denoise, then re-noise" sampler: its named options --------------------------------------------------

def _mlp(proc):
    from conftest import mlp_denoiser

    return mlp_denoiser(proc, seed=0, dtype=torch.float64).eval()


def test_multistep_clean_and_jump_to_zero_differ_only_where_sigma0_is_not_zero():
    """gamma = 1 jumps to t = 0 with the process's alpha(0), sigma(0); "clean" takes x0_hat itself. Equal (bitwise)
    for rf, where sigma(0) = 0; not for vp-cosine, whose sigma(0) = 4.5e-5."""
    from course_lib.grids import trailing
    from course_lib.processes import RectifiedFlow, VPCosine

    for proc, same in ((RectifiedFlow(), True), (VPCosine(), False)):
        model, x1 = _mlp(proc), proc.prior((64, 2), generator=_gen(3), dtype=torch.float64)
        ts = trailing(4)
        a = samplers.multistep(model, x1, ts, proc, gamma=1.0, generator=_gen(5))
        b = samplers.multistep(model, x1, ts, proc, denoised="clean", generator=_gen(5))
        assert torch.equal(a, b) is same
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def test_multistep_on_integer_timesteps_is_the_course_time_sampler():
    """diffusers' integer timesteps read alpha, sigma from the abar table; on course times t = (tau + 1) / T the
    same sampler interpolates log abar: equal to rounding."""
    from course_lib.grids import lcm_timesteps
    from course_lib.processes import SDDiscrete

    proc = SDDiscrete()
    model, x1 = _mlp(proc), torch.randn(32, 2, generator=_gen(4), dtype=torch.float64)
    taus = lcm_timesteps(4, end=0)
    for kw in (dict(gamma=0.3), dict(gamma=0.0), dict(denoised="clean")):
        a = samplers.multistep(model, x1, taus, proc, generator=_gen(6), **kw)
        b = samplers.multistep(model, x1, proc.t_of_timestep(taus) if kw.get("gamma") != 0.3 else
                               torch.cat([proc.t_of_timestep(taus[:-1]), torch.zeros(1, dtype=torch.float64)]),
                               proc, generator=_gen(6), **kw)
        if kw.get("gamma") == 0.3:   # the integer jump floors (1 - gamma) tau': only close
            torch.testing.assert_close(a, b, atol=0.05, rtol=0)
        else:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
