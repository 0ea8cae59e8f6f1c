"""Rectified flow and reflow (course_lib.distill.reflow): analytic properties on Gaussian data, caches, checkpoints."""
import math
from functools import partial

import pytest
import torch

from course_lib import data2d, metrics, samplers
from course_lib.checkpoint import CheckpointError
from course_lib.conditioning import labels
from course_lib.data2d import GaussianMixture
from course_lib.distill import reflow
from course_lib.grids import uniform
from course_lib.losses import denoising_loss
from course_lib.models import Denoiser, MLP2D, save_denoiser
from course_lib.predictions import Pred
from course_lib.processes import RectifiedFlow, VPCosine
from course_lib.train import TrainConfig
from conftest import mlp_denoiser

RF = RectifiedFlow()
GAUSS = GaussianMixture.isotropic(torch.tensor([[1.0, -0.5]], dtype=torch.float64), 0.3)  # N(mu, 0.3^2 I)
tiny_flow = partial(mlp_denoiser, RF, dtype=torch.float32, kind="velocity")   # tiny_flow(seed=0, hidden=16)


def gaussian_pairs(n, seed=0):
    """The exact ODE coupling of 1-RF on Gaussian data: x0 = flow map of eps from t = 1 to t = 0 (closed form)."""
    eps = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return eps, data2d.gaussian_flow_map(GAUSS, eps, 1.0, 0.0, RF)


class StraightFlow:
    """The rectified flow of the Gaussian ODE coupling, in closed form. The coupling is affine, x0 = mu + A eps, so
    on the line x_t = (1 - t) x0 + t eps = (1 - t) mu + M_t eps with M_t = (1 - t) A + t I, and the velocity of the
    pair through x_t is u(x_t, t) = eps - x0 = (I - A) M_t^{-1} (x_t - (1 - t) mu) - mu."""

    process = RF

    def __init__(self):
        self.mu = GAUSS.means[0]
        self.A = 0.3 * torch.eye(2, dtype=torch.float64)   # the flow map of N(mu, s^2 I) from t = 1 scales by s

    def __call__(self, x, t, cond=None):
        tt = t.reshape(-1, 1, 1)
        M = (1 - tt) * self.A + tt * torch.eye(2, dtype=x.dtype)
        eps = torch.linalg.solve(M, (x - (1 - t[:, None]) * self.mu).unsqueeze(-1)).squeeze(-1)
        u = eps @ (torch.eye(2, dtype=x.dtype) - self.A).T - self.mu
        return Pred(x - t[:, None] * u, x + (1 - t[:, None]) * u)        # x0 = x - t u, eps = x + (1 - t) u


def test_rf_loss_vanishes_for_the_exact_velocity_of_a_deterministic_coupling():
    eps, x0 = gaussian_pairs(500)
    t = torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    flow = StraightFlow()
    assert reflow.rf_loss_at(flow, x0, eps, t).max() < 1e-20
    # with the pairs shuffled (an independent coupling) no field can fit every line: the loss is far from zero
    assert reflow.rf_loss_at(flow, x0[torch.randperm(500)], eps, t).mean() > 0.1


