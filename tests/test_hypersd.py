"""Hyper-SD (distill/hypersd.py): segment starts, the TSCD target (k = 1 is consistency distillation), stage chaining,
the reward-feedback loss's gradient, resuming an interrupted stage bit for bit, the unified sampler, bad inputs."""
import pytest
import torch
from torch import nn

from course_lib import samplers, steps
from course_lib.conditioning import Cond
from course_lib.data2d import batches, get_mixture, sample_2d
from course_lib.distill import consistency as cm
from course_lib.distill import hypersd as h
from course_lib.distill.tcd import tcf
from course_lib.predictions import Pred
from course_lib.processes import RectifiedFlow, VPCosine
from course_lib.train import TrainConfig
from conftest import interrupt_on_call, mlp_denoiser


# --- segment starts ----------------------------------------------------------------------------------------------

def test_segment_start_analytic_values_on_the_continuous_range():
    t = torch.tensor([0.0, 0.1, 0.125, 0.13, 0.25, 0.5, 0.51, 0.999, 1.0], dtype=torch.float64)
    want8 = torch.tensor([0.0, 0.0, 0.0, 0.125, 0.125, 0.375, 0.5, 0.875, 0.875], dtype=torch.float64)
    assert torch.equal(h.segment_start(t, 8), want8)
    assert torch.equal(h.segment_start(t, 2), torch.tensor([0, 0, 0, 0, 0, 0, .5, .5, .5], dtype=torch.float64))
    assert torch.equal(h.segment_start(t, 1), torch.zeros_like(t))        # k = 1: everything maps to the end
    # with t_min: segments of (1 - t_min) / k; an edge belongs to the segment below it, t_min is its own start
    tm = 0.002
    w = (1 - tm) / 4
    got = h.segment_start(torch.tensor([tm, tm + w, tm + 1.5 * w, tm + 3 * w + 1e-6, 1.0]), 4, t_min=tm)
    torch.testing.assert_close(got, torch.tensor([tm, tm, tm + w, tm + 3 * w, tm + 3 * w]))
    assert got.dtype == torch.float32


def test_segment_start_of_float32_edges_is_the_edge_below():
    # float32 copies of the float64 edges sit ~1e-8 above or below them: each still counts as ON its edge
    edges = h.segment_edges(8, 0.002)
    got = h.segment_start(edges[1:].float(), 8, t_min=0.002)
    torch.testing.assert_close(got, edges[:-1].float())


def test_segment_start_on_a_grid_and_on_integer_timesteps():
    proc = VPCosine()
    grid = cm.cm_grid(17, proc, 0.002)
    edges = h.segment_edges(4, grid=grid)
    assert torch.equal(edges, grid[[0, 4, 8, 12, 16]])
    assert torch.equal(h.segment_start(grid[[0, 1, 4, 5, 8, 9, 16]], 4, grid=grid), grid[[0, 0, 0, 4, 4, 8, 12]])
    # every teacher step t_{n+1} -> t_n of the grid stays inside one segment
    for k in (8, 4, 2, 1):
        s = h.segment_start(grid[1:], k, grid=grid)
        assert bool((grid[:-1] >= s).all())
    # diffusers-style integer timesteps (PCM's phases on a 50-point DDIM grid)
    taus = torch.arange(0, 1000, 20)
    e = h.segment_edges(4, grid=taus)
    assert e.dtype == torch.int64 and e.tolist() == [0, 240, 480, 740, 980]
    assert h.segment_start(torch.tensor([0, 20, 240, 260, 980]), 4, grid=taus).tolist() == [0, 0, 0, 240, 740]


@pytest.mark.parametrize("k, match", [(0, "int >= 1"), (2.5, "int >= 1"), (True, "int >= 1")])
def test_segment_start_refuses_a_bad_k(k, match):
    with pytest.raises(ValueError, match=match):
        h.segment_start(torch.tensor([0.5]), k)


