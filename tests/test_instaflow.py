"""InstaFlow (course_lib.distill.instaflow): guidance on the velocity, triplet caches, conditional reflow,
one-step distillation and its distances, the shipped digits models and the benchmark in smoke mode."""
import json
from functools import partial

import pytest
import torch

from course_lib import bench, checks, distances
from course_lib.conditioning import labels
from course_lib.distill import instaflow, reflow
from course_lib.recipes import instaflow as instaflow_recipes
from course_lib.models import Denoiser, MLP2D
from course_lib.processes import RectifiedFlow, VPCosine
from course_lib.train import TrainConfig
from conftest import mlp_denoiser

RF = RectifiedFlow()
cond_flow = partial(mlp_denoiser, proc=RF, dtype=torch.float32, num_classes=3, kind="velocity")


def velocity(pred):
    return pred.eps - pred.x0


def test_guidance_on_the_velocity_is_linear_in_w():
    flow = cond_flow().double()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(9, 2, generator=g, dtype=torch.float64), torch.rand(9, generator=g, dtype=torch.float64), \
        labels(torch.randint(3, (9,), generator=g), 3)
    u_c, u_u = velocity(flow(x, t, y)), velocity(flow(x, t, labels(torch.full_like(y.y, 3), 3)))
    for w in (0.0, 0.5, 2.0):
        torch.testing.assert_close(velocity(instaflow.guided(flow, w)(x, t, y)), (1 + w) * u_c - w * u_u)
    # the mix of Preds keeps x_t = (1 - t) x0 + t eps (weights sum to one), so the guided Pred is a valid prediction
    p = instaflow.guided(flow, 1.5)(x, t, y)
    torch.testing.assert_close((1 - t)[:, None] * p.x0 + t[:, None] * p.eps, x)


def test_guidance_needs_a_class_conditional_model():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="class-conditional"):
        instaflow.guided(Denoiser(MLP2D(hidden=8, depth=2), RF, "velocity"), 1.0)


def test_triplet_cache_is_keyed_by_teacher_and_guidance(tmp_path):
    teacher = cond_flow(proc=VPCosine(), kind="v")
    y = labels(torch.arange(40) % 3, 3)
    eps, x0, yy = instaflow.triplets(teacher, 0.5, y, "t", steps=3, cache_dir=tmp_path, progress=False, verbose=False)
    assert eps.shape == x0.shape == (40, 2) and yy is y
    # the triplets are the guided teacher's ODE solution from eps
    _, want = reflow.generate_pairs(instaflow.guided(teacher, 0.5), eps, 3, "dpmpp2m", cond=y)
    torch.testing.assert_close(x0, want)
    # the same name with another guidance weight, or another teacher: never silently reused
    with pytest.raises(reflow.PairCacheError, match="another flow"):
        instaflow.triplets(teacher, 1.0, y, "t", steps=3, cache_dir=tmp_path, progress=False, verbose=False)
    with pytest.raises(reflow.PairCacheError, match="another flow"):
        instaflow.triplets(cond_flow(proc=VPCosine(), seed=1, kind="v"), 0.5, y, "t", steps=3, cache_dir=tmp_path,
                           progress=False, verbose=False)
    with pytest.raises(reflow.PairCacheError, match="other settings"):          # other labels
        instaflow.triplets(teacher, 0.5, labels((y.y + 1) % 3, 3), "t", steps=3, cache_dir=tmp_path, progress=False, verbose=False)
    e2, x2, _ = instaflow.triplets(teacher, 0.5, y, "t", steps=3, cache_dir=tmp_path, progress=False, verbose=False)
    assert torch.equal(e2, eps) and torch.equal(x2, x0)                         # a hit


