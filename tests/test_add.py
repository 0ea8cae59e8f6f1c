"""Adversarial diffusion distillation (course_lib.distill.add), its checkers (notebook 08) and metrics.mode_coverage:
analytic values and exact gradients, planted mistakes rejected, the divergence guard, the offline feature fallback."""
import json
import math

import pytest
import torch
from torch import nn

from course_lib import checks, data2d, metrics
from course_lib.distill import add, gan
from course_lib.grids import uniform
from course_lib.processes import RectifiedFlow, VPCosine
from course_lib.samplers import consistency
from course_lib.train import TrainConfig
from conftest import mlp_denoiser


# --- mode_coverage ------------------------------------------------------------------------------------------------

def test_mode_coverage_exact_samples_match_the_chi_square_law():
    mix = data2d.get_mixture("gmm")
    x = mix.sample(40_000, torch.Generator().manual_seed(0))
    x = x[0] if isinstance(x, tuple) else x
    cov = metrics.mode_coverage(x, mix, radius=3.0)
    assert cov["modes_covered"] == 8 and cov["num_modes"] == 8
    # in 2D the squared Mahalanobis distance of an exact sample is chi^2_2: P(d <= r) = 1 - exp(-r^2 / 2); the
    # modes are 2 / 0.2 = 10 stds apart, so assigning to the nearest one loses nothing
    assert cov["on_modes"] == pytest.approx(1 - math.exp(-4.5), abs=3e-3)
    assert cov["mass_tv"] < 0.03 and sum(cov["mass"]) == pytest.approx(cov["on_modes"])


def test_mode_coverage_sees_a_collapse_and_points_off_the_modes():
    mix = data2d.get_mixture("gmm")
    two = torch.cat([mix.means[[0] * 300], mix.means[[3] * 100]]).float()      # 3:1 on modes 0 and 3
    cov = metrics.mode_coverage(two, mix)
    assert cov["modes_covered"] == 2 and cov["on_modes"] == 1.0
    # mass (3/4, 1/4) against weights 1/8 each: TV = 1/2 (5/8 + 1/8 + 6/8) = 0.75
    assert cov["mass_tv"] == pytest.approx(0.75)
    off = metrics.mode_coverage(torch.zeros(50, 2), mix)                       # the centre: 10 stds from every mode
    assert off["on_modes"] == 0.0 and off["modes_covered"] == 0
    rare = torch.cat([mix.means[[0] * 97], mix.means[[1] * 3]]).float()        # mode 1 at 3% < 1/4 of its 12.5%
    assert metrics.mode_coverage(rare, mix)["modes_covered"] == 1
    with pytest.raises(ValueError, match="shape"):
        metrics.mode_coverage(torch.zeros(5, 3), mix)


# --- the pieces of ADD --------------------------------------------------------------------------------------------

def test_student_times_are_the_trailing_grid_and_inputs_noise_real_data():
    assert add.student_times(4) == [1.0, 0.75, 0.5, 0.25]
    proc = VPCosine()
    x0, eps = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    s = torch.tensor([1.0, 0.75, 0.5, 0.25, 1.0], dtype=torch.float64)
    x_s = add.student_input(x0, s, eps, proc)
    assert torch.allclose(x_s, proc.alpha(s)[:, None] * x0 + proc.sigma(s)[:, None] * eps)


def test_distill_weight_is_alpha_and_validates():
    proc = VPCosine()
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    assert torch.allclose(add.distill_weight(t, proc), proc.alpha(t))
    assert torch.allclose(add.distill_weight(t, proc, "sds"), proc.sigma(t) ** 2)
    assert (add.distill_weight(t, proc).diff() < 0).all()                       # less weight at high noise
    with pytest.raises(ValueError, match="weighting"):
        add.distill_weight(t, proc, "exp")


def test_distillation_loss_value_and_its_exact_gradient():
    """L = alpha_t mean_d (x_hat - T)^2 with T = teacher(alpha x_hat + sigma eps).x0 a constant: dL/dx_hat =
    2 alpha_t (x_hat - T) / D exactly, with no teacher Jacobian."""
    for proc in (VPCosine(), RectifiedFlow()):
        teacher = mlp_denoiser(proc, 1, keep_rng=True)
        x_hat = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
        t, eps = torch.rand(6, dtype=torch.float64) * 0.9 + 0.05, torch.randn(6, 2, dtype=torch.float64)
        loss = add.distillation_loss(x_hat, teacher, t, eps, proc)
        T = teacher(proc.marginal(x_hat.detach(), t, eps), t).x0
        a = proc.alpha(t)
        assert torch.allclose(loss, a * (x_hat.detach() - T).pow(2).mean(1))
        (grad,) = torch.autograd.grad(loss.sum(), x_hat)
        assert torch.allclose(grad, 2 * a[:, None] * (x_hat.detach() - T) / 2)


