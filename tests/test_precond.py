"""Preconditioning wrappers (course_lib.models): EDM's preconditioned denoiser (Karras et al. 2022, Table 1) and the
consistency parameterisation (Song et al. 2023, Eq. 3), and saving / loading whole model stacks."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from course_lib import losses, models
from course_lib.conditioning import labels
from course_lib.models import ConsistencyModel, Denoiser, EDMPrecond, MLP2D, build_model
from course_lib.predictions import Pred, from_pred, to_pred
from course_lib.processes import EDM, RectifiedFlow, SDDiscrete, VPCosine
from conftest import mlp_denoiser

F64 = torch.float64


class _Affine(torch.nn.Module):
    """F(x; c_noise) = 0.3 x + 0.1 c_noise: a backbone with a known output, recording what it receives."""

    def forward(self, x, timestep, class_labels=None):
        self.x_in, self.timestep = x, timestep
        return 0.3 * x + 0.1 * timestep.reshape(-1, *([1] * (x.ndim - 1)))


def _x_t(proc, B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(B, generator=g, dtype=F64) * 0.98 + 0.01
    x = torch.randn(B, 2, generator=g, dtype=F64) * proc.sigma(t)[:, None]
    return x, t


# ----------------------------------------------------------------------------------------------------------------
# EDM preconditioning
# ----------------------------------------------------------------------------------------------------------------

def test_edm_precond_is_table_1():
    proc = EDM(sigma_max=80.0, sigma_data=0.5)
    net = _Affine()
    model = EDMPrecond(net, proc)
    x, t = _x_t(proc)
    pred = model(x, t)
    sd, sig = 0.5, (80.0 * t)[:, None]
    c_skip, c_out = sd**2 / (sig**2 + sd**2), sig * sd / torch.sqrt(sig**2 + sd**2)
    c_in, c_noise = 1 / torch.sqrt(sig**2 + sd**2), torch.log(80.0 * t) / 4
    torch.testing.assert_close(net.x_in, c_in * x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.timestep, c_noise, rtol=1e-12, atol=1e-12)
    F = 0.3 * c_in * x + 0.1 * c_noise[:, None]
    torch.testing.assert_close(pred.x0, c_skip * x + c_out * F, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.eps, (x - pred.x0) / sig, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.raw(x, t), F, rtol=1e-12, atol=1e-12)


def test_edm_target_makes_the_denoising_loss_edms_weighted_loss():
    """||F - (x0 - c_skip x) / c_out||^2 = lambda(sigma) ||D - x0||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2."""
    proc = EDM(sigma_data=0.5)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(16, 2, generator=g, dtype=F64), torch.randn(16, 2, generator=g, dtype=F64)
    t = torch.rand(16, generator=g, dtype=F64) * 0.9 + 0.05
    x = proc.marginal(x0, t, eps)
    target = from_pred(Pred(x0, eps), t, proc, "edm")
    F = torch.randn(16, 2, generator=g, dtype=F64)
    D = to_pred(F, x, t, proc, "edm").x0
    sig = proc.sigma(t)
    lam = (sig**2 + 0.25) / (sig * 0.5) ** 2
    torch.testing.assert_close((F - target).pow(2).sum(1), lam * (D - x0).pow(2).sum(1), rtol=1e-10, atol=1e-12)
    # the target is the F that denoises exactly
    torch.testing.assert_close(to_pred(target, x, t, proc, "edm").x0, x0, rtol=1e-10, atol=1e-10)


def test_edm_precond_trains_with_the_course_denoising_loss():
    torch.manual_seed(0)
    model = EDMPrecond(MLP2D(hidden=16, depth=2, num_classes=2), EDM())
    x0 = torch.randn(8, 2)
    loss = losses.denoising_loss(model, x0, torch.Generator().manual_seed(0), cond=labels(torch.tensor([0, 1] * 4), 2))
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.net.out.weight.grad.abs().sum() > 0


def test_edm_parameterization_needs_the_edm_process_and_the_precond_class():
    with pytest.raises(ValueError, match="edm process"):
        EDMPrecond(MLP2D(hidden=8, depth=2), RectifiedFlow())
    with pytest.raises(ValueError, match="EDMPrecond"):
        Denoiser(MLP2D(hidden=8, depth=2), EDM(), "edm")
    with pytest.raises(ValueError, match="edm process"):
        to_pred(torch.zeros(2, 2), torch.zeros(2, 2), torch.full((2,), 0.5), VPCosine(), "edm")


# ----------------------------------------------------------------------------------------------------------------
# consistency parameterisation
# ----------------------------------------------------------------------------------------------------------------

CM_CASES = [(VPCosine(), "eps"), (SDDiscrete(), "eps"), (SDDiscrete(), "v"), (RectifiedFlow(), "velocity"),
            (EDM(), "x0"), (EDM(), "edm")]
CM_IDS = [f"{p.name}-{k}" for p, k in CM_CASES]


@pytest.mark.parametrize("proc, kind", CM_CASES, ids=CM_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_consistency_boundary_condition_is_exact(proc, kind, dtype):
    t_min = 0.002 / 80.0 if isinstance(proc, EDM) else 1e-3
    cm = ConsistencyModel(mlp_denoiser(proc, 0, dtype, num_classes=3, kind=kind).eval(), t_min=t_min)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=dtype) * 3
    t = torch.full((32,), t_min, dtype=dtype)
    with torch.no_grad():
        f = cm(x, t, labels(torch.arange(32) % 3, 3)).x0
    assert torch.equal(f, x)
    # away from t_min it is not the identity (the check above has teeth)
    with torch.no_grad():
        assert not torch.allclose(cm(x, torch.full((32,), 0.5, dtype=dtype)).x0, x, atol=1e-3)


@pytest.mark.parametrize("proc, kind", CM_CASES, ids=CM_IDS)
def test_consistency_model_is_eq_3_on_the_ve_level_and_consistent_with_x_t(proc, kind):
    # Song et al. (2023), Eq. 3 and Appendix C on the paper's variables: s = sigma / alpha, x_ve = x / alpha, F the EDM
    # output that x0_hat carries (x0_hat = c_skip^EDM x_ve + c_out^EDM F), f = alpha_min (c_skip x_ve + c_out F)
    inner = mlp_denoiser(proc, num_classes=3, kind=kind).eval()
    t_min, sd = 1e-3, 0.5
    cm = ConsistencyModel(inner, t_min=t_min, sigma_data=sd)
    x, t = _x_t(proc, seed=3)
    with torch.no_grad():
        pred, x0_hat = cm(x, t), inner(x, t).x0
    alpha, s = proc.alpha(t)[:, None], (proc.sigma(t) / proc.alpha(t))[:, None]
    tm = torch.tensor([t_min], dtype=F64)
    alpha_min, s_min = float(proc.alpha(tm)), float(proc.sigma(tm) / proc.alpha(tm))
    x_ve = x / alpha
    e_skip, e_out = sd**2 / (s**2 + sd**2), s * sd / torch.sqrt(s**2 + sd**2)
    F = (x0_hat - e_skip * x_ve) / e_out
    c_skip = sd**2 / ((s - s_min) ** 2 + sd**2)
    c_out = sd * (s - s_min) / torch.sqrt(sd**2 + s**2)
    torch.testing.assert_close(pred.x0, alpha_min * (c_skip * x_ve + c_out * F), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(proc.marginal(pred.x0, t, pred.eps), x, rtol=1e-10, atol=1e-10)
    assert cm.process is inner.process


@pytest.mark.parametrize("proc, kind", CM_CASES, ids=CM_IDS)
def test_a_consistency_model_starts_as_its_teachers_denoiser(proc, kind):
    # c_skip -> c_skip^EDM and c_out -> c_out^EDM away from sigma_min: the wrapped teacher is the teacher (the VP
    # sigma <= 1 in the scalings gave c_skip(1) = 0.20 and an RMS gap of 0.3-0.5)
    inner = mlp_denoiser(proc, num_classes=3, kind=kind).eval()
    t_min = 0.002 / 80.0 if isinstance(proc, EDM) else 2e-3
    cm = ConsistencyModel(inner, t_min=t_min)
    x, t = _x_t(proc, seed=5)
    keep = proc.sigma(t) / proc.alpha(t) > 1.0                     # where s >> sigma_min
    with torch.no_grad():
        gap = (cm(x, t).x0 - inner(x, t).x0)[keep]
        ref = inner(x, t).x0[keep]
    assert keep.sum() > 3 and gap.abs().max() < 3e-2 * (1 + ref.abs().max())
    with torch.no_grad():
        one = torch.ones_like(t)                                     # at t = 1 the gap is O(s_min / s(1))
        assert torch.allclose(cm(x, one).x0, inner(x, one).x0, rtol=1e-2, atol=1e-4)


def test_consistency_edm_scalings_match_the_reference_at_sigma_max():
    # Song et al. (2023), Appendix C with sigma_min = 0.002, sigma_data = 0.5, at sigma = 80: for edm (alpha = 1) the
    # coefficient of x is c_skip - r c_skip^EDM and that of x0_hat r = c_out / c_out^EDM (F = (x0_hat - c_skip^EDM x) / c_out^EDM)
    cm = ConsistencyModel(mlp_denoiser(EDM(), num_classes=3, kind="x0").eval(), t_min=0.002 / 80)
    a, b = cm.scalings(torch.ones(1, dtype=F64))
    c_skip, c_out = 0.25 / (79.998**2 + 0.25), 0.5 * 79.998 / math.sqrt(0.25 + 6400)
    e_skip, e_out = 0.25 / (6400 + 0.25), 80 * 0.5 / math.sqrt(6400 + 0.25)
    assert math.isclose(float(b), c_out / e_out, rel_tol=1e-12)
    assert math.isclose(float(a), c_skip - c_out / e_out * e_skip, rel_tol=1e-9, abs_tol=1e-15)


# ----------------------------------------------------------------------------------------------------------------
# saving and loading stacks
# ----------------------------------------------------------------------------------------------------------------

_f32 = partial(mlp_denoiser, seed=0, dtype=torch.float32, num_classes=3)
STACKS = {
    "denoiser": lambda: _f32(VPCosine(), kind="v").eval(),
    "edm": lambda: _f32(EDM(sigma_max=40.0, sigma_data=0.6), kind="edm").eval(),
    "cm-denoiser": lambda: ConsistencyModel(_f32(SDDiscrete(), kind="eps").eval(), t_min=1e-3, sigma_data=0.5),
    "cm-edm": lambda: ConsistencyModel(_f32(EDM(), kind="edm").eval(), t_min=2.5e-5, sigma_data=0.5),
}


@pytest.mark.parametrize("name", list(STACKS))
def test_save_load_rebuilds_the_whole_stack(tmp_path, name):
    model = STACKS[name]()
    with torch.no_grad():
        for p in model.parameters():            # not the initialisation: loading must really restore weights
            p.add_(0.01 * torch.randn_like(p))
    models.save_model(tmp_path, model, extra={"step": 7})
    loaded, config = models.load_model(tmp_path)
    assert config["step"] == 7 and config["model"] == model.config()
    assert type(loaded) is type(model) and not loaded.training
    if isinstance(model, ConsistencyModel):
        assert type(loaded.model) is type(model.model)
        assert (loaded.t_min, loaded.sigma_data) == (model.t_min, model.sigma_data)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))
    t = torch.linspace(0.9, 0.1, 5)
    y = labels(torch.tensor([0, 1, 2, 0, 1]), 3)
    with torch.no_grad():
        a, b = model(x, t, y), loaded(x, t, y)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.eps, b.eps)
    again = build_model(model.config())
    assert again.config() == model.config()


def test_load_model_reads_save_denoiser_checkpoints_and_the_shipped_teachers(tmp_path):
    model = STACKS["denoiser"]()
    models.save_denoiser(tmp_path, model)
    loaded, _ = models.load_model(tmp_path)
    assert type(loaded) is Denoiser and loaded.config() == model.config()
    from pathlib import Path

    teacher_dir = Path(models.__file__).resolve().parents[1] / "data" / "teachers" / "gmm-vp"
    if not (teacher_dir / "config.json").exists():
        pytest.skip("no shipped teacher in this checkout")
    a, _ = models.load_denoiser(teacher_dir)
    b, _ = models.load_model(teacher_dir)
    x, t = torch.randn(4, 2), torch.linspace(0.9, 0.2, 4)
    with torch.no_grad():
        assert torch.equal(a(x, t).x0, b(x, t).x0)


def test_unknown_model_kind_is_an_error():
    with pytest.raises(ValueError, match="consistency"):
        build_model({"kind": "gan"})


# ----------------------------------------------------------------------------------------------------------------
# the named scalings (course_lib.precond) and the one boundary wrapper
# ----------------------------------------------------------------------------------------------------------------

def test_named_scalings_are_one_formula_with_named_differences():
    from course_lib import precond

    sig = torch.tensor([0.0, 0.002, 0.5, 3.0, 80.0], dtype=F64)
    c_skip, c_out = precond.consistency(sig, 0.002, 0.5)
    torch.testing.assert_close(c_skip, 0.25 / ((sig - 0.002) ** 2 + 0.25), rtol=1e-15, atol=0)
    torch.testing.assert_close(c_out, 0.5 * (sig - 0.002) / torch.sqrt(0.25 + sig**2), rtol=1e-15, atol=0)
    assert float(c_skip[1]) == 1.0 and float(c_out[1]) == 0.0               # the boundary condition, exactly
    # GDD's are the consistency scalings with sigma_min = eps; LCM's drop the sd factor of c_out, at sigma = s tau
    assert all(torch.equal(a, b) for a, b in zip(precond.gdd(sig, 0.002, 0.5), (c_skip, c_out)))
    tau = torch.tensor([0, 1, 259, 999])
    l_skip, l_out = precond.lcm(tau, 0.5, 10.0)
    st = 10.0 * tau.double()
    torch.testing.assert_close(l_skip, 0.25 / (st**2 + 0.25), rtol=1e-15, atol=0)
    torch.testing.assert_close(l_out, st / torch.sqrt(st**2 + 0.25), rtol=1e-15, atol=0)
    # EDM's: c_out^2 + sd^2 c_skip = sd^2 (Table 1), c_skip -> 1 and c_out -> 0 as sigma -> 0 (no exact boundary)
    e_skip, e_out, c_in = precond.edm(sig, 0.5)
    torch.testing.assert_close(e_out**2 + 0.25 * e_skip, torch.full_like(sig, 0.25), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sig**2 + 0.25), rtol=1e-15, atol=0)


def test_gdd_boundary_saves_and_loads_through_build_model(tmp_path):
    from course_lib.distill import gdd

    G = gdd.GDDPrecond(_f32(VPCosine(), kind="eps").eval())
    models.save_model(tmp_path, G)
    loaded, config = models.load_model(tmp_path)
    assert config["model"] == {"kind": "gdd", "eps": 0.002, "sigma_data": 0.5, "model": G.model.config()}
    x, t, y = torch.randn(5, 2), torch.linspace(0.9, 0.1, 5), labels(torch.tensor([0, 1, 2, 0, 1]), G.model.net.num_classes)
    with torch.no_grad():
        a, b = G(x, t, y), loaded(x, t, y)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.eps, b.eps)


def test_unknown_scalings_are_an_error():
    from course_lib import precond

    with pytest.raises(ValueError, match="consistency, lcm, gdd"):
        precond.Boundary(_f32(VPCosine(), kind="eps"), "karras")
