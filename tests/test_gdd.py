"""GDD / GDD-I (distill/gdd.py) and the checkers of notebook 10: the preconditioning (start = teacher's one-step
prediction, boundary condition, the paper's formula on an EDM model), the losses (analytic R1, no gradient into the
fakes, the non-saturating sign), the freezing rule (the paper's literal rule on EDM names, the course's on diffusers
and MLP2D names), the activation statistic (analytic cases), a short run (frozen parameters stay put, lazy R1), the
divergence guard, and every planted mistake the checkers must reject."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import checks, precond
from course_lib.checks import nb10
from course_lib.config import seeded
from course_lib.distill import gan, gdd
from course_lib.models import Denoiser
from course_lib.processes import EDM, VPCosine, bcast
from course_lib.train import TrainConfig
from conftest import mlp_denoiser, tiny_unet


# --- preconditioning -----------------------------------------------------------------------------------------------

def test_generator_starts_as_the_teachers_one_step_prediction():
    teacher = mlp_denoiser(depth=3, keep_rng=True)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = gdd.GDDPrecond(teacher)
    t = torch.ones(64, dtype=torch.float64)
    assert torch.allclose(gan.generate_one_step(G, z), teacher(z, t).x0, atol=1e-9)


def test_boundary_condition_at_sigma_min():
    """At sigma_ve = sigma / alpha = eps the generator returns x / alpha whatever the network says."""
    proc = VPCosine()
    lo, hi = 0.0, 1.0
    for _ in range(80):  # t with sigma(t) / alpha(t) = eps
        mid = (lo + hi) / 2
        r = float(proc.sigma(torch.tensor(mid, dtype=torch.float64)) / proc.alpha(torch.tensor(mid, dtype=torch.float64)))
        lo, hi = (mid, hi) if r < gdd.SIGMA_MIN else (lo, mid)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.full((16,), hi, dtype=torch.float64)
    out = gdd.GDDPrecond(mlp_denoiser(seed=3, depth=3, keep_rng=True))(x, t).x0
    assert torch.allclose(out, x / bcast(proc.alpha(t), x), atol=1e-9)


def test_edm_model_gets_the_papers_gddprecond():
    """On an EDM model (alpha = 1) D = c_skip^GDD x + c_out^GDD F with F the backbone's raw output (GDDPrecond)."""
    proc = EDM()
    model = mlp_denoiser(proc, depth=3, kind="edm", keep_rng=True)
    x = 5 * torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.9 + 0.05
    sigma = proc.sigma(t)
    c_skip, c_out = precond.gdd(sigma)
    want = bcast(c_skip, x) * x + bcast(c_out, x) * model.raw(x, t)
    assert torch.allclose(gdd.GDDPrecond(model)(x, t).x0, want, atol=1e-9)


def test_gdd_scalings_at_sigma_80_are_edms():
    s = torch.tensor([80.0], dtype=torch.float64)
    c_skip, c_out = precond.gdd(s)
    e_skip, e_out = precond.edm(s, gdd.SIGMA_DATA)[:2]
    assert math.isclose(float(c_skip), 0.25 / (79.998**2 + 0.25), rel_tol=1e-12) and float(c_skip) < 4e-5
    assert math.isclose(float(c_out), float(e_out), rel_tol=1e-4)
    c_skip0, c_out0 = precond.gdd(torch.tensor([gdd.SIGMA_MIN], dtype=torch.float64))
    assert float(c_skip0) == 1.0 and float(c_out0) == 0.0


# --- losses --------------------------------------------------------------------------------------------------------