def test_segment_start_refuses_bad_times_and_grids():
    with pytest.raises(ValueError, match=r"must lie in \[0.002"):
        h.segment_start(torch.tensor([0.001]), 4, t_min=0.002)
    with pytest.raises(ValueError, match="must lie in"):
        h.segment_start(torch.tensor([1.2]), 4)
    with pytest.raises(ValueError, match="at least k intervals"):
        h.segment_start(torch.tensor([0.5]), 8, grid=torch.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="increasing"):
        h.segment_start(torch.tensor([0.5]), 2, grid=torch.tensor([0.0, 1.0, 0.5]))


# --- the TSCD target -----------------------------------------------------------------------------------------------

class Jump(nn.Module):
    """A consistency function f(x, t) = DDIM jump of `model` to the fixed end t_min (the boundary f(x, t_min) = x)."""

    def __init__(self, model, t_min):
        super().__init__()
        self.model, self.t_min, self.process = model, t_min, model.process

    def forward(self, x, t, cond=None):
        f = tcf(self.model, x, t, torch.full_like(t, self.t_min), self.process, cond)
        return Pred(f, torch.zeros_like(f))


def _case(proc, seed=0, B=64, N=17):
    g = torch.Generator().manual_seed(seed)
    grid = cm.cm_grid(N, proc, 0.002)
    n = torch.randint(1, N, (B,), generator=g)
    x0 = 2 * torch.randn(B, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 2, generator=g, dtype=torch.float64)
    return grid, grid[n], grid[n - 1], x0, eps


@pytest.mark.parametrize("proc", [VPCosine(), RectifiedFlow()], ids=lambda p: p.name)
@pytest.mark.parametrize("solver", ["ddim", "heun"])
def test_tscd_with_one_segment_is_consistency_distillation(proc, solver):
    # k = 1: the only segment start is t_min, and the TSCD loss is consistency.cd_loss_at (notebook 05) with the
    # consistency function "DDIM jump to t_min", sample for sample
    student, target, teacher = mlp_denoiser(proc, 1), mlp_denoiser(proc, 2), mlp_denoiser(proc, 3)
    grid, t_next, t_cur, x0, eps = _case(proc)
    s = h.segment_start(t_next, 1, grid=grid)
    assert torch.equal(s, torch.full_like(s, 0.002))
    got = h.tscd_loss_at(student, target, teacher, x0, eps, t_next, t_cur, s, proc, solver)
    want = cm.cd_loss_at(Jump(student, 0.002), Jump(target, 0.002), teacher, x0, eps, t_next, t_cur, proc, solver)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # the target alone: CD's f_{theta^-}(teacher step, t_n)
    x_next = proc.marginal(x0, t_next, eps)
    with torch.no_grad():
        cd_target = Jump(target, 0.002)(steps.STEPS[solver](teacher, x_next, t_next, t_cur, proc), t_cur).x0
    torch.testing.assert_close(h.tscd_target(teacher, target, x_next, t_next, t_cur, s, proc, solver), cd_target,
                               atol=1e-12, rtol=1e-10)


def test_tscd_target_maps_to_the_segment_start_with_the_boundary_condition():
    proc = VPCosine()
    target, teacher = mlp_denoiser(proc, 2), mlp_denoiser(proc, 3)
    grid, t_next, t_cur, x0, eps = _case(proc)
    s = h.segment_start(t_next, 4, grid=grid)
    x_next = proc.marginal(x0, t_next, eps)
    want = h.tscd_target(teacher, target, x_next, t_next, t_cur, s, proc)
    x_cur = steps.ddim(teacher, x_next, t_next, t_cur, proc)
    on_edge = t_cur == s
    assert bool(on_edge.any()) and bool((~on_edge).any())
    # at the segment start itself the target is the teacher's point (f(x, s, s) = x), elsewhere the target network's
    # jump to s; never a jump to the trajectory's end
    torch.testing.assert_close(want[on_edge], x_cur[on_edge], atol=1e-12, rtol=0)
    torch.testing.assert_close(want, tcf(target, x_cur, t_cur, s, proc))
    assert not torch.allclose(want[~on_edge], tcf(target, x_cur, t_cur, torch.full_like(s, 0.002), proc)[~on_edge])
    assert not want.requires_grad


