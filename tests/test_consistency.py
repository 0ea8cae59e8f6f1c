"""Consistency models: the boundary condition, the exact flow map is a fixed point of the CD loss, schedules,
multistep sampling, and short CD / CT runs that learn."""
import math

import pytest
import torch

from course_lib import data2d, distances, grids, precond, samplers, steps
from course_lib.data2d import GaussianMixture, exact_denoiser, sample_2d
from course_lib.distill import consistency as cm
from course_lib.models import ConsistencyModel, Denoiser, MLP2D
from course_lib.predictions import Pred
from course_lib.processes import EDM, RectifiedFlow, VPCosine
from course_lib.train import TrainConfig
from bench_scores import beats, swd, untrained_swd
from conftest import interrupt_on_call, mlp_denoiser

PROCESSES = [VPCosine(), EDM(), RectifiedFlow()]


@pytest.mark.parametrize("proc", PROCESSES, ids=lambda p: p.name)
def test_boundary_condition_holds_exactly_and_scalings_match_the_model(proc):
    t_min = cm.default_t_min(proc)
    model = cm.consistency_model(mlp_denoiser(proc), t_min)
    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.full((5,), t_min, dtype=torch.float64)
    assert torch.equal(model(x, t).x0, x)
    assert torch.equal(cm.consistency_fn(model.model, x, t, t_min), x)
    tt = torch.rand(5, dtype=torch.float64)
    for a, b in zip(precond.coefficients("consistency", tt, proc, tt, t_min=t_min), model.scalings(tt)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(cm.consistency_fn(model.model, x, tt, t_min), model(x, tt).x0)


def test_edm_scalings_are_the_papers_on_the_raw_network():
    # Song et al. (2023), Eq. 3 and Appendix C: f = c_skip(sigma) x + c_out(sigma) F(x, sigma) on the raw network F
    # (here the backbone of EDM's preconditioned model), c_skip = sd^2 / ((sigma - 0.002)^2 + sd^2),
    # c_out = sd (sigma - 0.002) / sqrt(sigma^2 + sd^2)
    proc = EDM()
    inner = mlp_denoiser(proc, kind="edm").eval()
    model = cm.consistency_model(inner, 0.002 / 80)
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma[:, None]
    with torch.no_grad():
        F, f = inner.raw(x, sigma / 80), model(x, sigma / 80).x0
    c_skip = 0.25 / ((sigma - 0.002) ** 2 + 0.25)
    c_out = (sigma - 0.002) * 0.5 / torch.sqrt(sigma**2 + 0.25)
    torch.testing.assert_close(f, c_skip[:, None] * x + c_out[:, None] * F, rtol=1e-12, atol=1e-12)
    assert torch.equal(f[0], x[0])                                                 # the boundary, exactly


@pytest.mark.parametrize("proc", [VPCosine(), RectifiedFlow()], ids=lambda p: p.name)
def test_vp_scalings_are_the_papers_at_the_ve_level(proc):
    # on a VP (or rf) process the paper's variables are s = sigma / alpha and x_ve = x / alpha: f / alpha(t_min) =
    # c_skip(s) x_ve + c_out(s) F with F the EDM network output that x0_hat carries and sigma_min = s(t_min)
    t_min = cm.default_t_min(proc)
    inner = mlp_denoiser(proc)
    model = cm.consistency_model(inner, t_min)
    t = torch.tensor([t_min, 0.01, 0.3, 0.7, 0.99], dtype=torch.float64)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        x0_hat, f = inner(x, t).x0, model(x, t).x0
    s, s_min = cm.ve_sigma(t, proc)[:, None], float(cm.ve_sigma(torch.tensor([t_min], dtype=torch.float64), proc))
    x_ve = x / proc.alpha(t)[:, None]
    F = (x0_hat - 0.25 / (s**2 + 0.25) * x_ve) / (0.5 * s / torch.sqrt(s**2 + 0.25))
    c_skip, c_out = 0.25 / ((s - s_min) ** 2 + 0.25), 0.5 * (s - s_min) / torch.sqrt(s**2 + 0.25)
    alpha_min = float(proc.alpha(torch.tensor([t_min], dtype=torch.float64)))
    torch.testing.assert_close(f / alpha_min, c_skip * x_ve + c_out * F, rtol=1e-10, atol=1e-10)
    # not the VP sigma: c_skip(t = 1) would be 0.2 and the student would not start as its teacher
    assert (f[1:] - x0_hat[1:]).abs().max() < 2e-2 * (1 + x0_hat.abs().max())


class ExactFlowMap:
    """The exact consistency function of one Gaussian: f(x, t) = the ODE solution from t to t_min."""

    def __init__(self, mix, proc, t_min):
        self.mix, self.process, self.t_min = mix, proc, t_min

    def __call__(self, x, t, cond=None):
        f = data2d.gaussian_flow_map(self.mix, x, t, torch.full_like(t, self.t_min), self.process)
        return Pred(f, torch.zeros_like(f))


@pytest.mark.parametrize("proc", [VPCosine(), EDM()], ids=lambda p: p.name)
def test_the_exact_flow_map_is_a_fixed_point_of_the_cd_loss(proc):
    # one Gaussian: the flow map is known in closed form; with the exact teacher and fine steps the CD loss of the
    # exact consistency function is (nearly) zero, and that of a function that changes along a path is not
    mix = GaussianMixture.isotropic(torch.tensor([[1.0, -0.5]], dtype=torch.float64), 0.6)
    teacher = mix.denoiser(proc)
    t_min = cm.default_t_min(proc)
    f = ExactFlowMap(mix, proc, t_min)
    g = torch.Generator().manual_seed(0)
    grid = cm.cm_grid(400, proc, t_min)
    n = torch.randint(399, (64,), generator=g)
    x0 = mix.sample(64, g)[0].double()
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    loss = cm.cd_loss_at(f, f, teacher, x0, eps, grid[n + 1], grid[n], proc)
    x_next = proc.marginal(x0, grid[n + 1], eps)
    scale = (f(x_next, grid[n + 1]).x0 - x0).pow(2).mean()
    assert loss.mean() < 1e-6 * scale
    wrong = lambda x, t, cond=None: Pred(f(x, t).x0 + 0.1 * t[:, None], torch.zeros_like(x))   # not constant along a path
    assert cm.cd_loss_at(wrong, wrong, teacher, x0, eps, grid[n + 1], grid[n], proc).mean() > 1e3 * loss.mean()


def test_cd_target_uses_the_teachers_step_and_no_gradient_reaches_the_target():
    proc = VPCosine()
    teacher = exact_denoiser("gmm", proc)
    student = cm.consistency_model(mlp_denoiser(proc, 0))
    target = cm.consistency_model(mlp_denoiser(proc, 1)).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x0 = sample_2d("gmm", 16, g)[0].double()
    eps = torch.randn(16, 2, generator=g, dtype=torch.float64)
    grid = cm.cm_grid(10, proc, cm.T_MIN)
    n = torch.randint(9, (16,), generator=g)
    loss = cm.cd_loss_at(student, target, teacher, x0, eps, grid[n + 1], grid[n], proc, solver="ddim")
    x_next = proc.marginal(x0, grid[n + 1], eps)
    want = (student(x_next, grid[n + 1]).x0 - target(steps.ddim(teacher, x_next, grid[n + 1], grid[n], proc),
                                                         grid[n]).x0).pow(2).mean(1)
    torch.testing.assert_close(loss, want)
    loss.sum().backward()
    assert all(p.grad is None for p in target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_ct_loss_noises_both_points_with_the_same_eps():
    proc = EDM()
    f = lambda x, t, cond=None: Pred(x, torch.zeros_like(x))    # the identity: the loss is ||x_{t_next} - x_{t_cur}||^2
    x0 = torch.randn(4, 2, dtype=torch.float64)
    eps = torch.randn(4, 2, dtype=torch.float64)
    t_next, t_cur = torch.full((4,), 0.5, dtype=torch.float64), torch.full((4,), 0.25, dtype=torch.float64)
    loss = cm.ct_loss_at(f, f, x0, eps, t_next, t_cur, proc)
    torch.testing.assert_close(loss, ((80 * 0.25) * eps).pow(2).mean(1))


def test_distances_and_weighting():
    a, b = torch.zeros(3, 4), torch.tensor([[0.0] * 4, [1.0] * 4, [3.0] * 4])
    torch.testing.assert_close(distances.l2(a, b), torch.tensor([0.0, 1.0, 9.0]))
    ph = distances.pseudo_huber(a, b)
    assert ph[0] == 0 and abs(ph[1] - 1) < 1e-3 and abs(ph[2] - 3) < 1e-3    # ~ the RMS error: the norm, not squared
    D = 4   # the paper's form, divided by sqrt(D)
    c = 0.00054 * math.sqrt(D)
    torch.testing.assert_close(ph, (torch.sqrt(((a - b) ** 2).sum(1) + c * c) - c) / math.sqrt(D))
    proc = EDM()
    w = cm.ict_weight(torch.tensor([0.1]), torch.tensor([0.2]), proc)
    torch.testing.assert_close(w, torch.tensor([1 / 8.0]))


def test_grids_and_lognormal_index_probabilities():
    vp, edm = VPCosine(), EDM()
    g = cm.cm_grid(18, vp, 0.002)
    assert len(g) == 18 and g[0] == 0.002 and g[-1] == 1 and (g.diff() > 0).all()
    k = cm.cm_grid(18, edm, 0.002 / 80)
    torch.testing.assert_close(k, grids.karras(18, edm)[:-1].flip(0))     # the paper's Karras grid
    p = cm.lognormal_index_probs(k, edm)
    assert len(p) == 17 and abs(float(p.sum()) - 1) < 1e-12 and (p > 0).all()
    # the mode of p sits near sigma = exp(P_mean) = 0.33
    mid = torch.sqrt(k[1:] * k[:-1]) * 80
    assert 0.05 < float(mid[p.argmax()]) < 2.0
    with pytest.raises(ValueError, match="N >= 2"):
        cm.cm_grid(1, vp, 0.002)


@pytest.mark.parametrize("N", [2, 9, 33])
def test_karras_grid_in_s_for_the_vp_process(N):
    # spacing="karras" on vp-cosine: the paper's rho = 7 grid in s = sigma / alpha, mapped back to t
    vp, rho = VPCosine(), 7.0
    g = cm.cm_grid(N, vp, 0.002, spacing="karras")
    assert len(g) == N and g[0] == 0.002 and g[-1] == 1 and (g.diff() > 0).all()
    s = cm.ve_sigma(g, vp)
    ends = cm.ve_sigma(torch.tensor([0.002, 1.0], dtype=torch.float64), vp)
    torch.testing.assert_close(s[[0, -1]], ends, rtol=1e-12, atol=0)
    root = s ** (1 / rho)                                       # equally spaced in s^(1/rho)
    torch.testing.assert_close(root.diff(), torch.full((N - 1,), float(root[-1] - root[0]) / (N - 1),
                                                       dtype=torch.float64), rtol=1e-9, atol=0)
    # below s(1): N Karras levels from s(t_min) to s_max = 80 (the paper's grid), ending below t = 1; sampling
    # starts at its top (on_grid lowers the first step time to it)
    c = cm.cm_grid(N, vp, 0.002, spacing="karras", s_max=80.0)
    sc = cm.ve_sigma(c, vp)
    assert len(c) == N and c[0] == 0.002 and c[-1] < 1 and (c.diff() > 0).all()
    torch.testing.assert_close(sc[[0, -1]], torch.tensor([float(ends[0]), 80.0], dtype=torch.float64), rtol=1e-12,
                               atol=0)
    rc = sc ** (1 / rho)
    torch.testing.assert_close(rc.diff(), torch.full((N - 1,), float(rc[-1] - rc[0]) / (N - 1), dtype=torch.float64),
                               rtol=1e-9, atol=0)
    assert cm.on_grid([1.0], c) == [float(c[-1])] and cm.on_grid([1.0], g) == [1.0]
    # its top interval is not starved by iCT's weighting the way the uniform-in-t grid's is
    w = lambda grid: cm.ict_weight(grid[:-1], grid[1:], vp)
    if N == 33:
        u = w(cm.cm_grid(N, vp, 0.002, spacing="uniform"))
        k = w(g)
        assert float(u[-1] / u.median()) < 1e-4 < float(k[-1] / k.median())


def test_grid_spacing_defaults_and_errors():
    vp, edm = VPCosine(), EDM()
    assert torch.equal(cm.cm_grid(10, vp, 0.002), cm.cm_grid(10, vp, 0.002, spacing="uniform"))
    assert torch.equal(cm.cm_grid(10, edm, 0.002 / 80), cm.cm_grid(10, edm, 0.002 / 80, spacing="karras"))
    s = torch.tensor([1e-3, 0.5, 3.0, 1e3], dtype=torch.float64)
    torch.testing.assert_close(cm.ve_sigma(cm.t_of_ve_sigma(s, vp), vp), s, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="finite top level"):
        cm.cm_grid(10, RectifiedFlow(), 0.002, spacing="karras")
    with pytest.raises(ValueError, match="spacing"):
        cm.cm_grid(10, vp, 0.002, spacing="log")


def test_ct_schedules_match_the_papers_formulas():
    # 2023 paper (CIFAR-10: s0 = 2, s1 = 150, mu0 = 0.9): N goes 2 -> 151, mu from mu0^(s0/(N-1)) towards 1
    K = 800_000
    assert cm.n_progressive(0, K) == 2 and cm.n_progressive(K, K) == 151
    assert abs(cm.mu_adaptive(0, K) - 0.9**2) < 1e-12
    assert abs(cm.mu_adaptive(K, K) - math.exp(2 * math.log(0.9) / 150)) < 1e-12
    ns = [cm.n_progressive(k, K) for k in range(0, K + 1, 10_000)]
    assert ns == sorted(ns)
    # iCT (s0 = 10, s1 = 1280): 8 stages of K // 8 updates, N - 1 doubling 10, 20, ..., 1280
    assert [cm.n_doubling(k * (K // 8), K) - 1 for k in range(8)] == [10 * 2**i for i in range(8)]
    assert cm.n_doubling(K, K) == 1281
    s = cm.ct_schedule("doubling", 1000)
    assert s.mu(500) == 0.0 and s.N(0) == 11
    s = cm.ct_schedule("progressive", 1000)
    assert 0.8 < s.mu(0) < s.mu(999) < 1
    with pytest.raises(ValueError, match="progressive, doubling"):
        cm.ct_schedule("linear", 10)


@pytest.mark.parametrize("proc", [VPCosine(), EDM()], ids=lambda p: p.name)
def test_multistep_sampling_renoises_from_t_min_with_the_process_kernel(proc):
    t_min = cm.default_t_min(proc)
    calls = []

    def model(x, t, cond=None):
        calls.append((x.clone(), t.clone()))
        return Pred(torch.full_like(x, 0.5), torch.zeros_like(x))

    x = torch.randn(3, 2, dtype=torch.float64)
    z = torch.randn(1, 3, 2, dtype=torch.float64)
    out = cm.multistep_sample(model, x, [1.0, 0.4], proc, t_min, noises=z)
    assert torch.equal(out, torch.full_like(x, 0.5)) and len(calls) == 2
    t4 = torch.tensor(0.4, dtype=torch.float64)
    tm = torch.tensor(t_min, dtype=torch.float64)
    r = proc.alpha(t4) / proc.alpha(tm)
    want = r * 0.5 + torch.sqrt(proc.sigma(t4) ** 2 - r**2 * proc.sigma(tm) ** 2) * z[0]
    torch.testing.assert_close(calls[1][0], want)
    assert float(calls[1][1][0]) == 0.4


def test_multistep_sampling_of_the_exact_flow_map_gives_the_data_distribution():
    # one Gaussian: the exact consistency function maps x_1 ~ prior to N(mu, S) (approximately: alpha(1) > 0), and
    # each later step re-noises a sample of the data and maps it back, keeping the distribution
    proc = VPCosine()
    mix = GaussianMixture.isotropic(torch.tensor([[1.0, -0.5]], dtype=torch.float64), 0.6)
    f = ExactFlowMap(mix, proc, cm.T_MIN)
    g = torch.Generator().manual_seed(3)
    x1 = proc.prior((20000, 2), g, dtype=torch.float64)
    for ts in ([1.0], [1.0, 0.5], [1.0, 0.6, 0.2]):
        x = cm.multistep_sample(f, x1, ts, proc, cm.T_MIN, generator=g)
        torch.testing.assert_close(x.mean(0), torch.tensor([1.0, -0.5], dtype=torch.float64), atol=0.02, rtol=0)
        torch.testing.assert_close(x.std(0), torch.tensor([0.6, 0.6], dtype=torch.float64), atol=0.02, rtol=0)


def test_step_times():
    assert cm.step_times(1) == [1.0] and cm.step_times(2) == [1.0, 0.5] and cm.step_times(2, [0.3]) == [1.0, 0.3]
    with pytest.raises(ValueError, match="decrease"):
        cm.step_times(3, [0.3, 0.6])
    with pytest.raises(ValueError, match="intermediate"):
        cm.step_times(3, [0.3])


def test_short_cd_run_moves_the_one_step_map_towards_the_teachers():
    from course_lib.teachers import load_teacher

    teacher = load_teacher("gmm-vp")
    proc = teacher.process
    x1 = proc.prior((1000, 2), torch.Generator().manual_seed(5))
    target = samplers.dpm_solver_pp_2m(teacher, x1, grids.uniform(32), proc)     # the teacher's own flow map
    rms = lambda x: float((x - target).pow(2).sum(1).mean().sqrt())
    before = rms(cm.multistep_sample(cm.consistency_model(teacher), x1, [1.0], proc, cm.T_MIN))
    cfg = cm.CMConfig(N=10, solver="ddim", mu=0.0, lr=5e-4, ema_decay=0.0)
    student, done = cm.distill_cd(teacher, data2d.batches("gmm"), cfg,
                                  run=TrainConfig(steps=60, batch_size=256, seed=0), progress=False)
    assert isinstance(student, ConsistencyModel) and done.updates["student"] == 60
    assert not any(p.requires_grad for p in teacher.parameters())
    after = rms(cm.multistep_sample(student, x1, [1.0], proc, student.t_min))
    assert after < 0.7 * before, (after, before)


def test_short_ct_run_trains_and_follows_its_schedule():
    proc = VPCosine()
    from course_lib.config import seeded
    with seeded(0):
        base = Denoiser(MLP2D(hidden=32, depth=2), proc, "v")
    sched = cm.ct_schedule("doubling", 40, s0=2, s1=8)
    trained, done = cm.distill_ct(base, data2d.batches("gmm"), cm.CMConfig(schedule=sched, lr=1e-3),
                                  run=TrainConfig(steps=40, batch_size=64, seed=0, log_every=10), progress=False)
    assert len(done.losses["student"]) == 40 and all(math.isfinite(v) for v in done.losses["student"])
    assert done.logs["N"] == [3.0] if len(done.logs["N"]) == 1 else done.logs["N"][0] == 3.0
    x = cm.multistep_sample(trained, proc.prior((10, 2)), [1.0, 0.5], proc, trained.t_min)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("method", ["cd", "ct"])
def test_benchmark_rows(method, tmp_path):
    import json

    from course_lib import bench

    out = tmp_path / f"{method}.json"
    res = bench.main([method, "--mode", "smoke", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["name"] == method and res["schema"] == 3
    rows = res["rows"]
    for ds in ("checkerboard", "gmm", "digits"):
        mine = [r for r in rows if r["dataset"] == ds]
        assert any(r["model"] == "data" for r in mine) and any(r["model"] == "teacher" for r in mine)
        student = [r for r in mine if r["model"] == method]
        assert {r["nfe"] for r in student} == {1, 2, 4} and all(r["n_seeds"] == 3 and "std" in r for r in student)
        assert all(r["steps"] == r["nfe"] and "train_seconds" in r for r in student)
    gmm = {(r["model"], r["nfe"], r["metric"]) for r in rows if r["dataset"] == "gmm"}
    assert (method, 1, "flow_map_err_exact") in gmm and (method, 1, "precision") in gmm
    assert ((("pd", 1, "flow_map_err_exact") in gmm) == (method == "cd"))     # CD's equal-cost PD comparison
    digits = {(r["model"], r["metric"]) for r in rows if r["dataset"] == "digits"}
    assert {(method, "kid_heldout"), (method, "fd_heldout"), ("teacher", "kid_heldout")} <= digits
    if method == "cd":
        # the untrained student is the teacher as a consistency model (distill_cd: consistency_model of a copy, the
        # benchmark's CMConfig), sampled in one step from the benchmark's noise (prior seed s + 3, then s + 4).
        # Smoke, measured: cd 0.68 / 0.80 against 0.95 / 1.23 (checkerboard / gmm), at most 0.73 of it on a seed
        from course_lib.bench.cd import _cd_cfg, _sample_cm, cm_budget
        from course_lib.bench.core import prior
        from course_lib.teachers import load_teacher

        cfg = _cd_cfg(cm_budget("smoke"))
        for ds in ("checkerboard", "gmm"):
            t = load_teacher(f"{ds}-vp", device="cpu")
            t_min = cm.default_t_min(t.process) if cfg.t_min is None else cfg.t_min
            start_model = cm.consistency_model(t, t_min, cfg.sigma_data)
            n = next(r["n"] for r in rows if r["dataset"] == ds and r["model"] == "cd")
            start = untrained_swd(ds, n, lambda s: _sample_cm(start_model, prior(t.process, (n, 2), s + 3, "cpu"), 1,
                                                              s + 4, t.process, t_min))
            beats(swd(rows, ds, "cd", 1), start, 0.85, f"cd {ds}")


@pytest.mark.parametrize("method", ["cd", "ct"])
def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(method, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a CD / CT run saves a checkpoint; rerunning the same call finishes the run with
    exactly the weights (student, its EMA and the target network) of a run that was never interrupted. For CT this
    also needs the resumed run to pick up the discretisation schedule N(k) at the step it stopped."""
    from course_lib.teachers import load_teacher

    teacher = load_teacher("gmm-vp")
    steps_total = 24
    data = data2d.batches("gmm")

    def run(folder):
        tc = TrainConfig(steps=steps_total, batch_size=64, seed=0, ckpt_every=8)
        if method == "cd":
            return cm.distill_cd(teacher, data, cm.CMConfig(N=6, solver="ddim", mu=0.9, lr=5e-4, ema_decay=0.9),
                                 run=tc, ckpt_dir=folder, progress=False)
        from course_lib.config import seeded
        with seeded(0):
            fresh = Denoiser(MLP2D(hidden=16, depth=2), VPCosine(), "v")
        cfg = cm.CMConfig(schedule=cm.ct_schedule("doubling", steps_total, s0=2, s1=8), lr=1e-3, ema_decay=0.9)
        return cm.distill_ct(fresh, data, cfg, run=tc, ckpt_dir=folder, progress=False)

    ref_student, ref = run(tmp_path / "ref")
    name = "cd_loss_at" if method == "cd" else "ct_loss_at"
    real = interrupt_on_call(monkeypatch, cm, name, 13)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "int")
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cm, name, counting)
    student, done = run(tmp_path / "int")
    assert done.updates["student"] == steps_total
    assert counted["n"] == steps_total - 12, "the rerun did not resume from the checkpoint saved at the interrupt"
    for (k, p), q in zip(ref_student.state_dict().items(), student.state_dict().values()):
        assert torch.equal(p, q), k
    if method == "ct":
        assert done.logs["N"] == ref.logs["N"]


def test_on_grid_moves_step_times_to_the_training_grid():
    proc = VPCosine()
    grid = cm.cm_grid(10, proc, cm.T_MIN)
    ts = cm.on_grid(cm.step_times(4), grid)
    assert ts[0] == 1.0 and all(any(abs(t - float(g)) < 1e-15 for g in grid) for t in ts)
    assert [round(t, 4) for t in ts] == [1.0, 0.7782, 0.4456, 0.2238]           # nearest points of t_min + 0.998 i / 9
    with pytest.raises(ValueError, match="distinct"):
        cm.on_grid([1.0, 0.46, 0.45], grid)
