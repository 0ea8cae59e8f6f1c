"""Tests of course_lib.data2d: analytic truth first (scores, Tweedie, Gaussian flow maps, DDIM on Gaussian data),
then the samplers' contracts (shapes, labels, reproducibility, moments) and the error messages."""
from __future__ import annotations

import math

import pytest
import torch

from course_lib import grids
from course_lib.data2d import (
    DATASETS_2D, ExactDenoiser, GaussianMixture, exact_denoiser, gaussian_flow_map, get_mixture, gmm8,
    num_classes, sample_2d,
)
from course_lib.conditioning import labels
from course_lib.guidance import cfg
from course_lib.processes import EDM, RectifiedFlow, SDDiscrete, VPCosine, bcast
from course_lib.samplers import ddim, dpm_solver_pp_2m, euler, heun

PROCESSES = [VPCosine(), RectifiedFlow(), EDM()]
IDS = [p.name for p in PROCESSES]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_mixture(seed: int = 0, K: int = 3, D: int = 2) -> GaussianMixture:
    """Unequal weights, full (anisotropic, rotated) covariances: the general case."""
    g = gen(seed)
    A = torch.randn(K, D, D, generator=g, dtype=torch.float64)
    covs = 0.3 * A @ A.transpose(1, 2) + 0.05 * torch.eye(D, dtype=torch.float64)
    means = 2 * torch.randn(K, D, generator=g, dtype=torch.float64)
    weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.2
    return GaussianMixture(weights, means, covs)