def test_losses_analytic_r1_and_gradients():
    """A linear discriminator D(x) = w.x + b: R1 = ||w||^2 for every sample; L_D sends nothing into the fakes."""
    w = torch.tensor([0.7, -1.3], dtype=torch.float64, requires_grad=True)
    D = lambda x: x @ w + 0.2
    xr = torch.randn(5, 2, dtype=torch.float64)
    xf = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    ld = gdd.discriminator_loss(D, xr, xf, r1_weight=0.5)
    want = F.softplus(D(xf)) + F.softplus(-D(xr)) + 0.5 * (w * w).sum()
    assert torch.allclose(ld, want.detach())
    assert torch.autograd.grad(ld.sum(), xf, allow_unused=True)[0] is None or \
        float(torch.autograd.grad(ld.sum(), xf, allow_unused=True)[0].abs().max()) == 0.0
    (gw,) = torch.autograd.grad(ld.sum(), w)       # the R1 term trains D: d/dw 0.5 * 5 ||w||^2 = 5 w, plus the GAN part
    gan_only = torch.autograd.grad((F.softplus(D(xf.detach())) + F.softplus(-D(xr))).sum(), w)[0]
    assert torch.allclose(gw - gan_only, 5 * w.detach())
    lg = gdd.generator_loss(D(xf))
    assert torch.allclose(lg, -F.logsigmoid(D(xf)))                    # non-saturating: -log sigmoid(D)
    (gx,) = torch.autograd.grad(lg.sum(), xf)
    assert (gx @ w.detach() < 0).all()                                   # descent raises D(x_fake)


# --- freezing ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,frozen", [
    ("enc.16x16_block0.conv0.weight", True), ("dec.8x8_block2.conv1.bias", True), ("enc.16x16_down.conv0.weight", True),
    ("enc.8x8_block1.proj.weight", True), ("dec.32x32_in0.conv1.weight", True),
    ("enc.16x16_block0.affine.weight", False), ("enc.16x16_block0.norm0.weight", False),
    ("enc.8x8_block1.qkv.weight", False), ("enc.16x16_block0.skip.weight", False), ("map_noise.freqs", False),
    ("map_label.weight", False), ("map_layer0.weight", False), ("enc.32x32_conv.weight", False),
    ("dec.32x32_aux_conv.weight", False)])
def test_papers_rule_on_edm_names(name, frozen):
    assert gdd.paper_frozen(name) is frozen


def test_course_rule_freezes_the_roles_of_the_papers_rule():
    unet = Denoiser(tiny_unet(0, (8, 16), keep_rng=True, norm_num_groups=4, num_classes=3, attention=True),
                    VPCosine(), "v")
    names = [n for n, _ in gdd.GDDPrecond(unet).named_parameters()]
    frozen = {n for n in names if gdd.frozen_name(n)}
    for n in names:
        role_frozen = any(k in n for k in (".conv1.", ".conv2.", "samplers.0.conv.", ".to_out."))
        assert (n in frozen) is role_frozen, n
    assert any(".to_out." in n for n in frozen) and not any("norm" in n or "embedding" in n for n in frozen)
    G = gdd.GDDPrecond(copy.deepcopy(unet))
    frac = gdd.apply_freeze(G, "gdd-i")
    kept = sum(p.numel() for n, p in G.named_parameters() if n not in frozen)
    assert frac == pytest.approx(kept / sum(p.numel() for p in G.parameters()))
    assert all(p.requires_grad is (n not in frozen) for n, p in G.named_parameters())
    mlp = [n for n, _ in gdd.GDDPrecond(mlp_denoiser(depth=3, keep_rng=True)).named_parameters()]
    assert {n for n in mlp if gdd.frozen_name(n)} == {n for n in mlp if ".inp." in n or ".layers." in n}
    with pytest.raises(ValueError, match="unknown freezing rule"):
        gdd.apply_freeze(G, "convs")


def test_sweep_rules_are_nested():
    unet = Denoiser(tiny_unet(0, (8, 16), keep_rng=True, norm_num_groups=4, num_classes=3, attention=True),
                    VPCosine(), "v")
    fr = [gdd.apply_freeze(copy.deepcopy(unet), r) for r in ("none", "gdd-i", "gdd-i+", "embeddings-only")]
    assert fr[0] == 1.0 and fr[0] > fr[1] > fr[2] > fr[3] > 0


# --- the activation statistic --------------------------------------------------------------------------------------

def test_time_share_analytic():
    g = torch.Generator().manual_seed(0)
    same = torch.randn(1, 50, 4, generator=g).expand(6, 50, 4)
    assert float(gdd.time_share(same)) == pytest.approx(0.0, abs=1e-12)
    only_t = torch.randn(6, 1, 4, 1, 1, generator=g).expand(6, 50, 4, 3, 3)   # constant over inputs and space
    assert float(gdd.time_share(only_t)) == pytest.approx(1.0, abs=1e-9)
    # two timesteps at means -1 and +1, within-variance 1 exactly: share = 1 / (1 + 1)
    base = torch.tensor([-1.0, 1.0]).repeat(25)                          # mean 0, population variance 1
    acts = torch.stack([base - 1, base + 1])[:, :, None]                 # (2, 50, 1)
    assert float(gdd.time_share(acts)) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="K timesteps"):
        gdd.time_share(torch.zeros(3, 4))