def test_discriminator_loss_is_hinge_plus_half_gamma_r1_at_the_real_samples():
    """D(x) = w.x + b is linear: ||grad_x D||^2 = ||w||^2 for every sample, so R1 = gamma / 2 ||w||^2 exactly."""
    lin = nn.Linear(2, 1).double()
    D = lambda x: lin(x).squeeze(1)
    real, fake = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    out = add.discriminator_loss(D, real, fake, r1_gamma=3.0)
    hinge = torch.relu(1 - D(real)) + torch.relu(1 + D(fake))
    assert torch.allclose(out, hinge + 1.5 * lin.weight.pow(2).sum())
    (g_fake,) = torch.autograd.grad(out.sum(), fake, allow_unused=True)
    assert g_fake is None or g_fake.abs().max() == 0                            # the student is not trained by it
    assert torch.allclose(add.generator_adv_loss(D, fake), -D(fake))


def test_sample_is_the_trailing_grid_consistency_sampler():
    proc = VPCosine()
    model = mlp_denoiser(proc, 2, keep_rng=True)
    z = proc.prior((5, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one = add.sample(model, z, 1, proc)
    assert torch.allclose(one, model(z, torch.ones(5, dtype=torch.float64)).x0)   # one step: x0_hat(z, 1)
    noises = torch.randn(3, 5, 2, dtype=torch.float64)
    four = add.sample(model, z, 4, proc, noises=noises)
    x, ts = z, [1.0, 0.75, 0.5, 0.25]
    for i, t in enumerate(ts):
        x0 = model(x, torch.full((5,), t, dtype=torch.float64)).x0
        if i < 3:
            x = proc.marginal(x0, torch.full((5,), ts[i + 1], dtype=torch.float64), noises[i])
    assert torch.allclose(four, x0)
    # samplers.consistency on grids.uniform(4) takes the same steps and ends with a DDIM step to t = 0 (sigma(0) ~ 0)
    g = torch.Generator().manual_seed(5)
    ref = consistency(model, z, uniform(4).double(), proc, generator=g)
    mine = add.sample(model, z, 4, proc, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(mine, ref, atol=1e-3)


# --- checkers reject planted mistakes -------------------------------------------------------------------------------

def _distill_variant(kind):
    def loss(x_hat, teacher, t, eps, process, cond=None):
        if kind == "no-stopgrad":
            target = teacher(process.marginal(x_hat, t, eps), t, cond).x0
            return process.alpha(t) * (x_hat - target).pow(2).mean(1)
        with torch.no_grad():
            target = teacher(process.marginal(x_hat, t, eps), t, None if kind == "no-cond" else cond).x0
        c = {"right": process.alpha(t), "no-cond": process.alpha(t), "no-c": 1.0, "reversed": 1 - process.alpha(t),
             "sigma": process.sigma(t) ** 2}[kind]
        return c * (x_hat - target).pow(2).mean(1)
    return loss


@pytest.mark.parametrize("mistake, says", [("no-stopgrad", "stop-gradient"), ("no-c", "no weighting c(t)"),
                                           ("reversed", "reversed"), ("sigma", "SDS"),
                                           ("no-cond", "class-conditional teacher")])
def test_distillation_checker_rejects_planted_mistakes(mistake, says, capsys):
    right = _distill_variant("right")
    assert checks.check_distillation_loss(right, seed=0) is right
    capsys.readouterr()
    used = checks.check_distillation_loss(_distill_variant(mistake), seed=0)
    assert checks.is_library(used) and says in capsys.readouterr().out


def _disc_variant(kind):
    def loss(D, x_real, x_fake, r1_gamma):
        fake = x_fake if kind == "no-detach" else x_fake.detach()
        r1_at = fake if kind == "r1-on-fake" else x_real
        r1 = gan.r1_penalty(D, r1_at) if kind != "r1-no-graph" else _r1_no_graph(D, x_real)
        if kind == "hinge-sign":
            return torch.relu(1 + D(x_real)) + torch.relu(1 - D(fake)) + 0.5 * r1_gamma * r1
        return torch.relu(1 - D(x_real)) + torch.relu(1 + D(fake)) + 0.5 * r1_gamma * r1
    return loss


def _r1_no_graph(D, x):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D(x).sum(), x)
    return g.pow(2).sum(1)


@pytest.mark.parametrize("mistake, says", [("r1-on-fake", "FAKE samples"), ("hinge-sign", "signs are flipped"),
                                           ("no-detach", "fake samples"), ("r1-no-graph", "create_graph")])
def test_discriminator_checker_rejects_planted_mistakes(mistake, says, capsys):
    right = _disc_variant("right")
    assert checks.check_discriminator_loss(right, seed=0) is right
    capsys.readouterr()
    used = checks.check_discriminator_loss(_disc_variant(mistake), seed=0)
    assert checks.is_library(used) and says in capsys.readouterr().out


def test_sampler_checker_accepts_the_loop_and_rejects_a_grid_to_zero(capsys):
    def right(model, z, k, process, noises, cond=None):
        return add.sample(model, z, k, process, noises=noises, cond=cond)

    def to_zero(model, z, k, process, noises, cond=None):   # the leading grid 1 - (i + 1) / k ... ends at 0: not the trailing one
        x = z
        ts = [1.0 - (i + 1) / (k + 1) for i in range(k)]
        ts[0] = 1.0
        for i, t in enumerate(ts):
            x0 = model(x, torch.full((len(z),), t, dtype=z.dtype), cond).x0
            if i < k - 1:
                x = process.marginal(x0, torch.full((len(z),), ts[i + 1], dtype=z.dtype), noises[i])
        return x0

    def no_cond(model, z, k, process, noises, cond=None):     # the right grid, but the labels never reach the model
        return right(model, z, k, process, noises)

    assert checks.check_trailing_sample(right, seed=0) is right
    assert checks.is_library(checks.check_trailing_sample(no_cond, seed=0))
    assert checks.is_library(checks.check_trailing_sample(to_zero, seed=0))
    unsolved = lambda *a: (_ for _ in ()).throw(NotImplementedError("Exercise 8.3"))
    assert checks.is_library(checks.check_trailing_sample(unsolved, seed=0))
    assert "not solved yet" in capsys.readouterr().out


@pytest.mark.parametrize("check, placeholder, recipe", [
    (checks.check_distillation_loss, lambda x_hat, T, t, eps, p, cond=None: torch.zeros(len(x_hat)), "marginal"),
    (checks.check_discriminator_loss, lambda D, x_real, x_fake, gamma: torch.zeros(len(x_real)), "relu(1 -"),
    (checks.check_trailing_sample, lambda m, z, k, p, noises, cond=None: torch.zeros_like(z), "alpha_{t_{i+1}}")])
def test_a_placeholder_of_zeros_hears_what_is_wrong_not_the_recipe(check, placeholder, recipe, capsys):
    used = check(placeholder, seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and "zero" in out and recipe not in out
    assert out.count("Exercise 8.") == 1                          # one verdict


def test_checkers_accept_float32_answers_and_a_sampler_with_float32_times(capsys):
    def disc32(D, x_real, x_fake, gamma):
        return add.discriminator_loss(D, x_real, x_fake, gamma).float()

    def sampler32(model, z, k, process, noises, cond=None):   # t built without a dtype: float32 times
        x = z
        for i in range(k):
            t = torch.full((len(z),), 1.0 - i / k)
            x0 = model(x, t, cond).x0
            if i < k - 1:
                x = process.marginal(x0, torch.full_like(t, 1.0 - (i + 1) / k), noises[i])
        return x0.float()

    assert checks.check_discriminator_loss(disc32, seed=0) is disc32
    assert checks.check_trailing_sample(sampler32, seed=0) is sampler32
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("mistake", ["ddim", "renoise-x", "no-last-x0"])
def test_sampler_checker_rejects_plausible_mistakes(mistake, capsys):
    def wrong(model, z, k, process, noises, cond=None):
        x = z
        for i in range(k):
            t = torch.full((len(z),), 1.0 - i / k, dtype=z.dtype)
            p = model(x, t, cond)
            if i < k - 1:
                s = torch.full_like(t, 1.0 - (i + 1) / k)
                if mistake == "ddim":           # deterministic: the model's own eps instead of fresh noise
                    x = process.marginal(p.x0, s, p.eps)
                elif mistake == "renoise-x":    # re-noises the noisy state instead of the clean prediction
                    x = process.marginal(x, s, noises[i])
                else:
                    x = process.marginal(p.x0, s, noises[i])
        return x if mistake == "no-last-x0" else p.x0

    assert checks.is_library(checks.check_trailing_sample(wrong, seed=0))
    assert capsys.readouterr().out.count("Exercise 8.3") == 1


# --- training: ablations run, divergence stops with the last good checkpoint, offline features --------------------

def _data(n, g):
    return {"x": data2d.sample_2d("gmm", n, g)[0]}


@pytest.mark.parametrize("kw, init", [({}, "teacher"), ({"distill": False}, "teacher"),
                                      ({"adversarial": False}, "teacher"), ({}, "scratch")])
def test_distill_add_trains_every_ablation(kw, init):
    teacher = mlp_denoiser(VPCosine(), 3, torch.float32, keep_rng=True).requires_grad_(False)
    cfg = add.ADDConfig(r1_gamma=0.1, lr_g=1e-3, lr_d=1e-3, **kw)
    G, done = add.distill_add(teacher, _data, cfg, run=TrainConfig(steps=4, batch_size=32),
                              features=add.feature_network("random2d"), example={"x": torch.randn(4, 2)}, init=init,
                              progress=False)
    assert ("discriminator" in done.nets) == cfg.adversarial
    moved = any(not torch.equal(a, b) for a, b in zip(G.parameters(), teacher.parameters()))
    assert moved and not any(p.requires_grad for p in G.parameters())
    if "discriminator" in done.nets:   # only the heads train: the feature network stays as it was drawn
        D = done.nets["discriminator"]
        fresh = gan.RandomFeatures2D(seed=0)
        assert all(torch.equal(a, b) for a, b in zip(D.features.parameters(), fresh.parameters()))
    with pytest.raises(ValueError, match="at least one"):
        add.distill_add(teacher, _data, add.ADDConfig(adversarial=False, distill=False),
                        run=TrainConfig(steps=1, batch_size=8), features=add.feature_network("random2d"),
                        example={"x": torch.randn(4, 2)}, progress=False)


def test_time_conditioned_discriminator_sees_the_index_of_each_students_time():
    teacher = mlp_denoiser(VPCosine(), 3, torch.float32, keep_rng=True).requires_grad_(False)
    cfg = add.ADDConfig(d_time_cond=True, lr_g=1e-3, lr_d=1e-3)
    run = TrainConfig(steps=2, batch_size=16)
    _, done = add.distill_add(teacher, _data, cfg, run=run, features=add.feature_network("random2d"),
                              example={"x": torch.randn(4, 2)}, progress=False)
    D = done.nets["discriminator"]
    assert all(h.embed.num_embeddings == cfg.student_steps + 1 for h in D.heads)   # one per student time (+ null)
    x = torch.randn(5, 2)
    with torch.no_grad():                                                           # the time's label moves the logit
        a, b = (D(x, add.d_time_labels(torch.full((5,), k), cfg.student_steps)) for k in (0, 3))
    assert not torch.allclose(a, b)
    labelled = lambda n, g: {"x": data2d.sample_2d("gmm", n, g)[0],
                             "cond": add.d_time_labels(torch.zeros(n, dtype=torch.long), 8)}
    conditional = mlp_denoiser(VPCosine(), 3, torch.float32, num_classes=8, keep_rng=True).requires_grad_(False)
    with pytest.raises(ValueError, match="d_time_cond"):
        add.distill_add(conditional, labelled, cfg, run=run, features=add.feature_network("random2d"),
                        example={"x": torch.randn(4, 2)}, progress=False)


def test_a_diverging_run_stops_loudly_and_keeps_the_last_good_checkpoint(tmp_path):
    teacher = mlp_denoiser(VPCosine(), 3, torch.float32, keep_rng=True).requires_grad_(False)
    calls = {"n": 0}

    def data(n, g):
        calls["n"] += 1
        x = data2d.sample_2d("gmm", n, g)[0]
        return {"x": x * float("nan") if calls["n"] > 13 else x}   # the data turn to NaN at iteration 6

    cfg = add.ADDConfig(r1_gamma=0.1)
    with pytest.raises(gan.GANDiverged, match="NaN or infinite.*last checkpoint"):
        add.distill_add(teacher, data, cfg, run=TrainConfig(steps=20, batch_size=16, ckpt_every=2),
                        features=add.feature_network("random2d"), example={"x": torch.randn(4, 2)}, ckpt_dir=tmp_path,
                        progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["step"] in (5, 6)                       # the last checkpoint before the bad iteration
    from course_lib.checkpoint import load_tensors
    tensors, _ = load_tensors(tmp_path, weights_name="trainer.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_dinov2_features_fall_back_loudly_to_the_teachers_own_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(add, "load_dinov2", lambda *a, **k: None)      # as on a machine without the weights
    from course_lib import config
    config._ANNOUNCED.discard("add-dinov2")
    teacher = mlp_denoiser(VPCosine(), 4, torch.float32, keep_rng=True)
    F = add.feature_network("dinov2", teacher)
    assert isinstance(F, gan.DenoiserFeatures) and not any(p.requires_grad for p in F.parameters())
    assert "could not be loaded offline" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs the teacher"):
        add.feature_network("dinov2")
    with pytest.raises(ValueError, match="valid"):
        add.feature_network("clip", teacher)


def test_load_dinov2_returns_none_offline_without_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))                        # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert add.load_dinov2() is None
