"""Distribution matching distillation (distill.dmd): the distribution-matching gradient against the closed form for
two Gaussians (it points from the real distribution to the fake one, and vanishes when they agree), the loss's
gradient with respect to the generator sample, the fake score's loss (no gradient to the generator), DMD2's two
time-scale loop, backward simulation, the generator's grid, a short DMD2 / DMD run through the engine (2D, with the
GAN head and the regression pairs; digits-sized UNet), the divergence guard (a NaN stops the run, the last checkpoint
holds finite weights), bad inputs; and the checkers of notebook 09 against planted mistakes."""
from __future__ import annotations

import pytest
import torch

from course_lib import checks
from course_lib.data2d import ExactDenoiser, GaussianMixture, sample_2d
from course_lib.distill import dmd
from course_lib.distill.gan import GANDiverged
from course_lib.predictions import Pred
from course_lib.processes import VPCosine
from course_lib.train import TrainConfig
from conftest import mlp_denoiser


def _gauss(mean, std=0.5):
    return GaussianMixture.isotropic(torch.tensor([mean], dtype=torch.float64), std)


# --- the distribution-matching gradient -----------------------------------------------------------------------------

def test_dm_gradient_is_the_closed_form_for_two_gaussians():
    """real N(m_r, s^2 I), fake N(m_f, s^2 I): x0_fake - x0_real = (m_f - m_r) sigma^2 / (alpha^2 s^2 + sigma^2), so
    g = that / mean|x - x0_real|: parallel to m_f - m_r with a positive factor (descent moves x towards the real
    mean); and d L_DM / dx = g / D."""
    proc, s = VPCosine(), 0.5
    m_r, m_f = [1.0, -0.5], [-0.3, 0.8]
    real, fake = ExactDenoiser(_gauss(m_r, s), proc), ExactDenoiser(_gauss(m_f, s), proc)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    t = 0.05 + 0.9 * torch.rand(64, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    loss = dmd.dm_loss(x, real, fake, proc, t, eps)
    (dx,) = torch.autograd.grad(loss.sum(), x)
    a, sg = proc.alpha(t)[:, None], proc.sigma(t)[:, None]
    x_t = a * x.detach() + sg * eps
    x0_real = real(x_t, t).x0
    coef = sg**2 / (a**2 * s**2 + sg**2)
    norm = (x.detach() - x0_real).abs().mean(1, keepdim=True)
    want = coef * (torch.tensor(m_f) - torch.tensor(m_r)).double() / norm
    torch.testing.assert_close(dx, want / 2, rtol=1e-6, atol=1e-10)          # D = 2
    torch.testing.assert_close(loss, 0.5 * want.pow(2).mean(1), rtol=1e-6, atol=1e-10)


def test_dm_gradient_vanishes_when_fake_equals_real_and_batch_norm_is_shared():
    proc = VPCosine()
    real = ExactDenoiser(_gauss([0.3, 0.2]), proc)
    x = torch.randn(16, 2, dtype=torch.float64, requires_grad=True)
    t, eps = torch.full((16,), 0.5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    (dx,) = torch.autograd.grad(dmd.dm_loss(x, real, real, proc, t, eps).sum(), x)
    assert dx.abs().max() == 0
    x0r, x0f = torch.randn(5, 3), torch.randn(5, 3)
    xx = torch.randn(5, 3)
    gb = dmd.dm_gradient(xx, x0r, x0f, "batch")
    torch.testing.assert_close(gb, (x0f - x0r) / (xx - x0r).abs().mean())
    with pytest.raises(ValueError, match="normalize"):
        dmd.dm_gradient(xx, x0r, x0f, "pixel")


def test_dm_gradient_is_finite_where_the_normaliser_is_zero():
    x = torch.zeros(3, 2)
    g = dmd.dm_gradient(x, torch.zeros(3, 2), torch.ones(3, 2))
    assert torch.isfinite(g).all()


def test_fake_score_loss_trains_the_fake_score_only():
    proc = VPCosine()
    fake = mlp_denoiser(proc, 1)
    W = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    z = torch.randn(8, 2, dtype=torch.float64)
    t, eps = torch.rand(8, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    loss = dmd.fake_score_loss(fake, z @ W, t, eps)
    assert loss.shape == (8,)
    gW, *gp = torch.autograd.grad(loss.sum(), [W, *fake.parameters()], allow_unused=True)
    assert gW is None and any(p is not None and p.abs().max() > 0 for p in gp)
    # the value is the ordinary v-prediction loss on x
    x = (z @ W).detach()
    x_t = proc.marginal(x, t, eps)
    v = proc.alpha(t)[:, None] * eps - proc.sigma(t)[:, None] * x
    torch.testing.assert_close(loss.detach(), (fake.raw(x_t, t, None) - v).pow(2).mean(1))


# --- the grid, backward simulation ---------------------------------------------------------------------------------

def test_generator_times_and_backward_simulation():
    assert dmd.generator_times(4) == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="at least one step"):
        dmd.generator_times(0)
    proc = VPCosine()
    exact = ExactDenoiser(_gauss([0.5, -0.5], 0.3), proc)
    z = torch.randn(32, 2, dtype=torch.float64)
    times = dmd.generator_times(4)
    assert torch.equal(dmd.backward_simulate(exact, z, 0, times, proc, torch.Generator().manual_seed(0)), z)
    # step i = 2: two denoise / re-noise rounds with the same generator's noise, by hand
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = dmd.backward_simulate(exact, z, 2, times, proc, g1)
    x = z
    for j in range(2):
        x0 = exact(x, torch.full((32,), times[j], dtype=torch.float64)).x0
        x = proc.marginal(x0, torch.full((32,), times[j + 1], dtype=torch.float64),
                          torch.randn(z.shape, generator=g2).double())
    torch.testing.assert_close(got, x)
    # k-step sampling ends with the generator's x0 at the last grid time (float64 in, float64 out)
    out = dmd.sample(exact, z, 4, proc, torch.Generator().manual_seed(1))
    assert out.shape == z.shape and torch.isfinite(out).all()


# --- training through the engine ------------------------------------------------------------------------------------

def _data(n, g):
    return {"x": sample_2d("gmm", n, g)[0]}


@pytest.mark.parametrize("cfg", [dmd.DMDConfig(ttur=3, gan=True, normalize="batch", gen_steps=2),
                                 dmd.DMDConfig(ttur=1, gan=False, lambda_reg=0.25, normalize="batch")],
                         ids=["dmd2-gan-2step", "dmd-regression"])
def test_short_run_updates_in_the_ratio_and_changes_the_generator(cfg, tmp_path):
    teacher = mlp_denoiser(VPCosine(), 0, torch.float32, hidden=32).requires_grad_(False).eval()
    z_ref, x_ref = torch.randn(64, 2), sample_2d("gmm", 64, torch.Generator().manual_seed(5))[0]

    def batches(n, g):
        i = torch.randint(64, (n,), generator=g)
        return {**_data(n, g), "z_ref": z_ref[i], "x_ref": x_ref[i]}

    G, done = dmd.distill_dmd(teacher, batches, cfg, run=TrainConfig(steps=6, batch_size=32, seed=0),
                              example={"x": sample_2d("gmm", 8)[0]}, ckpt_dir=tmp_path / "run", progress=False)
    assert done.updates == {"generator": len(range(0, 6, cfg.ttur)), "critic": 6}
    before = dict(teacher.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in G.named_parameters())
    assert (done.nets["critic"].head is not None) == cfg.gan
    x = dmd.sample(G, torch.randn(16, 2), cfg.gen_steps, teacher.process, torch.Generator().manual_seed(0))
    assert x.shape == (16, 2) and torch.isfinite(x).all()


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """Real data turn NaN at iteration 7 (a corrupted batch; a NaN in the teacher would not do: dm_gradient sets NaNs
    to 0, as DMD2 does): the critic's GAN loss is NaN, the guard stops the run before that update, and the
    checkpoints on disk hold finite weights."""
    from safetensors.torch import load_file

    calls = [0]

    def data(n, g):
        calls[0] += 1
        x = sample_2d("gmm", n, g)[0]
        return {"x": x * float("nan") if calls[0] > 7 else x}

    cfg = dmd.DMDConfig(ttur=1, gan=True, normalize="batch")
    teacher = mlp_denoiser(VPCosine(), 0, torch.float32, hidden=32).requires_grad_(False).eval()
    with pytest.raises(GANDiverged, match="critic loss is NaN"):
        dmd.distill_dmd(teacher, data, cfg, run=TrainConfig(steps=20, batch_size=16, ckpt_every=2),
                        example={"x": sample_2d("gmm", 8)[0]}, ckpt_dir=tmp_path, progress=False)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert files, "no checkpoint was written before the divergence"
    for f in files:
        assert all(torch.isfinite(v).all() for v in load_file(str(f)).values() if v.is_floating_point())


def test_unknown_regression_distance_is_explained():
    from course_lib import distances

    with pytest.raises(ValueError, match="unknown regression distance 'lpips-vgg'; valid: l2, pseudo-huber"):
        distances.get("lpips-vgg", "regression distance")


# --- the checkers of notebook 09 ------------------------------------------------------------------------------------

def _right_dm_loss(x, real, fake, process, t, eps, normalize):
    return dmd.dm_loss(x, real, fake, process, t, eps, normalize=normalize)


def _dm_variant(sign=1.0, norm=True, detach=True):
    def loss(x, real, fake, process, t, eps, normalize):
        with torch.no_grad():
            x_t = process.marginal(x.detach(), t, eps)
            x0_real, x0_fake = real(x_t, t).x0, fake(x_t, t).x0
        g = sign * (x0_fake - x0_real)
        if norm:
            n = (x.detach() - x0_real).abs().mean(1, keepdim=True)
            g = g / (n.mean() if normalize == "batch" else n)
        target = (x.detach() - g) if detach else (x - g)
        return 0.5 * (x - target).pow(2).mean(1)
    return loss


def _live_target(x, real, fake, process, t, eps, normalize):
    """No stop-gradient anywhere: x_t, the denoisers and g all carry x's gradient."""
    x_t = process.marginal(x, t, eps)
    x0_real, x0_fake = real(x_t, t).x0, fake(x_t, t).x0
    n = (x - x0_real).abs().mean(1, keepdim=True)
    g = (x0_fake - x0_real) / (n.mean() if normalize == "batch" else n)
    return 0.5 * (x - (x - g)).pow(2).mean(1)


@pytest.mark.parametrize("wrong,says", [
    (_dm_variant(sign=-1.0), "wrong sign"),
    (_dm_variant(norm=False), "normalisation is missing"),
    (_dm_variant(detach=False), "stop-gradient"),
    (_live_target, "stop-gradient"),
])
def test_dm_loss_checker_rejects_planted_mistakes(wrong, says, capsys):
    assert checks.check_dm_loss(_right_dm_loss, seed=0) is _right_dm_loss
    assert "correct" in capsys.readouterr().out
    used = checks.check_dm_loss(wrong, seed=0)
    assert used is not wrong and checks.is_library(used)
    assert says in capsys.readouterr().out


def test_fake_score_loss_checker(capsys):
    right = lambda fake, x, t, eps: dmd.fake_score_loss(fake, x, t, eps)

    def live_x(fake, x, t, eps):
        from course_lib.predictions import from_pred
        x_t = fake.process.marginal(x, t, eps)
        target = from_pred(Pred(x, eps), t, fake.process, fake.parameterization)
        return (fake.raw(x_t, t, None) - target).pow(2).mean(1)

    assert checks.check_fake_score_loss(right, seed=0) is right
    assert checks.is_library(checks.check_fake_score_loss(live_x, seed=0))
    assert "gradients into the generator" in capsys.readouterr().out


def _wrong_normaliser(x, real, fake, process, t, eps, normalize):     # "sample" and "batch" swapped
    return _right_dm_loss(x, real, fake, process, t, eps, "batch" if normalize == "sample" else "sample")


@pytest.mark.parametrize("answer_dtype", [torch.float32, torch.float64])
def test_dm_and_fake_score_checkers_accept_float32_and_float64_answers(answer_dtype, capsys):
    dm = lambda *a: _right_dm_loss(*a).to(answer_dtype)
    fake = lambda f, x, t, eps: dmd.fake_score_loss(f, x, t, eps).to(answer_dtype)
    assert checks.check_dm_loss(dm, seed=0) is dm
    assert checks.check_fake_score_loss(fake, seed=0) is fake
    out = capsys.readouterr().out
    assert out.count("correct") == 2 and out.count("Exercise 9.") == 2, out     # one verdict each


def test_dm_checker_names_a_swapped_normaliser_and_zeros_without_the_recipe(capsys):
    assert checks.is_library(checks.check_dm_loss(_wrong_normaliser, seed=0))
    assert "ONE number, the mean of |x - x0_real| over all B x D entries" in capsys.readouterr().out
    zeros = lambda x, *rest: torch.zeros(len(x), dtype=x.dtype)
    for check in (checks.check_dm_loss, lambda fn, seed: checks.check_fake_score_loss(lambda f, x, t, e: fn(x),
                                                                                       seed=seed)):
        assert checks.is_library(check(zeros, seed=0))
        out = capsys.readouterr().out
        assert "all zeros" in out and "marginal" not in out and "no_grad" not in out, out


def _sim(**kw):
    from course_lib.checks.nb09 import _simulate_variant
    return lambda G, z, i, times, p, generator: _simulate_variant(G, z, i, times, p, generator, **kw)


def _simulate_with_grad(G, z, i, times, p, generator):
    x = z
    for j in range(i):
        x0 = G(x, torch.full((len(z),), times[j])).x0
        x = p.marginal(x0, torch.full((len(z),), times[j + 1]), torch.randn(z.shape, generator=generator).to(z))
    return x


def _simulate_float64_draws(G, z, i, times, p, generator):   # correct: fresh noise drawn in z's own dtype
    x = z
    with torch.no_grad():
        for j in range(i):
            x0 = G(x, torch.full((len(z),), times[j], dtype=z.dtype)).x0
            x = p.marginal(x0, torch.full((len(z),), times[j + 1], dtype=z.dtype),
                           torch.randn(z.shape, generator=generator, dtype=z.dtype))
    return x


def _simulate_global_rng(G, z, i, times, p, generator):      # draws from torch's global generator
    x = z
    with torch.no_grad():
        for j in range(i):
            x0 = G(x, torch.full((len(z),), times[j])).x0
            x = p.marginal(x0, torch.full((len(z),), times[j + 1]), torch.randn_like(z))
    return x


def test_backward_simulation_checker_accepts_right_answers(capsys):
    right = lambda G, z, i, times, p, generator: dmd.backward_simulate(G, z, i, times, p, generator)
    for fn in (right, _simulate_float64_draws):
        assert checks.check_backward_simulate(fn, seed=0) is fn
        out = capsys.readouterr().out
        assert out.count("Exercise 9.3") == 1 and "correct" in out, out


@pytest.mark.parametrize("wrong,says", [
    (_sim(renoise_at=0), "re-noises x0 to times[j]"),
    (_sim(call_at=1), "calls the generator at times[j+1]"),
    (_sim(fresh=False), "initial noise z instead of fresh noise"),
    (_sim(last_x0=True), "returns the last denoised x0"),
    (_sim(rounds=0), "returns z unchanged"),
    (lambda G, z, i, times, p, generator: torch.zeros_like(z), "returns all zeros"),
    (_simulate_with_grad, "carries gradients"),
    (_simulate_global_rng, "differs from the reference"),
], ids=["renoise-same-time", "call-next-time", "reuse-z", "returns-x0", "no-rounds", "zeros", "grad", "global-rng"])
def test_backward_simulation_checker_rejects_planted_mistakes(wrong, says, capsys):
    used = checks.check_backward_simulate(wrong, seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and says in out and out.count("Exercise 9.3") == 1, out


def test_dmd_step_hooks_replace_the_library_functions_and_default_to_them():
    """dm_loss_fn, fake_fn and simulate_fn are called in place of the library's; equal functions give the same run."""
    teacher = mlp_denoiser(VPCosine(), 0, torch.float32, hidden=32).requires_grad_(False).eval()
    data = lambda n, g: {"x": sample_2d("gmm", n, g)[0]}
    cfg = dmd.DMDConfig(ttur=2, gan=True, gen_steps=2, normalize="batch")
    called = set()

    def hook(name, fn):
        def wrapped(*a):
            called.add(name)
            return fn(*a)
        return wrapped

    runs = []
    for hooks in ({}, dict(dm_loss_fn=hook("dm", dmd.dm_loss), fake_fn=hook("fake", dmd.fake_score_loss),
                           simulate_fn=hook("sim", dmd.backward_simulate))):
        G, _ = dmd.distill_dmd(teacher, data, cfg, run=TrainConfig(steps=6, batch_size=16, seed=0),
                               example={"x": sample_2d("gmm", 8)[0]}, progress=False, **hooks)
        runs.append(torch.cat([p.flatten() for p in G.parameters()]))
    assert called == {"dm", "fake", "sim"}
    assert torch.equal(runs[0], runs[1])


def test_t_shared_draws_one_time_per_generator_batch():
    """DMDConfig(t_shared=True): every sample of a generator batch gets the same t of the distribution-matching
    gradient (the 2D recipe), drawn from cfg.t_range; without it the times differ."""
    teacher = mlp_denoiser(VPCosine(), 0, torch.float32, hidden=32).requires_grad_(False).eval()
    data = lambda n, g: {"x": sample_2d("gmm", n, g)[0]}
    for shared in (True, False):
        seen = []

        def spy(x, real, fake, process, t, eps, cond, normalize):
            seen.append(t.clone())
            return dmd.dm_loss(x, real, fake, process, t, eps, cond, normalize)

        cfg = dmd.DMDConfig(ttur=1, gan=False, normalize="batch", t_shared=shared, t_range=(0.3, 0.6))
        dmd.distill_dmd(teacher, data, cfg, run=TrainConfig(steps=3, batch_size=16, seed=0), progress=False,
                        dm_loss_fn=spy)
        assert len(seen) == 3 and all(((0.3 <= t) & (t <= 0.6)).all() for t in seen)
        assert all((t == t[0]).all() for t in seen) == shared


def test_shipped_2d_students_load_and_draw_the_data():
    """data/dmd2_2d (bench.dmd.ship_2d): each shipped one-step student loads onto its teacher's network, records the
    command that made it, and lands far closer to the data than the teacher's own single call (its starting point;
    measured: gmm ~0.06 and checkerboard ~0.05 against 1.41 and 1.15)."""
    from course_lib.bench.core import swd
    from course_lib.recipes.dmd import load_shipped_2d
    from course_lib.distill.gan import generate_one_step
    from course_lib.teachers import load_teacher

    for ds in ("gmm", "checkerboard"):
        G, info = load_shipped_2d(ds)
        assert info["dataset"] == ds and info["command"].startswith("python -m course_lib.bench.dmd_ship")
        z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(3))
        ref = sample_2d(ds, 4000, torch.Generator().manual_seed(4))[0]
        start = swd(generate_one_step(load_teacher(f"{ds}-vp"), z), ref)
        assert swd(generate_one_step(G, z), ref) < 0.1 * start


def test_real_score_guided_only_in_its_interval():
    """DMDConfig(real_w_interval=(lo, hi)): the real score of the DM loss is the guided teacher at real_w for t in
    (lo, hi] and the plain conditional teacher outside (guidance interval); the default interval keeps one float w."""
    from course_lib import guidance
    from course_lib.conditioning import labels

    def model(x, t, cond):                      # a conditional "teacher" whose x0 is the label (null label: 10)
        x0 = cond.y.to(x.dtype)[:, None].expand_as(x) + 0 * x
        return Pred(x0, x - x0)

    assert dmd.real_weight(dmd.DMDConfig(real_w=4.0), torch.rand(5)) == 4.0
    t = torch.tensor([0.1, 0.5, 0.50001, 0.9])
    cfg = dmd.DMDConfig(real_w=4.0, real_w_interval=(0.0, 0.5))
    w = dmd.real_weight(cfg, t)
    assert torch.equal(w, torch.tensor([4.0, 4.0, 0.0, 0.0]))
    cond = labels(torch.tensor([3, 3, 3, 3]), 10)
    x0 = guidance.cfg(model, w)(torch.zeros(4, 2), t, cond).x0[:, 0]
    # guided: (1 + 4) 3 - 4 10 = -25; plain: 3
    assert torch.equal(x0, torch.tensor([-25.0, -25.0, 3.0, 3.0]))