def test_tscd_target_refuses_a_step_that_crosses_a_segment():
    proc = VPCosine()
    m = mlp_denoiser(proc)
    x = torch.randn(3, 2, dtype=torch.float64)
    t_next = torch.full((3,), 0.6, dtype=torch.float64)
    with pytest.raises(ValueError, match="crossed a segment edge"):
        h.tscd_target(m, m, x, t_next, torch.full((3,), 0.4, dtype=torch.float64),
                      h.segment_start(t_next, 2), proc)


def test_the_tscd_loss_trains_the_student_only():
    proc = VPCosine()
    student, target, teacher = mlp_denoiser(proc, 1), mlp_denoiser(proc, 2), mlp_denoiser(proc, 3)
    grid, t_next, t_cur, x0, eps = _case(proc)
    s = h.segment_start(t_next, 2, grid=grid)
    target.requires_grad_(True)
    h.tscd_loss_at(student, target, teacher, x0, eps, t_next, t_cur, s, proc).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in target.parameters())


# --- stages ----------------------------------------------------------------------------------------------------------

def _teacher():
    return mlp_denoiser(VPCosine(), 5, torch.float32, hidden=32).requires_grad_(False).eval()


def _run(steps=6, seed=0):
    return TrainConfig(steps=steps, batch_size=64, seed=seed, desc="test")


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_each_stage_is_taught_and_initialised_by_the_previous_one():
    teacher = _teacher()
    cfg = h.TSCDConfig(segments=(8, 4, 2, 1), N=17)
    final, stages = h.distill_tscd(teacher, batches("gmm"), cfg, run=_run(), progress=False)
    assert [st.k for st in stages] == [8, 4, 2, 1]
    assert _same(stages[0].teacher, teacher)
    for prev, nxt in zip(stages, stages[1:]):
        assert _same(nxt.teacher, prev.student), f"stage k={nxt.k} is not taught by stage k={prev.k}'s model"
        assert not _same(nxt.student, prev.student)
    assert final is stages[-1].student
    assert stages[1].trained.updates["student"] == 6
    _, unchained = h.distill_tscd(teacher, batches("gmm"), h.TSCDConfig(segments=(4, 2), N=9, chain_teacher=False),
                                  run=_run(2), progress=False)
    assert all(_same(st.teacher, teacher) for st in unchained)


def test_an_interrupted_stage_resumes_bit_for_bit(tmp_path, monkeypatch):
    teacher = _teacher()
    cfg = h.TSCDConfig(segments=(4, 2, 1), N=9)

    def run(folder):
        return h.distill_tscd(teacher, batches("gmm"), cfg, run=_run(), ckpt_dir=folder, progress=False)

    ref, _ = run(tmp_path / "ref")
    real = interrupt_on_call(monkeypatch, h, "tscd_loss_at", 9)      # stage k = 2, its third update
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "int")
    assert (tmp_path / "int" / "k4").is_dir() and (tmp_path / "int" / "k2").is_dir()
    assert not (tmp_path / "int" / "k1").exists()
    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(h, "tscd_loss_at", counting)
    resumed, stages = run(tmp_path / "int")
    assert counted["n"] == 6 - 2 + 6, "the rerun did not reload stage k=4 and resume stage k=2 from its checkpoint"
    assert _same(ref, resumed)
    assert stages[2].trained.updates["student"] == 6