def test_layer_time_shares_of_an_mlp():
    model = mlp_denoiser(depth=3, keep_rng=True).float()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    s = gdd.layer_time_shares(model, x0, [0.1, 0.5, 0.9], torch.Generator().manual_seed(1))
    assert set(s) == set(gdd.layer_modules(model)) and all(0.0 <= v <= 1.0 + 1e-9 for v in s.values())
    for n, v in s.items():
        if "emb_proj" in n or "time_mlp" in n:
            assert v == pytest.approx(1.0, abs=1e-6), n                  # they see the timestep only


# --- training ------------------------------------------------------------------------------------------------------

def _run(freeze="gdd-i", steps=4, ckpt_dir=None, disc=None, cfg=None):
    teacher = mlp_denoiser(depth=3, keep_rng=True).float()
    x_ex = torch.randn(16, 2)
    with seeded(0):
        disc = disc or gdd.make_discriminator(teacher, x_ex, hidden=16)
    data = lambda n, g: {"x": torch.randn(n, 2, generator=g) * 0.5 + 1.0}
    cfg = cfg or gdd.GDDConfig(freeze=freeze, lr_g=1e-2, lr_d=1e-2, r1_every=2, gamma=1.0)
    return teacher, gdd.distill_gdd(teacher, data, cfg, run=TrainConfig(steps=steps, batch_size=16, ckpt_every=1),
                                    disc=disc, ckpt_dir=ckpt_dir, progress=False)


def test_gdd_i_run_moves_only_the_trainable_parameters():
    teacher, (G, done) = _run("gdd-i")
    before = dict(teacher.named_parameters())
    moved = {n: not torch.equal(p, before[n[len("model."):]]) for n, p in G.named_parameters()}
    assert all(not moved[n] for n in moved if gdd.frozen_name(n))
    assert any(moved[n] for n in moved if not gdd.frozen_name(n))
    assert done.updates == {"generator": 4, "discriminator": 4}
    assert done.logs["trained_fraction"][0] == pytest.approx(gdd.apply_freeze(copy.deepcopy(G), "gdd-i"))


def test_lazy_r1_on_every_r1_every_th_discriminator_step(monkeypatch):
    weights = []
    real = gdd.discriminator_loss
    monkeypatch.setattr(gdd, "discriminator_loss", lambda D, xr, xf, w: (weights.append(w), real(D, xr, xf, w))[1])
    _run(steps=5, cfg=gdd.GDDConfig(freeze="none", r1_every=2, gamma=0.5))
    assert weights == [2 * 0.5 / 2, 0.0, 2 * 0.5 / 2, 0.0, 2 * 0.5 / 2]