def test_conditional_reflow_drops_labels_and_checks_its_input(monkeypatch):
    teacher = cond_flow(proc=VPCosine(), kind="v")
    y = labels(torch.arange(64) % 3, 3)
    eps = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    x0 = eps + 1.0
    seen = []
    orig = reflow.rf_loss

    def spy(model, x, g, eps=None, cond=None, **k):
        seen.append(cond.y.clone())
        return orig(model, x, g, eps=eps, cond=cond, **k)

    cfg = TrainConfig(steps=20, batch_size=64, lr=1e-3, ema_decay=0.0)
    monkeypatch.setattr(reflow, "rf_loss", spy)
    flow2, _ = instaflow.distill_conditional_reflow(teacher, (eps, x0, y), reflow.ReflowConfig(0.3), run=cfg,
                                                    progress=False)
    monkeypatch.undo()
    dropped = torch.cat(seen).eq(3).float().mean().item()
    assert 0.2 < dropped < 0.4                                                   # about p_uncond of the labels
    assert flow2.process.name == "rf" and flow2.parameterization == "velocity"
    assert teacher.process.name == "vp-cosine"                                  # the teacher is untouched
    with pytest.raises(ValueError, match="class-conditional"):
        reflow.distill_reflow(Denoiser(MLP2D(hidden=8, depth=2), RF, "velocity"), (eps, x0), reflow.ReflowConfig(0.1),
                              run=cfg, progress=False)
    with pytest.raises(ValueError, match="probability"):
        reflow.distill_reflow(teacher, (eps, x0, y), reflow.ReflowConfig(1.0), run=cfg, progress=False)
    with pytest.raises(ValueError, match="class-conditional"):                 # p_uncond > 0 needs the labels
        reflow.distill_reflow(teacher, (eps, x0), reflow.ReflowConfig(0.1), run=cfg, progress=False)


def test_onestep_l2_loss_is_the_reflow_loss_at_t_one():
    flow = cond_flow().double()
    g = torch.Generator().manual_seed(2)
    eps, x0 = torch.randn(11, 2, generator=g, dtype=torch.float64), torch.randn(11, 2, generator=g, dtype=torch.float64)
    y = labels(torch.randint(3, (11,), generator=g), 3)
    want = reflow.distill_loss_at(flow, x0, eps, torch.ones(11, dtype=torch.float64), y)
    torch.testing.assert_close(instaflow.onestep_loss(flow, eps, x0, y), want)
    # one_step is one Euler step of the flow from t = 1 to 0
    from course_lib.grids import uniform
    from course_lib.samplers import euler
    torch.testing.assert_close(instaflow.one_step(flow, eps, y), euler(flow, eps, uniform(1), RF, cond=y))


def test_laplacian_pyramid_l1_properties():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 1, 16, 16, generator=g, dtype=torch.float64)
    b = torch.randn(4, 1, 16, 16, generator=g, dtype=torch.float64)
    d = distances.laplacian_pyramid_l1
    assert torch.all(d(a, a) == 0) and torch.all(d(a, b) > 0)
    torch.testing.assert_close(d(a, b), d(b, a))
    # a constant offset c lives only in the low-pass residual: the distance is 2^-levels |c| exactly
    for levels in (1, 2, 3):
        torch.testing.assert_close(d(a, a + 0.8, levels), torch.full((4,), 0.8 * 2.0**-levels, dtype=torch.float64))
    # with no levels it is the mean absolute difference
    torch.testing.assert_close(d(a, b, 0), (a - b).abs().flatten(1).mean(1))
    with pytest.raises(ValueError, match="image batches"):
        d(a[:, 0], b[:, 0])


def test_lpips_unavailable_is_a_clear_error_and_unknown_distance_is_refused():
    try:
        import lpips  # noqa: F401  (only whether it imports)
    except ImportError:
        with pytest.raises(RuntimeError, match="use distance='lap1'.*or 'pseudo-huber'"):
            distances.get("lpips")
    with pytest.raises(ValueError, match="unknown distance 'ssim'; valid: l2, pseudo-huber, huber, lap1, lpips"):
        distances.get("ssim")