def test_the_adversarial_term_trains_heads_on_the_teachers_features(tmp_path):
    teacher = _teacher()
    cfg = h.TSCDConfig(segments=(2,), N=9, lambda_adv=0.5)
    ex = {"x": sample_2d("gmm", 8, torch.Generator().manual_seed(0))[0]}
    _, (stage,) = h.distill_tscd(teacher, batches("gmm"), cfg, run=_run(4), ckpt_dir=tmp_path, progress=False,
                                 example=ex)
    D = stage.trained.nets["disc"]
    assert stage.trained.updates["disc"] == 4 and stage.trained.losses["disc"]
    assert all(k.startswith("heads.") for k in D.state_dict())          # the teacher is read, not stored
    # the discriminator sees samples re-noised INSIDE the segment: (s, s_end]
    seen = []
    hook = D.teacher.register_forward_hook(lambda m, inp, out: seen.append(inp[1]))
    s = torch.full((5,), 0.002 + (1 - 0.002) / 2)
    D(torch.randn(5, 2), s, torch.ones(5), torch.Generator().manual_seed(0))
    hook.remove()
    assert bool((seen[0] > s).all()) and bool((seen[0] <= 1.0).all())


@pytest.mark.parametrize("change, match", [
    (dict(segments=()), "empty"), (dict(segments=(2, 4)), "must not increase"), (dict(segments=(8,), N=5),
                                                                                 "at least 8 grid intervals"),
    (dict(solver="rk4"), "unknown solver"), (dict(distance="l3"), "l3"), (dict(lambda_adv=-1.0), "lambda_adv"),
    (dict(segments=(0,)), "int >= 1")])
def test_bad_stage_settings_give_clear_errors(change, match):
    with pytest.raises(ValueError, match=match):
        h.distill_tscd(_teacher(), batches("gmm"), h.TSCDConfig(**change), run=_run(1), progress=False)


def test_the_adversarial_term_without_examples_is_refused():
    with pytest.raises(ValueError, match="example="):
        h.distill_tscd(_teacher(), batches("gmm"), h.TSCDConfig(segments=(2,), N=9, lambda_adv=0.1), run=_run(1),
                       progress=False)


# --- reward feedback ---------------------------------------------------------------------------------------------

def test_the_reward_gradient_reaches_every_parameter_through_the_prediction():
    proc = VPCosine()
    student = mlp_denoiser(proc, 1)
    x_t = torch.randn(32, 2, dtype=torch.float64)
    t = torch.full((32,), 0.2, dtype=torch.float64)
    c = torch.tensor([1.0, -0.5], dtype=torch.float64)
    reward = lambda x, cond: -(x - c).pow(2).sum(1)
    loss = h.refl_loss(student, x_t, t, proc, reward)
    assert loss.shape == (32,)
    grads = torch.autograd.grad(loss.sum(), list(student.parameters()))
    assert all(bool(g.abs().sum() > 0) for g in grads), "some parameters get no reward gradient"
    # the chain rule through x0_hat: d(-r)/dx0_hat = 2 (x0_hat - c)
    x0_hat = student(x_t, t).x0
    want = torch.autograd.grad(x0_hat, list(student.parameters()), grad_outputs=2 * (x0_hat - c).detach())
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)
    # the reward is on the prediction, not on x_t: a reward of x_t alone would give no gradient at all
    assert not torch.allclose(loss, -reward(x_t, None))
    # ReFL's hinge: relu(margin - r)
    torch.testing.assert_close(h.refl_loss(student, x_t, t, proc, reward, margin=0.0),
                               torch.relu(-reward(student(x_t, t).x0, None)))


def test_the_reward_function_must_give_one_reward_per_sample():
    proc = VPCosine()
    student = mlp_denoiser(proc, 1)
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        h.refl_loss(student, x, torch.full((4,), 0.1, dtype=torch.float64), proc, lambda x0, c: x0)