def noisy_batch(mix: GaussianMixture, process, n: int = 64, seed: int = 1):
    """x_t from the forward process at random times (endpoints included), float64."""
    g = gen(seed)
    x0, y = mix.sample(n, g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    t[:4] = torch.tensor([0.0, 1e-4, 0.999, 1.0], dtype=torch.float64)
    eps = torch.randn(n, mix.dim, generator=g, dtype=torch.float64)
    return process.marginal(x0, t, eps), t, y


def gaussian_map(x_t, t, s, process, mu, std):
    """The closed-form PF-ODE flow map of N(mu, std^2 I): x_s = a_s mu + (std_s / std_t)(x_t - a_t mu),
    std_t = sqrt(a_t^2 std^2 + sigma_t^2). t, s floats."""
    t, s = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    a_t, sg_t, a_s, sg_s = process.alpha(t), process.sigma(t), process.alpha(s), process.sigma(s)
    std_t, std_s = torch.sqrt(a_t**2 * std**2 + sg_t**2), torch.sqrt(a_s**2 * std**2 + sg_s**2)
    return a_s * mu + (std_s / std_t) * (x_t - a_t * mu)


# ---------------------------------------------------------------------------------------------------------------
# Analytic truth: densities, scores, the ideal denoiser
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_log_prob_matches_torch_multivariate_normal(process):
    mix = random_mixture()
    x, t, _ = noisy_batch(mix, process)
    a, s = process.alpha(t)[:, None, None, None], process.sigma(t)[:, None, None, None]   # (B, 1, 1, 1)
    covs = a**2 * mix.covariances + s**2 * torch.eye(2, dtype=torch.float64)             # (B, K, 2, 2)
    comp = torch.distributions.MultivariateNormal(a[..., 0] * mix.means, covariance_matrix=covs)
    ref = torch.logsumexp(torch.log(mix.weights) + comp.log_prob(x[:, None, :]), dim=1)
    torch.testing.assert_close(mix.log_prob(x, t, process), ref, rtol=1e-10, atol=1e-10)


def test_log_prob_integrates_to_one():
    mix, rf = gmm8(), RectifiedFlow()
    u = torch.linspace(-4, 4, 401, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    cell = float(u[1] - u[0]) ** 2
    for t in (None, 0.3):
        mass = mix.log_prob(grid, t, rf if t is not None else None).exp().sum() * cell
        assert abs(float(mass) - 1) < 1e-3, (t, float(mass))


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_score_equals_autograd_of_log_prob(process):
    mix = random_mixture()
    x, t, y = noisy_batch(mix, process)
    for yy in (None, y):                          # unconditional and class-conditional
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(mix.log_prob(xg, t, process, yy).sum(), xg)
        torch.testing.assert_close(mix.score(x, t, process, yy), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_exact_denoiser_satisfies_tweedie(process):
    mix = random_mixture()
    x, t, _ = noisy_batch(mix, process)
    pred = mix.denoiser(process)(x, t)
    a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    score = mix.score(x, t, process)
    ok = process.alpha(t) > 1e-3                                   # Tweedie divides by alpha
    torch.testing.assert_close(pred.x0[ok], ((x + s**2 * score) / a)[ok], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(pred.eps, -s * score, rtol=1e-8, atol=1e-8)      # E[eps | x_t] = -sigma score
    torch.testing.assert_close(a * pred.x0 + s * pred.eps, x, rtol=1e-10, atol=1e-10)


def test_one_gaussian_posterior_mean_is_gaussian_conditioning():
    """N(mu, S): E[x0 | x_t] = mu + alpha S (alpha^2 S + sigma^2 I)^-1 (x_t - alpha mu), written with solve."""
    mix, vp = random_mixture(K=1, D=3), VPCosine()
    x, t, _ = noisy_batch(mix, vp)
    a, s = vp.alpha(t)[:, None, None], vp.sigma(t)[:, None, None]
    S, mu = mix.covariances[0], mix.means[0]
    C = a**2 * S + s**2 * torch.eye(3, dtype=torch.float64)                 # (B, 3, 3)
    sol = torch.linalg.solve(C, (x - a[:, 0] * mu)[..., None])[..., 0]      # (B, 3)
    ref = mu + a[:, 0] * (sol @ S)                                           # S symmetric
    torch.testing.assert_close(mix.denoiser(vp)(x, t).x0, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("process", PROCESSES + [SDDiscrete()], ids=IDS + ["sd"])
def test_denoiser_is_stable_at_the_ends_and_keeps_dtype(process):
    mix = gmm8()
    x, _ = mix.sample(7, gen())
    x = x * 30 if process.name == "edm" else x
    model = exact_denoiser("gmm", process)
    for t in (0.0, 1e-12, 1e-6, 0.5, 1 - 1e-6, 1.0):
        pred = model(x, torch.full((7,), t))
        assert pred.x0.dtype == pred.eps.dtype == torch.float32
        assert torch.isfinite(pred.x0).all() and torch.isfinite(pred.eps).all(), t
        assert torch.isfinite(mix.score(x, t, process)).all() and torch.isfinite(mix.log_prob(x, t, process)).all()
    if process.name in ("rf", "edm"):                       # sigma(0) = 0: the data point is its own denoising
        pred = model(x, torch.zeros(7))
        torch.testing.assert_close(pred.x0, x)
        assert (pred.eps == 0).all()


def test_rf_at_t1_denoises_to_the_data_mean():
    mix = random_mixture()
    x = torch.randn(5, 2, generator=gen(), dtype=torch.float64)
    pred = mix.denoiser(RectifiedFlow())(x, torch.ones(5))      # alpha = 0: x_1 carries no information on x0
    torch.testing.assert_close(pred.x0, mix.mean().expand(5, 2))


def test_conditional_denoiser_and_null_label():
    mix, vp = gmm8(), VPCosine()
    x, t, _ = noisy_batch(mix, vp, n=32)
    for k in (0, 5):
        only_k = GaussianMixture(torch.ones(1), mix.means[k:k + 1], mix.covariances[k:k + 1])
        ref = only_k.denoiser(vp)(x, t)
        got = mix.denoiser(vp, label=k)(x, t)
        torch.testing.assert_close(got.x0, ref.x0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mix.log_prob(x, t, vp, torch.full((32,), k)), only_k.log_prob(x, t, vp))
    null = labels(torch.full((32,), mix.num_classes), mix.num_classes)
    torch.testing.assert_close(mix.denoiser(vp)(x, t, null).x0, mix.denoiser(vp)(x, t).x0)
    torch.testing.assert_close(mix.denoiser(vp)(x, t, labels(torch.full((32,), 5), 8)).x0,
                               mix.denoiser(vp, label=5)(x, t).x0)          # a Cond overrides the fixed label
    zeros = labels(torch.zeros(32, dtype=torch.long), mix.num_classes)
    guided = cfg(mix.denoiser(vp), w=2.0)(x, t, zeros)
    c, u = mix.denoiser(vp)(x, t, zeros).x0, mix.denoiser(vp)(x, t).x0
    torch.testing.assert_close(guided.x0, 3 * c - 2 * u)
    with pytest.raises(ValueError, match="labels must be in 0..7"):
        mix.denoiser(vp)(x, t, labels(torch.full((32,), 9), 8))
    with pytest.raises(TypeError, match="conditioning.labels"):
        mix.denoiser(vp)(x, t, torch.zeros(32, dtype=torch.long))


def test_shared_classes_and_posterior_class_probs():
    mix = gmm8()
    x, y = mix.sample(4000, gen())
    probs = mix.posterior_class_probs(x)
    assert probs.shape == (4000, 8)
    torch.testing.assert_close(probs.sum(1), torch.ones(4000))
    assert (probs.argmax(1) == y).float().mean() > 0.99        # modes ~7.6 std apart
    halves = GaussianMixture(mix.weights, mix.means, mix.covariances, torch.arange(8) // 4)
    assert halves.num_classes == 2 and halves.posterior_class_probs(x).shape == (4000, 2)
    torch.testing.assert_close(halves.posterior_class_probs(x)[:, 0], probs[:, :4].sum(1))


# ---------------------------------------------------------------------------------------------------------------
# Gaussian data: the probability-flow ODE in closed form
# ---------------------------------------------------------------------------------------------------------------

MU, STD = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5


@pytest.mark.parametrize("process", [VPCosine(), RectifiedFlow()], ids=["vp-cosine", "rf"])
@pytest.mark.parametrize("sampler, steps", [(heun, 200), (dpm_solver_pp_2m, 400)], ids=["heun", "dpmpp2m"])
def test_ode_samplers_match_gaussian_flow_map(process, sampler, steps):
    """Every state along the path from t = 1 matches the closed-form flow map. DPM-Solver++(2M) gets 400 steps:
    on a uniform-in-t grid its log-SNR steps are very uneven near both ends, and at 200 steps it is still ~1e-3 off."""
    mix = GaussianMixture.isotropic(MU[None], STD)
    x1 = process.prior((256, 2), gen(), dtype=torch.float64)
    ts = grids.uniform(steps)
    path = sampler(mix.denoiser(process), x1, ts, process, return_path=True)      # (steps + 1, 256, 2)
    exact = torch.stack([gaussian_map(x1, 1.0, float(t), process, MU, STD) for t in ts])
    assert (path - exact).abs().max() < 1e-3, float((path - exact).abs().max())


@pytest.mark.parametrize("process", [VPCosine(), RectifiedFlow()], ids=["vp-cosine", "rf"])
def test_second_order_samplers_converge_at_second_order(process):
    mix = GaussianMixture.isotropic(MU[None], STD)
    x1 = process.prior((64, 2), gen(), dtype=torch.float64)
    exact = gaussian_map(x1, 1.0, 0.0, process, MU, STD)

    def err(sampler, n):
        return float((sampler(mix.denoiser(process), x1, grids.uniform(n), process) - exact).abs().max())

    assert 3.5 < err(heun, 50) / err(heun, 100) < 4.5                        # clean h^2 behaviour
    assert err(dpm_solver_pp_2m, 200) / err(dpm_solver_pp_2m, 400) > 3.0     # tends to 4 as steps grow


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_gaussian_flow_map_function(process):
    x = 3 * torch.randn(16, 2, generator=gen(), dtype=torch.float64)
    iso = GaussianMixture.isotropic(MU[None], STD)
    torch.testing.assert_close(gaussian_flow_map(iso, x, 0.8, 0.1, process), gaussian_map(x, 0.8, 0.1, process, MU, STD))
    full = random_mixture(K=1)                          # anisotropic: the map scales each eigen-direction
    x = full.marginal(0.9, process).sample(64, gen(), dtype=torch.float64)[0]
    ts = grids.uniform(200, 0.9, 0.2)
    got = heun(full.denoiser(process), x, ts, process)
    assert (got - gaussian_flow_map(full, x, 0.9, 0.2, process)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="single Gaussian"):
        gaussian_flow_map(gmm8(), x, 0.9, 0.2, process)


def test_ddim_equals_euler_for_rectified_flow():
    """alpha, sigma linear in t => x_t + (s - t)(eps - x0) = (1 - s) x0 + s eps: DDIM is Euler, for any model."""
    rf, mix = RectifiedFlow(), gmm8()
    x1 = rf.prior((64, 2), gen(), dtype=torch.float64)
    ts = grids.uniform(7)
    torch.testing.assert_close(ddim(mix.denoiser(rf), x1, ts, rf), euler(mix.denoiser(rf), x1, ts, rf))


@pytest.mark.parametrize("process, t, s", [(VPCosine(), 0.8, 0.3), (RectifiedFlow(), 0.8, 0.3), (EDM(), 0.02, 0.004)],
                         ids=IDS)
def test_one_ddim_step_on_gaussian_data(process, t, s):
    """With the exact denoiser of N(mu, std^2 I), one DDIM step t -> s is
        x_s = a_s mu + (a_s a_t std^2 + sig_s sig_t) / std_t^2 (x_t - a_t mu) = a_s mu + cos(theta) (std_s / std_t)(...)
    where theta is the angle between (a_s std, sig_s) and (a_t std, sig_t); cos(theta) < 1 unless the two
    vectors are parallel (Cauchy-Schwarz). So a single step is exact for a point mass (std -> 0, where
    x0_hat = mu and the flow map is a_s mu + (sig_s / sig_t)(x_t - a_t mu)) but otherwise shrinks the deviation
    from the mean; for rf, one step from t = 1 returns the posterior mean E[x0 | x_1] = mu for every x_1."""
    x_t = 2 * torch.randn(32, 2, generator=gen(), dtype=torch.float64)
    tt, ss = torch.full((32,), t, dtype=torch.float64), torch.full((32,), s, dtype=torch.float64)
    ts = torch.tensor([t, s], dtype=torch.float64)

    a_t, sg_t, a_s, sg_s = (float(f(torch.tensor(v, dtype=torch.float64)))
                            for v in (t, s) for f in (process.alpha, process.sigma))
    gauss = GaussianMixture.isotropic(MU[None], STD)
    one_step = ddim(gauss.denoiser(process), x_t, ts, process)
    u, v = torch.tensor([a_s * STD, sg_s], dtype=torch.float64), torch.tensor([a_t * STD, sg_t], dtype=torch.float64)
    cos_theta = float(u @ v / (u.norm() * v.norm()))
    exact = gaussian_map(x_t, t, s, process, MU, STD)
    torch.testing.assert_close(one_step - a_s * MU, cos_theta * (exact - a_s * MU), rtol=1e-10, atol=1e-10)
    assert cos_theta < 1 - 1e-4                                 # so the single step is NOT the flow map here

    # a point mass (std -> 0) has straight trajectories; DDIM is then exact in one step, from any t to any s
    point = GaussianMixture.isotropic(MU[None], 1e-7)
    torch.testing.assert_close(ddim(point.denoiser(process), x_t, ts, process),
                               gaussian_map(x_t, t, s, process, MU, 1e-7), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gaussian_flow_map(point, x_t, tt, ss, process),
                               gaussian_map(x_t, t, s, process, MU, 1e-7))

    if process.name == "rf":                                    # alpha_1 = 0: one step collapses onto the mean
        x1 = torch.randn(32, 2, generator=gen(2), dtype=torch.float64)
        out = ddim(gauss.denoiser(process), x1, grids.uniform(1), process)
        torch.testing.assert_close(out, MU.expand(32, 2))


def test_ddim_converges_to_the_flow_map_at_first_order():
    rf = RectifiedFlow()
    mix = GaussianMixture.isotropic(MU[None], STD)
    x1 = rf.prior((64, 2), gen(), dtype=torch.float64)
    exact = gaussian_map(x1, 1.0, 0.0, rf, MU, STD)
    err = [float((ddim(mix.denoiser(rf), x1, grids.uniform(n), rf) - exact).abs().max()) for n in (25, 50, 100, 200)]
    for coarse, fine in zip(err, err[1:]):
        assert 1.7 < coarse / fine < 2.3, err                   # halving the step halves the error
    assert err[-1] < 2e-2


# ---------------------------------------------------------------------------------------------------------------
# Samplers of the datasets
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DATASETS_2D))
def test_dataset_samplers_contract(name):
    x, y = sample_2d(name, 3000, gen(0))
    assert x.shape == (3000, 2) and x.dtype == torch.float32
    assert y.shape == (3000,) and y.dtype == torch.long
    C = num_classes(name)
    assert y.min() >= 0 and y.max() < C and len(torch.unique(y)) == C
    assert torch.isfinite(x).all() and 0.5 < float(x.std()) < 1.6
    x2, y2 = sample_2d(name, 3000, gen(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = sample_2d(name, 3000, gen(1))
    assert not torch.equal(x, x3)
    assert sample_2d(name, 0, gen())[0].shape == (0, 2)


def test_checkerboard_points_lie_in_their_square():
    x, y = sample_2d("checkerboard", 2000, gen())
    cell = torch.floor(x + 2).long()                      # (column, row) in 0..3
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    assert torch.equal(cell[:, 1] * 2 + cell[:, 0] // 2, y)   # row-major index among the filled squares


@pytest.mark.parametrize("mix", [gmm8(), random_mixture(3)], ids=["gmm8", "random"])
def test_mixture_moments_match_samples(mix):
    n = 40_000
    x, y = mix.sample(n, gen(), dtype=torch.float64)
    m, C = mix.mean(), mix.covariance()
    se = torch.sqrt(torch.diagonal(C) / n)
    assert ((x.mean(0) - m).abs() < 5 * se).all()
    assert (torch.cov(x.T) - C).abs().max() < 0.03 * float(torch.diagonal(C).max())
    freq = torch.bincount(y, minlength=mix.num_components).double() / n
    assert (freq - mix.weights).abs().max() < 0.01


def test_user_mixture_is_a_dataset():
    mix = random_mixture()
    x, y = sample_2d(mix, 10, gen())
    assert x.shape == (10, 2) and num_classes(mix) == 3 and get_mixture(mix) is mix
    assert isinstance(exact_denoiser(mix, RectifiedFlow()), ExactDenoiser)
    assert isinstance(exact_denoiser("gmm", RectifiedFlow()), ExactDenoiser)


# ---------------------------------------------------------------------------------------------------------------
# Errors say what is valid
# ---------------------------------------------------------------------------------------------------------------

def test_unknown_dataset_lists_valid_names():
    for call in (lambda: sample_2d("moons", 10), lambda: num_classes("moons"),
                 lambda: exact_denoiser("moons", RectifiedFlow())):
        with pytest.raises(ValueError) as err:
            call()
        for name in DATASETS_2D:
            assert name in str(err.value)


def test_no_exact_denoiser_error_names_the_ones_that_exist():
    with pytest.raises(ValueError, match="no closed-form.*gmm"):
        exact_denoiser("checkerboard", RectifiedFlow())


def test_mixture_validation():
    eye = torch.eye(2)[None]
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        GaussianMixture(torch.ones(2), torch.zeros(1, 2), eye)
    with pytest.raises(ValueError, match="process"):
        gmm8().score(torch.zeros(3, 2), 0.5, None)
    with pytest.raises(ValueError, match="n must be"):
        sample_2d("gmm", -1)
    assert math.isclose(float(gmm8().weights.sum()), 1.0)