def test_one_step_distillation_learns_a_coupling_and_direct_distill_leaves_the_teacher():
    teacher = cond_flow(proc=VPCosine(), kind="v")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    eps = torch.randn(512, 2, generator=g)
    y = labels(torch.arange(512) % 3, 3)
    x0 = 0.5 * eps + torch.stack([y.y.float(), -y.y.float()], 1)               # an affine map per class
    cfg = TrainConfig(steps=300, batch_size=128, lr=3e-3, ema_decay=0.0)
    untrained = instaflow.regression_error(reflow.as_flow(teacher), eps, x0, y)
    student, _ = instaflow.distill_direct(teacher, (eps, x0, y), instaflow.OneStepConfig(), run=cfg, progress=False)
    assert instaflow.regression_error(student, eps, x0, y) < 0.05 * untrained
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    # a fresh small student of another width, unconditional data (y None)
    fresh = instaflow_recipes.fresh_student(teacher, 8)
    assert fresh.net.hidden == 8 and fresh.process.name == "rf"
    s2, _ = instaflow.distill_onestep(instaflow_recipes.fresh_student(cond_flow(num_classes=None), 8),
                                      (eps, 0.5 * eps, None), instaflow.OneStepConfig(), run=cfg, progress=False)
    assert instaflow.regression_error(s2, eps, 0.5 * eps) < 1e-2


def test_train_digits_writes_loadable_models(tmp_path):
    out = tmp_path / "out"
    instaflow_recipes.train_digits(tmp_path / "runs", out, steps_scale=0.0002, n_pairs=8)
    for name in instaflow_recipes.DIGITS_MODELS:
        config = json.loads((out / name / "config.json").read_text())
        assert config["n_pairs"] == 8 and config["denoiser"]["process"] == {"name": "rf"}
    with pytest.raises(ValueError, match="valid"):
        instaflow_recipes.load_digits_model("digits-nope")


@pytest.mark.parametrize("name", instaflow_recipes.DIGITS_MODELS)
def test_shipped_digits_models_load_and_generate(name):
    model = instaflow_recipes.load_digits_model(name)
    y = labels(torch.arange(4), 10)
    x = instaflow.one_step(model, torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), y)
    assert x.shape == (4, 1, 16, 16) and torch.isfinite(x).all()


def test_exercise_checkers_accept_the_reference_and_reject_a_wrong_answer(capsys):
    ref_v = lambda f, x, t, cond, w: velocity(instaflow.guided(f, w)(x, t, cond))
    assert checks.check_guided_velocity(ref_v, seed=0) is ref_v
    wrong_v = lambda f, x, t, cond, w: velocity(f(x, t, cond))                   # forgot the guidance
    assert checks.check_guided_velocity(wrong_v, seed=0) is not wrong_v
    ref_l = lambda m, e, x, cond: instaflow.onestep_loss(m, e, x, cond)
    assert checks.check_onestep_loss(ref_l, seed=0) is ref_l
    wrong_l = lambda m, e, x, cond: (e - velocity(m(e, torch.zeros(len(e), dtype=e.dtype), cond)) - x).pow(2).mean(1)
    assert checks.check_onestep_loss(wrong_l, seed=0) is not wrong_l                # t = 0 instead of 1
    assert checks.check_lap1(distances.laplacian_pyramid_l1, seed=0) is distances.laplacian_pyramid_l1
    plain_l1 = lambda a, b, levels: (a - b).abs().flatten(1).mean(1)
    assert checks.check_lap1(plain_l1, seed=0) is not plain_l1
    out = capsys.readouterr().out
    assert out.count("correct") == 3 and "Exercise 4.4" in out and "Exercise 4.3" in out


def test_bench_instaflow_smoke_rows():
    rows, meta = bench.instaflow.bench_instaflow("smoke")
    models = {(r["dataset"], r["model"], r["metric"]) for r in rows}
    for m in ("teacher", "2-rf", "instaflow", "direct-distill"):   # fidelity to the guided teacher, data as context
        for metric in ("swd_teacher", "swd_data", "class_acc"):
            assert ("gmm-overlap", m, metric) in models, (m, metric)
    for m in ("2-rf", "instaflow", "direct-distill"):
        assert ("gmm-overlap", m, "flow_map_err_teacher") in models
    assert {r["steps"] for r in rows if r["model"] == "2-rf" and r["dataset"] == "gmm-overlap"} >= {1, 4}
    assert ("gmm-overlap", "instaflow", "heldout_err") in models
    assert ("gmm-overlap", "sweep-direct", "heldout_err") in models
    assert ("gmm", "sweep-reflow", "heldout_err") in models and ("gmm", "2-rf", "swd_data") in models
    assert all(r["value"] == r["value"] for r in rows)                           # no NaN
    assert meta["w"] == 0.5