def test_the_mode_reward_prefers_the_named_components():
    mix = get_mixture("gmm")
    r = h.mode_reward(mix.means, [0, 1], scale=0.5)
    at = r(mix.means.float())
    # r = log P(component in {0, 1} | x) for equal isotropic bumps of std 0.5: the softmax of -|x - mu_j|^2 / 0.5
    d2 = torch.cdist(mix.means, mix.means) ** 2
    want = torch.log(torch.softmax(-d2 / 0.5, 1)[:, :2].sum(1))
    torch.testing.assert_close(at, want.float())
    assert float(at[0]) > -0.01 and float(at[1]) > -0.01 and bool((at[2:] < -4).all())
    with pytest.raises(ValueError, match="preferred"):
        h.mode_reward(mix.means, [8])


def test_the_reward_stage_raises_the_reward():
    teacher = _teacher()
    reward = h.mode_reward(get_mixture("gmm").means, [0, 1, 2])
    before, _ = h.distill_tscd(teacher, batches("gmm"), h.TSCDConfig(segments=(1,), N=9), run=_run(2),
                               progress=False)
    after, done = h.distill_reward(before, batches("gmm"), reward, h.RewardConfig(lambda_reward=1.0, lr=3e-3,
                                                                                 ema_decay=0.0, N=9),
                                   run=_run(40), progress=False)
    x1 = teacher.process.prior((2000, 2), generator=torch.Generator().manual_seed(0))
    r = lambda m: float(reward(h.sample(m, x1, 1, m.process)).mean())
    assert r(after) > r(before) + 0.05


# --- the whole method and the unified sampler ------------------------------------------------------------------------

def test_distill_hypersd_runs_every_part(tmp_path):
    from course_lib.distill.dmd import DMDConfig

    teacher = _teacher()
    ex = {"x": sample_2d("gmm", 8, torch.Generator().manual_seed(0))[0]}
    cfg = h.HyperSDConfig(tscd=h.TSCDConfig(segments=(2, 1), N=9), reward=h.RewardConfig(N=9),
                          score=DMDConfig(normalize="batch", ttur=2), reward_steps=2, score_steps=4)
    final, parts = h.distill_hypersd(teacher, batches("gmm"), cfg, run=_run(2), ckpt_dir=tmp_path, progress=False,
                                     reward_fn=h.half_plane_reward(), example=ex)
    assert list(parts) == ["tscd", "tscd-reward", "hypersd"] and parts["hypersd"] is final
    assert {p.name for p in tmp_path.iterdir()} == {"k2", "k1", "reward", "score"}
    assert not _same(parts["tscd"], parts["tscd-reward"])


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_the_unified_sampler_is_tcds_on_the_trailing_grid(n):
    proc = VPCosine()
    m = mlp_denoiser(proc, 1)
    x = proc.prior((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noises = torch.randn(max(n - 1, 1), 16, 2, dtype=torch.float64)[: n - 1]
    got = h.sample(m, x, n, proc, gamma=0.4, noises=noises)
    want = samplers.tcd(m, x, torch.linspace(1, 0, n + 1, dtype=torch.float64), proc, gamma=0.4, noises=noises)
    torch.testing.assert_close(got, want)
    default = h.sample(m, x, n, proc, noises=noises)
    torch.testing.assert_close(default, samplers.tcd(m, x, h.unified_grid(n), proc, gamma=h.GAMMAS[n], noises=noises))
    with pytest.raises(ValueError, match="gamma"):
        h.sample(m, x, n, proc, gamma=1.5)


def test_conditioning_reaches_every_model():
    proc = VPCosine()
    m = mlp_denoiser(proc, 1, num_classes=3)
    cond = Cond(y=torch.tensor([0, 1, 2, 0]), null_y=3)
    x = torch.randn(4, 2, dtype=torch.float64)
    t_next = torch.full((4,), 0.6, dtype=torch.float64)
    s = h.segment_start(t_next, 2)
    a = h.tscd_target(m, m, x, t_next, torch.full((4,), 0.55, dtype=torch.float64), s, proc, cond=cond)
    b = h.tscd_target(m, m, x, t_next, torch.full((4,), 0.55, dtype=torch.float64), s, proc)
    assert not torch.allclose(a, b)