def test_one_rf_loss_is_flow_matching():
    # 1-RF from the independent coupling is the course's flow-matching loss: same draws, same per-sample values
    model, x0 = tiny_flow(), torch.randn(64, 2)
    a = reflow.rf_loss(model, x0, torch.Generator().manual_seed(3))
    b = denoising_loss(model, x0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_reflow_of_the_gaussian_ode_coupling_is_straight_and_one_euler_step_is_exact():
    eps, x0 = gaussian_pairs(300, seed=2)
    flow = StraightFlow()
    # the velocity along each pair's line is constant in t: the pair's own eps - x0 at every time
    for t in (0.1, 0.5, 0.9):
        tt = torch.full((300,), t, dtype=torch.float64)
        u = flow(RF.marginal(x0, tt, eps), tt)
        torch.testing.assert_close(u.eps - u.x0, eps - x0)
    assert reflow.straightness(flow, eps, steps=32) < 1e-20
    one = samplers.euler(flow, eps, uniform(1), RF)
    torch.testing.assert_close(one, x0)                                       # one Euler step = the ODE solution
    torch.testing.assert_close(samplers.euler(flow, eps, uniform(64), RF), x0)


def test_straightness_zero_for_lines_positive_for_curves():
    ts = uniform(16)
    a, b = torch.randn(50, 2), torch.randn(50, 2)
    line = torch.stack([(1 - t) * a + t * b for t in ts.tolist()])
    assert metrics.straightness(line, ts) < 1e-10
    curve = torch.stack([(1 - t) * a + t * b + math.sin(math.pi * t) * torch.ones(2) for t in ts.tolist()])
    assert metrics.straightness(curve, ts) > 0.5
    # the 1-RF of the Gaussian (its exact ODE from the independent coupling) is curved; its reflow is not
    exact = data2d.exact_denoiser(GAUSS, RF)
    eps, _ = gaussian_pairs(300)
    assert reflow.straightness(exact, eps, steps=32) > 0.05
    assert reflow.straightness(StraightFlow(), eps, steps=32) < 1e-20


def test_generate_pairs_solves_the_ode_in_batches():
    flow = data2d.exact_denoiser(GAUSS, RF)
    eps, x0 = gaussian_pairs(100)
    e, x = reflow.generate_pairs(flow, eps, steps=64, sampler="heun", process=RF, batch_size=32)
    assert e is eps and x.shape == x0.shape
    assert metrics.flow_map_error(x, x0) < 1e-3


def test_rf_view_of_a_diffusion_model_is_the_same_flow():
    # the exact denoiser of a mixture is the posterior mean, whatever the process: read in rf time through RFView,
    # the vp-cosine one must give the rf one's prediction at every (x, t)
    view = reflow.RFView(data2d.exact_denoiser("gmm", VPCosine()))
    exact_rf = data2d.exact_denoiser("gmm", RF)
    x = 2 * torch.randn(40, 2, dtype=torch.float64)
    for t in (0.05, 0.5, 0.95):
        tt = torch.full((40,), t, dtype=torch.float64)
        got, want = view(x, tt), exact_rf(x, tt)
        torch.testing.assert_close(got.x0, want.x0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.eps, want.eps, rtol=1e-6, atol=1e-6)


def test_pair_cache_hit_miss_and_mismatch(tmp_path, monkeypatch, capsys):
    flow, other = tiny_flow(0), tiny_flow(1)
    eps, x0 = reflow.cached_pairs(flow, "toy", 50, steps=4, cache_dir=tmp_path, progress=False)     # miss: generated
    assert (tmp_path / "toy-euler4-n50-seed0.safetensors").exists()
    torch.testing.assert_close(x0, samplers.euler(flow, eps, uniform(4), RF))

    def boom(*a, **k):
        raise AssertionError("a cache hit must not regenerate")

    monkeypatch.setattr(reflow, "generate_pairs", boom)
    e2, x2 = reflow.cached_pairs(flow, "toy", 50, steps=4, cache_dir=tmp_path, progress=False)     # hit
    assert torch.equal(e2, eps) and torch.equal(x2, x0)
    with pytest.raises(reflow.PairCacheError, match="toy-euler4-n50-seed0.safetensors.*another flow.*delete"):
        reflow.cached_pairs(other, "toy", 50, steps=4, cache_dir=tmp_path, progress=False)           # mismatch
    monkeypatch.undo()
    _, x3 = reflow.cached_pairs(other, "toy", 50, steps=4, cache_dir=tmp_path, progress=False, on_mismatch="regenerate")
    assert "Regenerating" in capsys.readouterr().out and not torch.equal(x3, x0)
    # other settings are another file (a miss), and a fingerprint changes with any weight
    reflow.cached_pairs(other, "toy", 60, steps=4, cache_dir=tmp_path, progress=False)
    assert (tmp_path / "toy-euler4-n60-seed0.safetensors").exists()
    before = reflow.fingerprint(flow)
    with torch.no_grad():
        flow.net.out.bias[0] += 1e-6
    assert reflow.fingerprint(flow) != before


def test_reflow_from_a_mismatched_checkpoint_is_a_clear_error(tmp_path):
    save_denoiser(tmp_path / "flow", tiny_flow(hidden=16))
    pairs = gaussian_pairs(20)
    cfg = TrainConfig(steps=1, batch_size=8, ema_decay=0.0)
    with pytest.raises(CheckpointError, match="flow"):
        reflow.distill_reflow(tmp_path / "flow", tuple(p.float() for p in pairs), reflow.ReflowConfig(), run=cfg,
                              init=tiny_flow(hidden=32), progress=False)
    with pytest.raises(CheckpointError, match="missing"):
        reflow.distill_reflow(tmp_path / "nothing", pairs, reflow.ReflowConfig(), run=cfg, init=tiny_flow(),
                              progress=False)
    _, state = reflow.distill_reflow(tmp_path / "flow", tuple(p.float() for p in pairs), reflow.ReflowConfig(), run=cfg,
                                     init=tiny_flow(hidden=16, seed=5), progress=False)
    assert state.step == 1


def test_reflow_leaves_the_previous_flow_untouched_and_straightens_it():
    teacher = data2d.exact_denoiser("gmm", RF)
    x1 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    pairs = reflow.generate_pairs(teacher, x1, steps=16, sampler="heun", process=RF)
    start = tiny_flow(hidden=64)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    cfg = TrainConfig(steps=300, batch_size=256, lr=3e-3, lr_schedule="linear", ema_decay=0.0)
    flow2, _ = reflow.distill_reflow(start, pairs, reflow.ReflowConfig(), run=cfg, progress=False)
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        s1 = reflow.straightness(teacher, x1[:500].double(), 32)
        s2 = reflow.straightness(flow2, x1[:500], 32)
    assert s2 < 0.2 * s1


@pytest.mark.parametrize("k", [1, 2])
def test_k_step_distillation_lowers_the_k_step_error(k):
    # a 1-RF of Gaussian data, trained from the independent coupling (curved: its one Euler step returns ~ the mean)
    from course_lib.train import train

    torch.manual_seed(0)
    flow = Denoiser(MLP2D(hidden=64, depth=2), RF, "velocity")
    cfg = TrainConfig(steps=200, batch_size=256, lr=3e-3, lr_schedule="linear", ema_decay=0.0)
    train(flow, lambda m, x0, g: reflow.rf_loss(m, x0, g), lambda n, g: GAUSS.sample(n, g)[0].float(), cfg,
          progress=False)
    flow.eval()
    eps = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    eps, x0 = reflow.generate_pairs(flow, eps, steps=16, sampler="heun")
    with torch.no_grad():
        before = metrics.flow_map_error(samplers.euler(flow, eps, uniform(k), RF), x0)
    student, _ = reflow.distill_kstep(flow, (eps, x0), reflow.KStepConfig(k), run=cfg, progress=False)
    with torch.no_grad():
        after = metrics.flow_map_error(samplers.euler(student, eps, uniform(k), RF), x0)
    assert after < 0.5 * before


def test_distill_times_are_the_euler_start_times():
    t = reflow.distill_times(4, 1000, torch.Generator().manual_seed(0))
    assert set(torch.unique(t).tolist()) == {1.0, 0.75, 0.5, 0.25}
    assert set(reflow.distill_times(1, 10, torch.Generator()).tolist()) == {1.0}


def test_pair_cache_records_the_conditioning(tmp_path):
    flow = tiny_flow()
    y = torch.arange(10)
    reflow.cached_pairs(flow, "c", 10, steps=2, cache_dir=tmp_path, cond=None, progress=False)
    with pytest.raises(reflow.PairCacheError, match="other settings.*cond"):
        reflow.cached_pairs(flow, "c", 10, steps=2, cache_dir=tmp_path, cond=labels(y, 10), progress=False)


# --- the figures of notebooks 03 and 04 (course_lib.figures) ----------------------------------------------------

def test_crossing_share_counts_crossing_segments():
    from course_lib.figures import crossing_share

    eps = torch.tensor([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    x0 = torch.tensor([[1.0, 1.0], [1.0, 0.0], [6.0, 5.0]])       # the first two cross, the third crosses neither
    assert crossing_share(eps, x0) == pytest.approx(1 / 3)
    assert crossing_share(eps, eps + torch.tensor([1.0, 0.0])) == 0.0  # parallel shifts never cross


def test_reflow_explorer_draws_every_round_and_its_static_fallback():
    from course_lib.data2d import exact_denoiser, sample_2d
    from course_lib.figures import ROUND0, ReflowExplorer
    from course_lib.processes import RectifiedFlow

    g = torch.Generator().manual_seed(0)
    flow = exact_denoiser("gmm", RectifiedFlow())
    x_show, x_many = torch.randn(12, 2, generator=g), torch.randn(30, 2, generator=g)
    data = {"gmm": (sample_2d("gmm", 12, g)[0], sample_2d("gmm", 30, g)[0])}
    ex = ReflowExplorer({"gmm": {"1-RF": flow}}, data, x_show, x_many, steps=(1, 4), ode_steps=8)
    assert ex.rounds == [ROUND0, "1-RF"]
    path = ex.paths[("gmm", "1-RF", 4)]
    assert path.shape == (5, 12, 2)
    assert ex.at_time(path, 1.0) == pytest.approx(x_show.numpy()) and ex.at_time(path, 0.0) == pytest.approx(path[-1])
    line = ex.paths[("gmm", ROUND0, 4)]                  # round 0: straight lines from the noise to independent data
    assert line[0] == pytest.approx(x_show.numpy()) and line[-1] == pytest.approx(data["gmm"][0].numpy())
    for rnd in ex.rounds:
        assert ex.draw("gmm", rnd, 4, 0.5) is ex.fig
    assert "<script" in ex.animation_html(frames_per_round=2, n_paths=5)