class _Exploding(torch.nn.Module):
    """A discriminator that returns inf from its 4th call on (a diverged GAN)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, y=None, generator=None):
        self.calls += 1
        out = self.inner(x, y, generator)
        return out * float("inf") if self.calls > 6 else out


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    from course_lib.checkpoint import load_tensors
    from course_lib.train import TRAINER_WEIGHTS

    teacher = mlp_denoiser(depth=3, keep_rng=True).float()
    with seeded(0):
        disc = _Exploding(gdd.make_discriminator(teacher, torch.randn(16, 2), hidden=16))
    with pytest.raises(gan.GANDiverged, match="diverged"):
        _run("none", steps=10, ckpt_dir=tmp_path, disc=disc, cfg=gdd.GDDConfig(r1_every=0))
    tensors, config = load_tensors(tmp_path, "", weights_name=TRAINER_WEIGHTS)
    assert 1 <= config["step"] < 10
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())


# --- checkers: the reference passes, planted mistakes are rejected --------------------------------------------------

def _rejected(capsys, checker, fn, words):
    out = checker(fn, seed=0)
    text = capsys.readouterr().out
    assert checks.is_library(out), text
    assert all(w in text for w in words), text


def _passes(capsys, checker, fn):
    out = checker(fn, seed=0)
    assert not checks.is_library(out), capsys.readouterr().out


def test_check_gdd_losses(capsys):
    ref = nb10.gdd_losses_ref
    _passes(capsys, nb10.check_gdd_losses, ref)
    r1 = nb10._r1
    _rejected(capsys, nb10.check_gdd_losses,
              lambda D, xr, xf, w: (F.softplus(-D(xf)), F.softplus(D(xf.detach())) + F.softplus(-D(xr)) + w * r1(D, xf)),
              ["FAKE samples"])
    _rejected(capsys, nb10.check_gdd_losses,
              lambda D, xr, xf, w: (F.softplus(D(xf)), ref(D, xr, xf, w)[1]), ["softplus(+D(x_fake))"])
    _rejected(capsys, nb10.check_gdd_losses,
              lambda D, xr, xf, w: (ref(D, xr, xf, w)[0], F.softplus(D(xf)) + F.softplus(-D(xr)) + w * r1(D, xr)),
              ["x_fake.detach()"])
    _rejected(capsys, nb10.check_gdd_losses,
              lambda D, xr, xf, w: (ref(D, xr, xf, w)[0], F.softplus(D(xf.detach())) + F.softplus(-D(xr))),
              ["no R1 term"])
    _rejected(capsys, nb10.check_gdd_losses,
              lambda D, xr, xf, w: (ref(D, xr, xf, w)[0],
                                    F.softplus(D(xf.detach())) + F.softplus(-D(xr)) + w * r1(D, xr).detach()),
              ["create_graph=True"])


def _freeze_by(rule):
    """A student of exercise 10.2 that applies `rule` (name -> frozen) to every parameter and returns the trained
    fraction by count."""
    def student(G):
        for n, p in G.named_parameters():
            p.requires_grad_(not rule(n))
        return gan.trainable_fraction(G)
    return student


def test_check_freeze_rule(capsys):
    _passes(capsys, nb10.check_freeze_rule, lambda G: gdd.apply_freeze(G, "gdd-i"))
    _passes(capsys, nb10.check_freeze_rule, lambda G: torch.tensor(gdd.apply_freeze(G, "gdd-i")))
    _rejected(capsys, nb10.check_freeze_rule, _freeze_by(gdd.paper_frozen), ["read literally"])
    _rejected(capsys, nb10.check_freeze_rule, _freeze_by(lambda n: gdd.frozen_name(n) or "norm" in n), ["norms"])
    _rejected(capsys, nb10.check_freeze_rule, _freeze_by(lambda n: gdd.frozen_name(n) or "time_embedding" in n),
              ["embeddings"])
    _rejected(capsys, nb10.check_freeze_rule, _freeze_by(lambda n: gdd.frozen_name(n) or "emb_proj" in n),
              ["affine"])
    _rejected(capsys, nb10.check_freeze_rule, _freeze_by(lambda n: gdd.frozen_name(n) or "conv_shortcut" in n),
              ["skip"])
    _rejected(capsys, nb10.check_freeze_rule, _freeze_by(lambda n: gdd.frozen_name(n) and "to_out" not in n),
              ["attention output projection"])
    # the slip: weights frozen, biases left trainable, is named as such (not as a missed attention layer)
    _rejected(capsys, nb10.check_freeze_rule, _freeze_by(lambda n: gdd.frozen_name(n) and n.endswith(".weight")),
              ["biases trainable", "whole layers"])
    # every layer of a type (Conv2d / Linear) frozen: the roles, not the types
    _rejected(capsys, nb10.check_freeze_rule, _freeze_by(lambda n: "norm" not in n), ["stay trainable"])

    def only_freezes(G):                       # sets requires_grad False where frozen, never True: nothing trains
        for n, p in G.named_parameters():
            if gdd.frozen_name(n):
                p.requires_grad_(False)
        return 0.5
    _rejected(capsys, nb10.check_freeze_rule, only_freezes, ["still frozen", "requires_grad_(True)"])
    _rejected(capsys, nb10.check_freeze_rule, lambda G: 1 - gdd.apply_freeze(G, "gdd-i"), ["FROZEN fraction"])

    def by_tensors(G):
        gdd.apply_freeze(G, "gdd-i")
        ps = list(G.parameters())
        return sum(p.requires_grad for p in ps) / len(ps)
    _rejected(capsys, nb10.check_freeze_rule, by_tensors, ["TENSORS"])
    _rejected(capsys, nb10.check_freeze_rule, lambda G: (gdd.apply_freeze(G, "gdd-i"), None), ["float"])

    def stub(G):
        raise NotImplementedError("Exercise 10.2")
    _rejected(capsys, nb10.check_freeze_rule, stub, ["not solved yet"])


def test_check_gdd_losses_float32_zeros_and_shapes(capsys):
    ref = nb10.gdd_losses_ref
    # a float32 answer (the student casts) is accepted with a float32 tolerance, never crashes
    _passes(capsys, nb10.check_gdd_losses, lambda D, xr, xf, w: tuple(v.float() for v in ref(D, xr, xf, w)))
    # a zeros placeholder is told what is wrong, without the recipe
    out = nb10.check_gdd_losses(lambda D, xr, xf, w: (torch.zeros(len(xr)), torch.zeros(len(xr))), seed=0)
    text = capsys.readouterr().out
    assert checks.is_library(out) and "all zero" in text and "softplus(-D" not in text, text
    _rejected(capsys, nb10.check_gdd_losses, lambda D, xr, xf, w: tuple(v.mean() for v in ref(D, xr, xf, w)),
              ["shapes", "(8,)"])


def test_check_time_share(capsys):
    _passes(capsys, nb10.check_time_share, gdd.time_share)

    def unbiased(acts):
        a = acts.double().movedim(2, -1).reshape(acts.shape[0], -1, acts.shape[2])
        b, w = a.mean(1).var(0), a.var(1).mean(0)
        return (b / (b + w).clamp_min(1e-12)).mean()

    _rejected(capsys, nb10.check_time_share, unbiased, ["unbiased=False"])

    def pooled_channels(acts):
        a = acts.double().reshape(acts.shape[0], -1)
        b, w = a.mean(1).var(0, unbiased=False), a.var(1, unbiased=False).mean(0)
        return b / (b + w)

    _rejected(capsys, nb10.check_time_share, pooled_channels, ["per channel"])
    # float32 work passes; a zeros placeholder and a value outside [0, 1] are told what is wrong, not the recipe
    _passes(capsys, nb10.check_time_share, lambda acts: gdd.time_share(acts.float()).float())
    out = nb10.check_time_share(lambda acts: torch.zeros(()), seed=0)
    text = capsys.readouterr().out
    assert checks.is_library(out) and "all zeros" in text and "unbiased" not in text, text
    _rejected(capsys, nb10.check_time_share, lambda acts: 1 + gdd.time_share(acts), ["[0, 1]"])


# --- the shipped students (recipes.gdd, data/gdd) ------------------------------------------------------------------

def test_train_shipped_writes_loadable_generators(tmp_path, monkeypatch):
    from course_lib.recipes import gdd as recipe

    recipe.train_shipped(tmp_path, ("gmm",), steps_scale=2 / (recipe.SHIP_SCALE * recipe.gdd_budget("laptop")["steps"]))
    monkeypatch.setattr(recipe, "SHIP_DIR", tmp_path)
    G, config = recipe.load_shipped("gmm")
    assert isinstance(G, gdd.GDDPrecond) and not any(p.requires_grad for p in G.parameters())
    assert config["recipe"]["steps"] == 2 and config["recipe"]["freeze"] == "gdd-i" and config["train_seconds"] > 0
    assert 0 < config["trained_fraction"] < 1


def test_shipped_students_beat_the_teachers_one_step_prediction():
    # the shipped GDD-I students (data/gdd) against the data: their one-step SWD is far below the untrained
    # generator's (the teacher's one-step prediction), on fresh data and noise
    from course_lib import data2d
    from course_lib.bench.core import swd
    from course_lib.recipes.gdd import SHIP_DATASETS, load_shipped
    from course_lib.teachers import load_teacher

    for ds in SHIP_DATASETS:
        G, config = load_shipped(ds)
        teacher = load_teacher(f"{ds}-vp")
        z = teacher.process.prior((2000, 2), torch.Generator().manual_seed(11))
        ref = data2d.sample_2d(ds, 2000, torch.Generator().manual_seed(12))[0]
        with torch.no_grad():
            start = swd(gan.generate_one_step(gdd.GDDPrecond(teacher), z), ref)
            got = swd(gan.generate_one_step(G, z), ref)
        assert got < 0.25 * start, (ds, got, start)
