"""Exercise checkers accept right answers, reject wrong ones with an explanation, and fall back when unsolved."""
import dataclasses

import pytest
import torch

from course_lib import checks
from course_lib.conditioning import unpack
from course_lib.metrics import sliced_wasserstein
from course_lib.predictions import Pred, to_pred


def right_v(v, x, t, process):
    return to_pred(v, x, t, process, "v")


def vp_only_v(v, x, t, process):  # assumes alpha^2 + sigma^2 = 1: right for VP processes, wrong for rf
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    return Pred(a * x - s * v, s * x + a * v)


def right_ddim(pred, t, s, process):
    return process.alpha(s)[:, None] * pred.x0 + process.sigma(s)[:, None] * pred.eps


def wrong_ddim(pred, t, s, process):  # uses the old time
    return process.alpha(t)[:, None] * pred.x0 + process.sigma(t)[:, None] * pred.eps


def right_swd(x, y, d):
    return sliced_wasserstein(x, y, directions=d)


def unsorted_swd(x, y, d):
    return float(((x @ d.T - y @ d.T) ** 2).mean().sqrt())


def unsolved(*args):
    raise NotImplementedError("Exercise 0.2: one deterministic DDIM step from t to s")


@pytest.mark.parametrize("check, right, wrong", [
    (checks.check_v_to_pred, right_v, vp_only_v),
    (checks.check_ddim_step, right_ddim, wrong_ddim),
    (checks.check_sliced_wasserstein, right_swd, unsorted_swd),
])
def test_checker_verdicts(check, right, wrong, capsys):
    assert_verdicts(check, right, wrong, capsys)


def assert_verdicts(check, right, wrong, capsys):
    """A right answer is kept, a wrong one is replaced by the reference with an explanation, an unsolved one too."""
    assert check(right, seed=0) is right
    assert "correct on" in capsys.readouterr().out
    fallback = check(wrong, seed=0)
    out = capsys.readouterr().out
    assert fallback is not wrong and "differs from the reference" in out and "reference implementation" in out
    assert check(unsolved, seed=0) is not unsolved
    assert "not solved yet" in capsys.readouterr().out


def test_fallbacks_compute_the_reference():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 2, generator=g), torch.randn(100, 2, generator=g) + 1
    d = torch.nn.functional.normalize(torch.randn(16, 2, generator=g), dim=1)
    assert checks.check_sliced_wasserstein(unsolved, seed=0)(x, y, d) == pytest.approx(right_swd(x, y, d))


def test_crash_and_wrong_shape_are_explained(capsys):
    def crashes(pred, t, s, process):
        return pred.x0 @ torch.ones(3, 3)

    def flat(pred, t, s, process):
        return right_ddim(pred, t, s, process).flatten()

    checks.check_ddim_step(crashes, seed=0)
    assert "raised RuntimeError" in capsys.readouterr().out
    checks.check_ddim_step(flat, seed=0)
    assert "has shape" in capsys.readouterr().out


def pd_round_with(targets_from_student=False, continuous_times=False, unfreeze=True):
    """The notebook's solution of 1.3, or one with a planted mistake."""
    import copy

    from course_lib.distill.pd import pd_loss_at
    from course_lib.train import train

    def pd_round(teacher, N, sample_data, cfg):
        frozen = copy.deepcopy(teacher).eval().requires_grad_(False)

        def loss(student, batch, g):
            x0 = batch["x"]
            if continuous_times:                                  # any t in (0, 1], not the student's grid
                t = 1 - torch.rand(len(x0), generator=g).to(x0.dtype)
            else:
                t = (torch.randint(N, (len(x0),), generator=g) + 1).to(x0.dtype) / N
            eps = torch.randn(x0.shape, generator=g)
            return pd_loss_at(student, student if targets_from_student else frozen, x0, t, eps, N, student.process)

        student = copy.deepcopy(teacher).train()
        if unfreeze:
            student.requires_grad_(True)
        return train(student, loss, sample_data, cfg, progress=False).model.eval().requires_grad_(False)
    return pd_round


live_student_target_round = pd_round_with(targets_from_student=True)   # the target from the student in training
continuous_time_round = pd_round_with(continuous_times=True)


def test_pd_target_checker_tests_several_processes(capsys):
    from course_lib.distill.pd import pd_target
    from course_lib.processes import bcast
    from course_lib.samplers import ddim_step

    def vp_only_target(teacher, z_t, t, N, process):   # sigma = sqrt(1 - alpha^2): right for VP processes only
        t1, t2 = t - 0.5 / N, (t - 1.0 / N).clamp_min(0.0)
        p1 = teacher(ddim_step(teacher(z_t, t), t, t1, process), t1)
        z2 = ddim_step(p1, t1, t2, process)
        a, a2 = bcast(process.alpha(t), z_t), bcast(process.alpha(t2), z_t)
        s, s2 = (1 - a**2).sqrt(), (1 - a2**2).sqrt()
        return torch.where(bcast(t2 == 0, z_t), p1.x0, (z2 - s2 / s * z_t) / (a2 - s2 / s * a))

    assert checks.check_pd_target(pd_target, seed=0) is pd_target
    assert "correct on 16 random cases" in capsys.readouterr().out          # 4 processes x 4 grids
    assert checks.check_pd_target(vp_only_target, seed=0) is not vp_only_target
    out = capsys.readouterr().out
    assert "differs from the reference" in out and "for the rf process" in out   # passed vp-cosine and sd first


def test_pd_target_and_loss_checkers_reject_plausible_mistakes(capsys):
    from course_lib.distill.pd import pd_loss_at, pd_target
    from course_lib.processes import bcast
    from course_lib.samplers import ddim_step

    def one_full_step_target(teacher, z_t, t, N, process):   # one teacher step t -> t - 1/N instead of two halves
        t2 = (t - 1.0 / N).clamp_min(0.0)
        z2 = ddim_step(teacher(z_t, t), t, t2, process)
        a, s, a2, s2 = (bcast(f(u), z_t) for f, u in ((process.alpha, t), (process.sigma, t),
                                                      (process.alpha, t2), (process.sigma, t2)))
        return torch.where(bcast(t2 == 0, z_t), teacher(z_t, t).x0, (z2 - s2 / s * z_t) / (a2 - s2 / s * a))

    def two_full_steps_target(teacher, z_t, t, N, process):  # half steps of 1/N: lands at t - 2/N
        return pd_target(teacher, z_t, t, N / 2, process)

    def sum_over_dims_loss(student, teacher, x0, t, eps, N, process):   # a sum over data dimensions, not a mean
        return pd_loss_at(student, teacher, x0, t, eps, N, process) * x0.shape[1]

    def unweighted_loss(student, teacher, x0, t, eps, N, process):      # forgets max(SNR, 1)
        z_t = process.marginal(x0, t, eps)
        return (student(z_t, t).x0 - pd_target(teacher, z_t, t, N, process)).pow(2).mean(1)

    def eps_loss(student, teacher, x0, t, eps, N, process):             # compares eps predictions, unweighted
        z_t = process.marginal(x0, t, eps)
        x_tilde = pd_target(teacher, z_t, t, N, process)
        eps_tilde = (z_t - bcast(process.alpha(t), z_t) * x_tilde) / bcast(process.sigma(t), z_t)
        return (student(z_t, t).eps - eps_tilde).pow(2).mean(1)

    for check, wrong in ((checks.check_pd_target, one_full_step_target), (checks.check_pd_target, two_full_steps_target),
                         (checks.check_pd_loss, sum_over_dims_loss), (checks.check_pd_loss, unweighted_loss),
                         (checks.check_pd_loss, eps_loss)):
        used = check(wrong, seed=0)
        assert used is not wrong and checks.is_library(used), wrong.__name__
        assert "differs from the reference" in capsys.readouterr().out


def test_pd_round_checker_accepts_a_round_and_rejects_wrong_ones(capsys):
    import copy

    from course_lib.distill.pd import distill_round

    def right(teacher, N, sample_data, cfg):
        return distill_round(teacher, N, sample_data, run=cfg, progress=False)[1].model.eval()

    def no_training(teacher, N, sample_data, cfg):  # returns an untrained copy: no closer to 2N teacher steps
        return copy.deepcopy(teacher)

    def trains_the_teacher(teacher, N, sample_data, cfg):  # updates the teacher in place instead of a copy
        with torch.no_grad():
            next(teacher.parameters()).add_(0.1)
        return copy.deepcopy(teacher)

    def unsolved(teacher, N, sample_data, cfg):
        raise NotImplementedError("Exercise 1.3")

    assert checks.check_pd_round(right, seed=0) is right
    assert "Later cells use your function" in capsys.readouterr().out
    assert checks.check_pd_round(no_training, seed=0) is not no_training
    assert "did not learn to replace two teacher steps" in capsys.readouterr().out
    assert checks.check_pd_round(trains_the_teacher, seed=0) is not trains_the_teacher
    assert "changed the teacher's weights" in capsys.readouterr().out
    assert checks.check_pd_round(unsolved, seed=0) is not unsolved
    assert "not solved yet" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [live_student_target_round, continuous_time_round], ids=["live-target", "continuous-t"])
def test_pd_round_checker_rejects_a_live_target_and_continuous_times(wrong, capsys):
    # measured gains: about 0.25x and 2.2x, where a correct round gets 8-9x and the check asks for 4x
    assert checks.check_pd_round(wrong, seed=0) is not wrong
    assert "did not learn to replace two teacher steps" in capsys.readouterr().out


# --- notebook 02: guided distillation --------------------------------------------------------------------------

def right_guided_target(teacher, z_t, t, cond, w):
    from course_lib.distill.guided import guided_target
    return guided_target(teacher, z_t, t, cond, w)


def imagen_guided_target(teacher, z_t, t, cond, w):  # Imagen's convention: the weight is off by one
    c, uncond = teacher(z_t, t, cond).x0, teacher(z_t, t, cond.null()).x0
    return uncond + w[:, None] * (c - uncond)


def right_guided_loss(student, teacher, x0, cond, t, eps, w, process):
    from course_lib.distill.guided import guided_loss_at
    return guided_loss_at(student, teacher, x0, cond, t, eps, w, process)


def unweighted_guided_loss(student, teacher, x0, cond, t, eps, w, process):  # forgets max(SNR, 1)
    z_t = process.marginal(x0, t, eps)
    return (student(z_t, t, cond.with_w(w)).x0 - right_guided_target(teacher, z_t, t, cond, w)).pow(2).mean(1)


@pytest.mark.parametrize("check, right, wrong", [
    (checks.check_guided_target, right_guided_target, imagen_guided_target),
    (checks.check_guided_loss, right_guided_loss, unweighted_guided_loss),
])
def test_guided_checker_verdicts(check, right, wrong, capsys):
    assert check(right, seed=0) is right
    assert "correct on" in capsys.readouterr().out
    assert check(wrong, seed=0) is not wrong
    out = capsys.readouterr().out
    assert "differs from the reference" in out and "reference implementation" in out
    assert check(unsolved, seed=0) is not unsolved
    assert "not solved yet" in capsys.readouterr().out


def test_guided_batches_checker(capsys):
    from course_lib.distill.guided import guided_batches

    def one_w_per_batch(sample_data, w_range):  # one w for the whole batch: not what stage 2 needs
        def sample_batch(n, g):
            x0, cond = unpack(sample_data(n, g))
            w = w_range[0] + (w_range[1] - w_range[0]) * torch.rand((), generator=g)
            return {"x": x0, "cond": cond.with_w(w.expand(n))}
        return sample_batch

    def global_rng_w(sample_data, w_range):  # w from torch's global generator: training runs not reproducible
        def sample_batch(n, g):
            x0, cond = unpack(sample_data(n, g))
            return {"x": x0, "cond": cond.with_w(w_range[0] + (w_range[1] - w_range[0]) * torch.rand(n))}
        return sample_batch

    def fixed_generator_w(sample_data, w_range):  # w from a generator of its own: the same w for every batch
        def sample_batch(n, g):
            x0, cond = unpack(sample_data(n, g))
            mine = torch.Generator().manual_seed(0)
            return {"x": x0, "cond": cond.with_w(w_range[0] + (w_range[1] - w_range[0]) * torch.rand(n, generator=mine))}
        return sample_batch

    def label_dict(sample_data, w_range):  # the old dict conditioning {"y": y, "w": w}: the model takes one Cond
        def sample_batch(n, g):
            x0, cond = unpack(sample_data(n, g))
            return {"x": x0, "cond": {"y": cond.y, "w": w_range[0] + (w_range[1] - w_range[0]) * torch.rand(n, generator=g)}}
        return sample_batch

    def pair(sample_data, w_range):  # a tuple (x0, cond): the course's batches are dicts
        def sample_batch(n, g):
            x0, cond = unpack(sample_data(n, g))
            return x0, cond.with_w(w_range[0] + (w_range[1] - w_range[0]) * torch.rand(n, generator=g))
        return sample_batch

    assert checks.check_guided_batches(guided_batches, seed=0) is guided_batches
    assert "correct" in capsys.readouterr().out
    for wrong, says in ((one_w_per_batch, "uniform"), (global_rng_w, "seeded alike gave different w"),
                        (fixed_generator_w, "seeded differently gave the same w"), (unsolved, "not solved yet"),
                        (label_dict, "cond.with_w(w)"), (pair, "{'x': x0, 'cond'")):
        torch.manual_seed(0)
        before = torch.get_rng_state()
        used = checks.check_guided_batches(wrong, seed=0)
        assert used is not wrong and checks.is_library(used) and used.__wrapped__ is guided_batches
        assert says in capsys.readouterr().out
        assert torch.equal(torch.get_rng_state(), before)   # the global-RNG student ran inside a fork


def stage1_with(mistake=None):
    """The notebook's solution of 2.3 (stage 1), or one with a planted mistake."""
    import copy

    from course_lib import models
    from course_lib.distill.guided import draw_w, guided_target
    from course_lib.train import train

    def stage1(teacher, sample_data, w_range, cfg, p_w_min=0.0):
        frozen = copy.deepcopy(teacher).eval().requires_grad_(False)
        student = models.with_guidance_input(teacher, w_range)

        def loss(model, batch, g):
            x0, cond = batch["x"], batch["cond"]
            w = draw_w(len(x0), w_range, g, p_w_min)
            t = 1e-3 + (1 - 1e-3) * torch.rand(len(x0), generator=g)
            z = model.process.marginal(x0, t, torch.randn(x0.shape, generator=g))
            with torch.no_grad():
                if mistake == "imagen":          # Imagen's x0_u + w (x0_c - x0_u) with the course's w: off by one
                    target = guided_target(frozen, z, t, cond, w - 1)
                elif mistake == "no-guidance":   # the conditional teacher as the target
                    target = frozen(z, t, cond).x0
                else:
                    target = guided_target(frozen, z, t, cond, w)
            w_in = torch.zeros_like(w) if mistake == "w-not-passed" else w   # the student always sees w = 0
            weight = (model.process.alpha(t) ** 2 / model.process.sigma(t) ** 2).clamp_min(1.0)
            return weight * (model(z, t, cond.with_w(w_in)).x0 - target).pow(2).mean(1)

        return train(student, loss, sample_data, cfg, progress=False).model.eval().requires_grad_(False)
    return stage1


def test_stage1_checker_accepts_stage1_and_rejects_structural_mistakes(capsys):
    import copy

    def unguided_copy(teacher, sample_data, w_range, cfg, p_w_min=0.0):   # forgot with_guidance_input
        return copy.deepcopy(teacher)

    def trains_the_teacher(teacher, sample_data, w_range, cfg, p_w_min=0.0):
        with torch.no_grad():
            next(teacher.parameters()).add_(0.1)
        return stage1_with()(teacher, sample_data, w_range, cfg, p_w_min)

    right = stage1_with()
    assert checks.check_stage1(right, seed=0) is right
    assert "Later cells use your function" in capsys.readouterr().out
    for wrong, says in ((unguided_copy, "without a guidance input"), (trains_the_teacher, "changed the teacher's"),
                        (unsolved, "not solved yet")):
        used = checks.check_stage1(wrong, seed=0)
        assert used is not wrong and checks.is_library(used)
        assert says in capsys.readouterr().out


@pytest.mark.parametrize("mistake", ["imagen", "no-guidance", "w-not-passed"])
def test_stage1_checker_rejects_a_wrong_target_or_a_missing_w(mistake, capsys):
    # measured (units of guidance, worst w): correct 0.03; imagen about 1; no guidance 16; w not passed about 6
    wrong = stage1_with(mistake)
    assert checks.check_stage1(wrong, seed=1) is not wrong
    assert "units of guidance" in capsys.readouterr().out


def right_rf_loss(model, x0, eps, t):
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    p = model(x_t, t)
    return ((p.eps - p.x0) - (eps - x0)).pow(2).mean(1)


def paper_direction_rf_loss(model, x0, eps, t):  # the paper's target X_1 - X_0 = x0 - eps, without flipping time
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    p = model(x_t, t)
    return ((p.eps - p.x0) - (x0 - eps)).pow(2).mean(1)


def right_pairs(flow, eps, steps):
    x = eps
    for i in range(steps):
        t = torch.full((len(x),), 1 - i / steps, dtype=x.dtype)
        p = flow(x, t)
        x = x - (p.eps - p.x0) / steps
    return eps, x


def forward_euler_pairs(flow, eps, steps):  # steps towards the noise (t increasing): the wrong direction
    x = eps
    for i in range(steps):
        t = torch.full((len(x),), 1 - i / steps, dtype=x.dtype)
        p = flow(x, t)
        x = x + (p.eps - p.x0) / steps
    return eps, x


def right_straightness(path, ts):
    from course_lib.metrics import straightness
    return straightness(path, ts)


def no_duration_straightness(path, ts):  # forgets to divide by the total duration (right only when it is 1)
    dt = ts[1:] - ts[:-1]
    v = (path[1:] - path[:-1]) / dt[:, None, None]
    line = (path[-1] - path[0]) / (ts[-1] - ts[0])
    return float(((v - line).pow(2).sum(2).mean(1) * dt.abs()).sum())


def test_straightness_checker_uses_grids_not_spanning_0_1(capsys):
    from course_lib.metrics import straightness

    assert checks.check_straightness(straightness, seed=0) is straightness
    assert checks.check_straightness(no_duration_straightness, seed=0) is not no_duration_straightness
    out = capsys.readouterr().out
    assert "differs from the reference" in out and "from t = 0.8 to 0.3" in out


def unweighted_straightness(path, ts):  # ignores uneven segment durations
    dt = ts[1:] - ts[:-1]
    v = (path[1:] - path[:-1]) / dt[:, None, None]
    line = (path[-1] - path[0]) / (ts[-1] - ts[0])
    return float((v - line).pow(2).sum(2).mean())


@pytest.mark.parametrize("check, right, wrong", [
    (checks.check_rf_loss, right_rf_loss, paper_direction_rf_loss),
    (checks.check_make_pairs, right_pairs, forward_euler_pairs),
    (checks.check_straightness, right_straightness, unweighted_straightness),
])
def test_reflow_checker_verdicts(check, right, wrong, capsys):
    assert_verdicts(check, right, wrong, capsys)


def reflow_round_with(independent=False, swapped=False, in_place=False):
    """The notebook's solution of 3.4 (one reflow round), or one with a planted mistake."""
    from course_lib.distill import reflow
    from course_lib.train import train

    def reflow_round(flow, eps, steps, cfg):
        e, x0 = right_pairs(flow, eps, steps)
        if independent:                      # fresh noise, independent of x0: the independent coupling (a new 1-RF)
            e = torch.randn(e.shape, generator=torch.Generator().manual_seed(123), dtype=e.dtype)
        if swapped:                          # the paper's direction: noise at t = 0, data at t = 1
            e, x0 = x0, e
        new = flow if in_place else reflow.as_flow(flow)
        new.train().requires_grad_(True)
        loss = lambda m, b, g: right_rf_loss(m, b[1], b[0], 1e-3 + (1 - 1e-3) * torch.rand(len(b[0]), generator=g))
        return train(new, loss, reflow.pair_batches(e, x0), cfg, progress=False).model.eval().requires_grad_(False)
    return reflow_round


right_reflow_round = reflow_round_with()


def test_reflow_round_checker_accepts_a_round_and_rejects_planted_mistakes(capsys):
    assert checks.check_reflow_round(right_reflow_round, seed=0) is right_reflow_round
    assert "Later cells use your function" in capsys.readouterr().out
    for wrong, says in ((reflow_round_with(independent=True), "did not straighten"),
                        (reflow_round_with(swapped=True), "did not straighten"),
                        (reflow_round_with(in_place=True), "changed the old flow's weights"),
                        (lambda flow, eps, steps, cfg: flow, "a new model"),
                        (unsolved, "not solved yet")):
        used = checks.check_reflow_round(wrong, seed=0)
        out = capsys.readouterr().out
        assert used is not wrong and checks.is_library(used), out
        assert says in out and "reference implementation" in out, out


def right_cond_reflow_loss(flow, eps, x0, cond, t, drop):
    from course_lib.conditioning import labels

    y_in = torch.where(drop, torch.full_like(cond.y, cond.null_y), cond.y)
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    p = flow(x_t, t, labels(y_in, cond.null_y))
    return ((p.eps - p.x0) - (eps - x0)).pow(2).mean(1)


def labels_kept_loss(flow, eps, x0, cond, t, drop):            # never drops a label
    return right_cond_reflow_loss(flow, eps, x0, cond, t, torch.zeros_like(drop))


def null_zero_loss(flow, eps, x0, cond, t, drop):              # "no label" written as class 0
    return right_cond_reflow_loss(flow, eps, x0, dataclasses.replace(cond, null_y=0), t, drop)


def pair_dropped_loss(flow, eps, x0, cond, t, drop):           # dropout on the pair, not on the label
    keep = (~drop).to(x0.dtype)[:, None]
    return right_cond_reflow_loss(flow, eps * keep, x0 * keep, cond, t, torch.zeros_like(drop))


def loss_dropped_loss(flow, eps, x0, cond, t, drop):           # drops the samples from the loss instead
    return right_cond_reflow_loss(flow, eps, x0, cond, t, torch.zeros_like(drop)) * (~drop).to(x0.dtype)


@pytest.mark.parametrize("wrong", [labels_kept_loss, null_zero_loss, pair_dropped_loss, loss_dropped_loss],
                         ids=["labels-kept", "null-is-0", "pair-dropped", "loss-dropped"])
def test_cond_reflow_loss_checker_rejects_planted_mistakes(wrong, capsys):
    assert checks.check_cond_reflow_loss(right_cond_reflow_loss, seed=0) is right_cond_reflow_loss
    assert "correct on" in capsys.readouterr().out
    used = checks.check_cond_reflow_loss(wrong, seed=0)
    out = capsys.readouterr().out
    assert used is not wrong and checks.is_library(used)
    assert "differs from the reference" in out and "labels dropped" in out, out


def test_cond_reflow_loss_checker_explains_a_negative_null_label(capsys):
    negative = lambda flow, eps, x0, cond, t, drop: right_cond_reflow_loss(flow, eps, x0,
                                                                          dataclasses.replace(cond, null_y=-1), t, drop)
    used = checks.check_cond_reflow_loss(negative, seed=0)
    assert checks.is_library(used) and "raised" in capsys.readouterr().out


# --- the registry and RNG hygiene (issue 9) ---------------------------------------------------------------------

def _library_solutions():
    """The library's own implementation of every exercise: a correct student."""
    from course_lib import samplers
    from course_lib import distances
    from course_lib.distill import add, consistency, dmd, guided, instaflow, lcm, pd, reflow, tcd
    from course_lib.metrics import straightness
    from course_lib.processes import RectifiedFlow
    from course_lib.samplers import ddim_step

    def guided_velocity(flow, x, t, cond, w):
        p = instaflow.guided(flow, w)(x, t, cond)
        return p.eps - p.x0

    return {
        "0.1": right_v, "0.2": ddim_step, "0.3": right_swd,
        "1.1": pd.pd_target, "1.2": pd.pd_loss_at,
        "1.3": lambda teacher, N, sample, cfg: pd.distill_round(teacher, N, sample, run=cfg, progress=False)[0],
        "2.1": guided.guided_target, "2.2": guided.guided_loss_at,
        "2.3": lambda teacher, sample, w_range, cfg, p_w_min=0.0: guided.distill_guidance(
            teacher, sample, guided.GuidedConfig(w_range, p_w_min=p_w_min), run=cfg, progress=False)[0],
        "2.4": guided.guided_batches,
        "3.1": lambda m, x0, eps, t: reflow.rf_loss_at(m, x0, eps, t),
        "3.2": lambda m, eps, steps: reflow.generate_pairs(m, eps, steps, "euler", RectifiedFlow()),
        "3.3": straightness,
        "3.4": right_reflow_round,
        "4.1": guided_velocity, "4.2": right_cond_reflow_loss,
        "4.3": lambda m, eps, x0, cond: instaflow.onestep_loss(m, eps, x0, cond),
        "4.4": distances.laplacian_pyramid_l1,
        "5.1": consistency.consistency_fn,
        "5.2": lambda s, tgt, te, x0, eps, tn, tc, p: consistency.cd_loss_at(s, tgt, te, x0, eps, tn, tc, p),
        "5.3": lambda m, x, ts, p, t_min, noises: consistency.multistep_sample(m, x, ts, p, t_min, noises=noises),
        "5.4": _nb05_ict_pieces(),
        "6.1": lcm.lcm_target, "6.2": lcm.multistep, "6.3": lcm.merge_lora,
        "7.1": tcd.tcf,
        "7.2": lambda s, tgt, te, x0, eps, tn, tc, u, p: tcd.tcd_loss_at(s, tgt, te, x0, eps, tn, tc, u * tc, p),
        "7.3": lambda m, x, ts, p, gamma, noises: samplers.tcd(m, x, ts, p, gamma=gamma, noises=noises),
        "8.1": lambda x_hat, T, t, eps, p, cond: add.distillation_loss(x_hat, T, t, eps, p, cond),
        "8.2": lambda D, x_real, x_fake, gamma: add.discriminator_loss(D, x_real, x_fake, gamma),
        "8.3": lambda m, z, k, p, noises, cond=None: add.sample(m, z, k, p, noises=noises, cond=cond),
        "9.1": lambda x, real, fake, p, t, eps, normalize: dmd.dm_loss(x, real, fake, p, t, eps, normalize=normalize),
        "9.2": lambda fake, x, t, eps: dmd.fake_score_loss(fake, x, t, eps),
        "9.3": lambda G, z, i, times, p, generator: dmd.backward_simulate(G, z, i, times, p, generator),
        **_nb10_solutions(),
        **_nb13_solutions(),
        **_nb14_solutions(),
        **_nb11_solutions(),
        "12.1": _nb12_solution(),
    }


def _nb05_ict_pieces():
    from course_lib.checks.nb05 import ict_pieces_ref

    return ict_pieces_ref


def _nb10_solutions():
    from course_lib.checks.nb10 import gdd_losses_ref
    from course_lib.distill import gdd

    return {"10.1": gdd_losses_ref, "10.2": lambda G: gdd.apply_freeze(G, "gdd-i"), "10.3": gdd.time_share}


def _nb11_solutions():
    from course_lib.checks import nb11

    return {"11.1": nb11.segment_start_ref, "11.2": nb11.tscd_loss_ref, "11.3": nb11.refl_loss_ref,
            "11.4": nb11.unified_sample_ref}


# checkers whose notebook comes in a later round (none now: solutions/11_hyper_sd.ipynb holds 11.1-11.4)
NOTEBOOK_PENDING: set[str] = set()


def _nb12_solution():
    from course_lib.metrics import pareto_front

    return pareto_front


def _nb13_solutions():
    from course_lib.checks.nb13 import to_latents_ref

    return {"13.1": to_latents_ref}


def _nb14_solutions():
    from course_lib.checks.nb14 import meanflow_target_ref, scm_tangent_ref, shortcut_target_ref

    return {"14.1": meanflow_target_ref, "14.2": shortcut_target_ref, "14.3": scm_tangent_ref}


def test_every_checker_is_registered_under_its_exercise():
    for exercise, check in checks.CHECKERS.items():
        assert check.exercise == exercise and getattr(checks, check.__name__) is check
        assert f"Exercise {exercise}:" in check.__doc__
    assert set(_library_solutions()) == set(checks.CHECKERS)


@pytest.mark.parametrize("exercise", sorted(_library_solutions()))
def test_checkers_leave_the_global_rng_alone(exercise, capsys):
    # a checker cell must not change the notebook's later random draws: its cases come from its own generator
    # (fresh OS entropy when no seed is given) and networks are initialised inside config.seeded
    solution = _library_solutions()[exercise]
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    assert checks.CHECKERS[exercise](solution) is solution
    assert torch.equal(torch.get_rng_state(), before)
    assert "correct" in capsys.readouterr().out


def test_every_solution_marker_has_a_checker_and_every_checker_an_exercise():
    from pathlib import Path

    from course_lib import exercises

    found: dict[str, str] = {}      # exercise id -> notebook
    for path in exercises.solution_paths(Path(__file__).resolve().parents[1] / "solutions"):
        for ex in exercises.student_version(exercises.read_notebook(path), path.name)[1]:
            found[ex.number] = path.name
    assert len(found) >= 15
    missing = sorted(set(found) - set(checks.CHECKERS))
    assert not missing, f"# BEGIN SOLUTION without a registered checker: {[(n, found[n]) for n in missing]}"
    orphans = sorted(set(checks.CHECKERS) - set(found) - (NOTEBOOK_PENDING - set(found)))
    assert not orphans, f"checkers registered for exercises no solution notebook has: {orphans}"
    for number, notebook in found.items():      # exercise n.m is checked by checks/nb0n.py, for notebook 0n_*
        chapter = int(number.split(".")[0])
        assert notebook.startswith(f"{chapter:02d}_")
        assert checks.CHECKERS[number].__module__ == f"course_lib.checks.nb{chapter:02d}"


# --- shared behaviour of run_check and the verdicts (issue 11) ---------------------------------------------------

def test_reference_runs_first_on_cloned_inputs():
    calls = []

    def reference(x, t):
        calls.append(("reference", x, t))
        return x * t[:, None]

    def student(x, t):
        calls.append(("student", x, t))
        return x * t[:, None]

    x, t = torch.ones(3, 2), torch.full((3,), 0.5)
    assert checks.run_check("9.9", student, reference, [((x, t), "here")]) is student
    (who_r, x_r, t_r), (who_s, x_s, t_s) = calls
    assert (who_r, who_s) == ("reference", "student")
    assert x_s is x and t_s is t and x_r is not x and t_r is not t and torch.equal(x_r, x)


def test_a_student_that_changes_its_inputs_cannot_corrupt_the_reference(capsys):
    def labels_nulled_in_place(flow, x, t, cond, w):   # right value, but the caller's labels are lost
        c = flow(x, t, cond)
        cond.y[:] = cond.null_y
        uncond = flow(x, t, cond)
        return (1 + w) * (c.eps - c.x0) - w * (uncond.eps - uncond.x0)

    def pairs_in_place(flow, eps, steps):                       # x = eps aliases the noise, then x += ... moves it
        x = eps
        for i in range(steps):
            t = torch.full((len(x),), 1 - i / steps, dtype=x.dtype)
            p = flow(x, t)
            x -= (p.eps - p.x0) / steps
        return eps, x

    for check, student, arg in ((checks.check_guided_velocity, labels_nulled_in_place, "cond"),
                                (checks.check_make_pairs, pairs_in_place, "eps")):
        used = check(student, seed=0)
        out = capsys.readouterr().out
        assert used is not student and checks.is_library(used)
        # the verdict names the mutation: the reference, computed first on clones, agreed with the value
        assert f"changed its input {arg} in place" in out and "differs" not in out, out


@pytest.mark.parametrize("error, advice", [
    (ValueError("optimizer got an empty parameter list"), "call .requires_grad_(True) on your copy"),
    (ValueError("network 'model' has no parameter with requires_grad; pass it as frozen= instead"),
     "call .requires_grad_(True) on your copy"),
    (RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn"), "requires_grad_(True)"),
    (RuntimeError("The size of tensor a (5) must match the size of tensor b (2) at non-singleton dimension 1"),
     "processes.bcast(t, x)"),
    (NotImplementedError("Exercise 1.1: the target"), "not solved yet"),
])
def test_raw_errors_are_translated_into_advice(error, advice):
    assert advice in checks.explain_exception(error, "for N = 2")


def test_checkers_give_advice_for_a_frozen_copy_and_a_missing_broadcast(capsys):
    frozen_copy_round = pd_round_with(unfreeze=False)   # deepcopy of a loaded teacher: no parameter trains

    assert checks.check_pd_round(frozen_copy_round, seed=0) is not frozen_copy_round
    out = capsys.readouterr().out
    assert "the model's parameters are frozen" in out.lower() and ".requires_grad_(True) on your copy" in out

    def no_broadcast(v, x, t, process):                 # alpha(t) is (B,), x is (B, D)
        a, s = process.alpha(t), process.sigma(t)
        return Pred((a * x - s * v) / (a * a + s * s), (s * x + a * v) / (a * a + s * s))

    assert checks.check_v_to_pred(no_broadcast, seed=0) is not no_broadcast
    out = capsys.readouterr().out
    assert "must match the size of tensor b" in out and "use processes.bcast(t, x)" in out


@pytest.mark.parametrize("check, right, wrong", [
    (checks.check_ddim_step, right_ddim, wrong_ddim),
    (checks.check_sliced_wasserstein, right_swd, unsorted_swd),     # a wrapped scalar checker
    (checks.check_straightness, right_straightness, no_duration_straightness),
])
def test_a_fallback_is_marked_as_the_library_version(check, right, wrong, capsys):
    assert check(right, seed=0) is right and not checks.is_library(right) and checks.library_note(right) == ""
    for bad in (wrong, unsolved):
        used = check(bad, seed=0)
        assert checks.is_library(used) and checks.library_note(used) == "(library's version in use)"
    capsys.readouterr()
    # checking the library's version again (the checker cell re-run alone) keeps it, marked, and says so
    assert check(used, seed=0) is used
    assert "already the library's version" in capsys.readouterr().out


def test_the_marked_fallback_computes_the_reference_and_leaves_the_library_unmarked(capsys):
    from course_lib.processes import VPCosine
    from course_lib.samplers import ddim_step

    used = checks.check_ddim_step(wrong_ddim, seed=0)
    assert used.__wrapped__ is ddim_step and not checks.is_library(ddim_step)
    assert checks.check_ddim_step(ddim_step, seed=0) is ddim_step       # the library's own function still passes
    capsys.readouterr()
    pred = Pred(torch.randn(3, 2), torch.randn(3, 2))
    t, s = torch.full((3,), 0.7), torch.full((3,), 0.3)
    assert torch.equal(used(pred, t, s, VPCosine()), ddim_step(pred, t, s, VPCosine()))


# --- notebook 05: consistency models (planted mistakes: no stop-gradient, a broken boundary condition, re-noising
# with the wrong scale) ----------------------------------------------------------------------------------------

def right_cd_loss(student, target, teacher, x0, eps, t_next, t_cur, process):
    from course_lib.distill.consistency import cd_loss_at

    return cd_loss_at(student, target, teacher, x0, eps, t_next, t_cur, process, solver="heun")


def no_stopgrad_cd_loss(student, target, teacher, x0, eps, t_next, t_cur, process):
    from course_lib import steps

    x_next = process.marginal(x0, t_next, eps)
    x_cur = steps.heun(teacher, x_next, t_next, t_cur, process)
    return (student(x_next, t_next).x0 - target(x_cur, t_cur).x0).pow(2).mean(1)    # gradient flows into the target


def ddim_cd_loss(student, target, teacher, x0, eps, t_next, t_cur, process):     # the wrong teacher step
    from course_lib.distill.consistency import cd_loss_at

    return cd_loss_at(student, target, teacher, x0, eps, t_next, t_cur, process, solver="ddim")


def edm_boundary_fn(model, x, t, t_min, sigma_data):   # EDM's denoiser scalings: f(x, t_min) != x
    sig = model.process.sigma(t)[:, None]
    c_skip = sigma_data**2 / (sig**2 + sigma_data**2)
    c_out = sig * sigma_data / torch.sqrt(sig**2 + sigma_data**2)
    return c_skip * x + c_out * model(x, t).x0


def right_multistep(model, x, ts, process, t_min, noises):
    from course_lib.distill.consistency import multistep_sample

    return multistep_sample(model, x, ts, process, t_min, noises=noises)


def ve_renoise_multistep(model, x, ts, process, t_min, noises):   # x0 + sigma z: right only where alpha = 1 (edm)
    t = lambda v: torch.full((len(x),), float(v), dtype=x.dtype)
    x0 = model(x, t(ts[0])).x0
    for k, tau in enumerate(ts[1:]):
        x0 = model(x0 + process.sigma(t(tau))[:, None] * noises[k], t(tau)).x0
    return x0


def test_consistency_fn_checker_rejects_a_boundary_condition_that_does_not_hold(capsys):
    from course_lib.distill.consistency import consistency_fn

    assert checks.check_consistency_fn(consistency_fn, seed=0) is consistency_fn
    assert "correct on" in capsys.readouterr().out
    used = checks.check_consistency_fn(edm_boundary_fn, seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and "boundary condition does not hold" in out and "s(t_min)" in out
    assert out.count("Exercise 5.1") == 1                                   # one verdict
    assert checks.check_consistency_fn(unsolved, seed=0) is not unsolved
    assert "not solved yet" in capsys.readouterr().out


def vp_sigma_consistency_fn(model, x, t, t_min, sigma_data):   # the first edition: the VP sigma(t) <= 1 on x0_hat
    from course_lib.checks.nb05 import _vp_sigma_fn

    return _vp_sigma_fn(model, x, t, t_min, sigma_data)


def test_consistency_fn_checker_rejects_the_vp_sigma_and_a_placeholder_without_the_recipe(capsys):
    used = checks.check_consistency_fn(vp_sigma_consistency_fn, seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and "VP sigma" in out and "s = sigma(t) / alpha(t)" in out
    used = checks.check_consistency_fn(lambda model, x, t, t_min, sd: torch.zeros_like(x), seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and "all zeros" in out and "c_out^EDM" not in out   # what, not how
    # float32 answers are cast, not a crash
    from course_lib.distill.consistency import consistency_fn

    used = checks.check_consistency_fn(lambda *a: consistency_fn(*a).float(), seed=0)
    assert "Exercise 5.1" in capsys.readouterr().out


def test_cd_loss_checker_casts_float32_and_names_a_placeholder(capsys):
    def float32_loss(*args):
        return right_cd_loss(*args).float()

    assert checks.check_cd_loss(float32_loss, seed=0) is float32_loss      # float32 within float32's tolerance
    assert "correct" in capsys.readouterr().out
    used = checks.check_cd_loss(lambda s, tgt, te, x0, *a: torch.zeros(len(x0)), seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and "all zeros" in out and "gradient" in out and "Heun" not in out
    assert out.count("Exercise 5.2") == 1


def test_multistep_checker_names_a_placeholder_without_the_recipe(capsys):
    used = checks.check_multistep(lambda m, x, *a: torch.zeros_like(x), seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and "all zeros" in out and "alpha_tau" not in out


def _ict_variant(N=None, p=None, c=None):
    """iCT's pieces with one of them replaced by a plausible mistake."""
    from course_lib.checks.nb05 import ict_pieces_ref

    def pieces(k, K, process, t_min, d, s0=10, s1=1280):
        n, q, cc = ict_pieces_ref(k, K, process, t_min, d, s0, s1)
        return (N(k, K, s0, s1) if N else n), (p(n, q, process, t_min) if p else q), (c(d) if c else cc)
    return pieces


def _n_no_stages_floor(k, K, s0, s1):          # K' = K / log2(s1 / s0): one stage too few
    import math
    return min(s0 * 2 ** (k // max(1, K // int(math.log2(s1 // s0)))), s1) + 1


def _vp_sigma_probs(N, q, process, t_min):
    from course_lib.checks.nb05 import _vp_lognormal
    from course_lib.distill.consistency import cm_grid
    return _vp_lognormal(cm_grid(N, process, t_min), process)


@pytest.mark.parametrize("mistake, words", [
    (_ict_variant(c=lambda d: 0.00054), "sqrt(d)"),
    (_ict_variant(c=lambda d: 0.00054 * d), "0.00054 sqrt(d)"),
    (_ict_variant(p=lambda N, q, proc, tm: torch.full_like(q, 1 / len(q))), "uniform"),
    (_ict_variant(p=_vp_sigma_probs), "VP sigma"),
    (_ict_variant(p=lambda N, q, proc, tm: torch.cat([q, q.new_zeros(1)])), "one probability per interval"),
    (_ict_variant(N=_n_no_stages_floor), "doubles in equal stages"),
    (_ict_variant(N=lambda k, K, s0, s1: min(s0 * 2 ** (k // max(1, K // 8)), s1)), "points, not intervals"),
    (lambda *a: (0, torch.zeros(3), 0.0), "at least 2"),
])
def test_ict_pieces_checker_rejects_plausible_mistakes(mistake, words, capsys):
    from course_lib.checks.nb05 import ict_pieces_ref

    assert checks.check_ict_pieces(ict_pieces_ref, seed=0) is ict_pieces_ref
    assert "correct on" in capsys.readouterr().out
    used = checks.check_ict_pieces(mistake, seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and words in out and out.count("Exercise 5.4") == 1


def test_cd_loss_checker_rejects_a_target_without_stop_gradient_and_the_wrong_step(capsys):
    assert checks.check_cd_loss(right_cd_loss, seed=0) is right_cd_loss
    assert "correct" in capsys.readouterr().out
    used = checks.check_cd_loss(no_stopgrad_cd_loss, seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and "gradient flows through the target" in out and "torch.no_grad()" in out
    used = checks.check_cd_loss(ddim_cd_loss, seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and "differs from the reference" in out and "Heun" in out
    assert checks.is_library(checks.check_cd_loss(unsolved, seed=0))
    assert "not solved yet" in capsys.readouterr().out


def test_multistep_checker_rejects_renoising_with_the_wrong_scale(capsys):
    assert_verdicts(checks.check_multistep, right_multistep, ve_renoise_multistep, capsys)
    checks.check_multistep(ve_renoise_multistep, seed=0)
    assert "alpha_tau" in capsys.readouterr().out


# --- notebook 06: planted mistakes in the LCM exercises ---------------------------------------------------------

def _lcm_target_variant(mistake):
    from course_lib import guidance, steps
    from course_lib.predictions import Pred

    def target_fn(teacher, target, z, taus, k, cond, w, process):
        skip = 1 if mistake == "step of 1" else k
        prev = taus - skip if mistake == "no clamp" else (taus - skip).clamp_min(0)
        t_next, t_cur = process.t_of_timestep(taus).float(), process.t_of_timestep(prev).float()
        ctx = torch.enable_grad() if mistake == "with grad" else torch.no_grad()
        with ctx:
            if mistake == "guidance_scale as w":          # diffusers' u + s (c - u) with s = w: the course's w - 1
                c, u = teacher(z, t_next, cond), teacher(z, t_next, cond.null())
                ww = w[:, None, None, None]
                pred = Pred(u.x0 + ww * (c.x0 - u.x0), u.eps + ww * (c.eps - u.eps))
            elif mistake == "x0 only":                       # guides x0 but steps with the conditional eps
                g = guidance.cfg(teacher, w)(z, t_next, cond)
                pred = Pred(g.x0, teacher(z, t_next, cond).eps)
            else:
                pred = guidance.cfg(teacher, w)(z, t_next, cond)
            z_cur = steps.ddim_step(pred, t_next, t_cur, process)
            net = teacher if mistake == "teacher as target" else target
            return net(z_cur, t_cur, cond.with_w(w)).x0 if net is target else net(z_cur, t_cur, cond).x0
    return target_fn


@pytest.mark.parametrize("mistake", ["guidance_scale as w", "step of 1", "no clamp", "x0 only", "teacher as target"])
def test_lcm_target_checker_rejects_planted_mistakes(mistake, capsys):
    right = _lcm_target_variant("right")
    assert checks.check_lcm_target(right, seed=0) is right
    assert "correct on" in capsys.readouterr().out
    out = checks.check_lcm_target(_lcm_target_variant(mistake), seed=0)
    assert checks.is_library(out) and "differs from the reference" in capsys.readouterr().out


def test_lcm_target_checker_rejects_a_target_with_gradients(capsys):
    out = checks.check_lcm_target(_lcm_target_variant("with grad"), seed=0)
    printed = capsys.readouterr().out
    assert checks.is_library(out) and "carries gradients" in printed
    assert "correct" not in printed and printed.count("library") <= 1, printed      # one verdict


def test_nb06_checkers_name_a_zeros_placeholder_without_the_recipe(capsys):
    zeros_target = lambda teacher, target, z, taus, k, cond, w, process: torch.zeros_like(z)
    assert checks.is_library(checks.check_lcm_target(zeros_target, seed=0))
    out = capsys.readouterr().out
    assert "all zeros" in out and "guidance.cfg" not in out, out
    zeros_sampler = lambda f, z, taus, process, generator, cond=None: torch.zeros_like(z)
    assert checks.is_library(checks.check_lcm_multistep(zeros_sampler, seed=0))
    out = capsys.readouterr().out
    assert "all zeros" in out and "re-noise" not in out, out
    assert checks.is_library(checks.check_lora_merge(lambda W, loras: torch.zeros_like(W), seed=0))
    out = capsys.readouterr().out
    assert "all zeros" in out and "B_i @ A_i" not in out, out


def _multistep(mistake):
    def fn(f, z, taus, process, generator, cond=None):
        ts = process.t_of_timestep(taus.double())
        for i in range(len(ts)):
            t = ts[i].float().expand(len(z))
            z0 = f(z, t, None if mistake == "cond not passed" else cond).x0
            last = i == len(ts) - 1
            if last and mistake != "noise on the last step":
                return z0
            s = (ts[i] if mistake == "current time" else ts[min(i + 1, len(ts) - 1)]).reshape(1)
            eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
            a = torch.ones(1) if mistake == "sigma only" else process.alpha(s).float()
            z = a * z0 + process.sigma(s).float() * eps
            if last:
                return z
        return z
    return fn


@pytest.mark.parametrize("mistake", ["sigma only", "current time", "noise on the last step", "cond not passed"])
def test_lcm_multistep_checker_rejects_planted_mistakes(mistake, capsys):
    right = _multistep("right")
    assert checks.check_lcm_multistep(right, seed=0) is right
    capsys.readouterr()
    out = checks.check_lcm_multistep(_multistep(mistake), seed=0)
    assert checks.is_library(out) and "differs from the reference" in capsys.readouterr().out


def test_lcm_multistep_checker_takes_float64_times(capsys):
    # a sampler that passes float64 times to f must not crash the checker's own stand-in model
    def fn(f, z, taus, process, generator, cond=None):
        ts = process.t_of_timestep(taus.double())
        for i in range(len(ts)):
            z0 = f(z, ts[i].expand(len(z)), cond).x0.to(z.dtype)
            if i == len(ts) - 1:
                return z0
            s = ts[i + 1].reshape(1)
            eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
            z = (process.alpha(s) * z0 + process.sigma(s) * eps).to(z.dtype)
    assert checks.check_lcm_multistep(fn, seed=0) is fn, capsys.readouterr().out


def _lora_merge(mistake):
    def fn(W, loras):
        out = torch.zeros_like(W) if mistake == "no base" else (W if mistake == "in place" else W.clone())
        out = out / len(loras) if mistake == "split base" else out
        for i, (lam, s, A, B) in enumerate(loras):
            lam = loras[0][0] if mistake == "first lambda" else lam
            s = 1.0 if mistake == "no scaling" else s
            delta = lam * s * (B @ A)
            if mistake == "in place":
                out += delta
            else:
                out = out + delta
        return out.float() if mistake == "float32 answer" else out
    return fn


def test_lora_merge_checker_accepts_a_float32_answer(capsys):
    # float32 from float64 inputs is within float32's precision: the checker compares at the answer's dtype
    fn = _lora_merge("float32 answer")
    assert checks.check_lora_merge(fn, seed=0) is fn, capsys.readouterr().out


# --- notebook 07: planted mistakes in the TCD exercises ---------------------------------------------------------

def _tcf(mistake):
    def fn(model, x, t, s, process):
        end = torch.zeros_like(s) if mistake == "jump to 0" else s
        x0 = model(x, t).x0
        a_s, s_s = process.alpha(end)[:, None], process.sigma(end)[:, None]
        a_t, s_t = process.alpha(t)[:, None], process.sigma(t)[:, None]
        if mistake == "swapped ratio":                       # sigma_t / sigma_s instead of sigma_s / sigma_t
            return (s_t / s_s.clamp_min(1e-12)) * x + (a_s - s_s * a_t / s_t) * x0
        return a_s * x0 + s_s * (x - a_t * x0) / s_t
    return fn


@pytest.mark.parametrize("mistake", ["jump to 0", "swapped ratio"])
def test_tcf_checker_rejects_planted_mistakes(mistake, capsys):
    right = _tcf("right")
    assert checks.check_tcf(right, seed=0) is right
    assert "correct on" in capsys.readouterr().out
    used = checks.check_tcf(_tcf(mistake), seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used)
    assert ("jump to t = 0" in out) if mistake == "jump to 0" else ("differs from the reference" in out)
    assert checks.is_library(checks.check_tcf(unsolved, seed=0)) and "not solved yet" in capsys.readouterr().out


def _tcd_loss(mistake):
    from course_lib import steps
    from course_lib.distill.tcd import tcf

    def fn(student, target, teacher, x0, eps, t_next, t_cur, u, process):
        s = u * (t_next if mistake == "s above t_n" else t_cur) * (mistake != "jump to 0")
        x_next = process.marginal(x0, t_next, eps)
        ctx = torch.enable_grad() if mistake == "no stopgrad" else torch.no_grad()
        with ctx:
            x_cur = steps.ddim(teacher, x_next, t_next, t_cur, process)
            net = student if mistake == "online as target" else target
            f_tgt = tcf(net, x_cur, t_cur, s, process)
        return (tcf(student, x_next, t_next, s, process) - f_tgt).pow(2).mean(1)
    return fn


PLANTED_6_3_AND_7_2 = [   # (checker, variant factory, mistake, what the verdict must say)
    (checks.check_lora_merge, _lora_merge, "no base", "missing the base weight"),
    (checks.check_lora_merge, _lora_merge, "no scaling", "alpha / r"),
    (checks.check_lora_merge, _lora_merge, "first lambda", "its own lambda_i"),
    (checks.check_lora_merge, _lora_merge, "split base", "W appears once"),
    (checks.check_lora_merge, _lora_merge, "in place", "in place"),
    (checks.check_tcd_loss, _tcd_loss, "s above t_n", "above t_n"),
    (checks.check_tcd_loss, _tcd_loss, "online as target", "online student"),
    (checks.check_tcd_loss, _tcd_loss, "jump to 0", "both sides jump to t = 0"),
    (checks.check_tcd_loss, _tcd_loss, "no stopgrad", "gradient flows through the target"),
]


@pytest.mark.parametrize("check, variant, mistake, says", PLANTED_6_3_AND_7_2,
                         ids=[f"{c.exercise}-{m.replace(' ', '-')}" for c, _, m, _ in PLANTED_6_3_AND_7_2])
def test_lora_merge_and_tcd_loss_checkers_reject_planted_mistakes(check, variant, mistake, says, capsys):
    rejects_planted_mistake(check, variant, mistake, says, capsys)


def rejects_planted_mistake(check, variant, mistake, says, capsys):
    """The right variant passes with "correct"; the planted one falls back to the library with one verdict that
    says `says`; an unsolved exercise falls back with "not solved yet"."""
    right = variant("right")
    assert check(right, seed=0) is right
    assert "correct" in capsys.readouterr().out
    used = check(variant(mistake), seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and says in out and out.count(f"Exercise {check.exercise}:") == 1, out
    assert checks.is_library(check(unsolved, seed=0)) and "not solved yet" in capsys.readouterr().out


def _gamma_sampler(mistake):
    from course_lib import steps
    from course_lib.samplers import renoise

    def fn(model, x, ts, process, gamma, noises):
        if not 0 <= gamma <= 1 and mistake != "no range check":
            raise ValueError("gamma must be in [0, 1]")
        n = len(ts) - 1
        for i in range(n):
            tdt = torch.float32 if mistake == "float32 times" else x.dtype     # a correct sampler, coarser times
            t = torch.full((len(x),), float(ts[i]), dtype=tdt)
            s = torch.full((len(x),), float(ts[i + 1]), dtype=tdt)
            s_mid = (gamma if mistake == "gamma reversed" else 1 - gamma) * s
            x = steps.ddim(model, x, t, s_mid, process)
            if gamma > 0 and i < n - 1:
                if mistake == "sigma only":                   # x_s' + sigma_s z: the wrong scale
                    x = x + process.sigma(s)[:, None] * noises[i]
                else:
                    x = renoise(x, s_mid, s, process, noises[i])
        return x
    return fn


@pytest.mark.parametrize("mistake,says", [("gamma reversed", "wrong way round"), ("sigma only", "differs from"),
                                          ("no range check", "without complaint")])
def test_gamma_sampler_checker_rejects_planted_mistakes(mistake, says, capsys):
    right = _gamma_sampler("right")
    assert checks.check_gamma_sampler(right, seed=0) is right
    assert "correct on" in capsys.readouterr().out
    used = checks.check_gamma_sampler(_gamma_sampler(mistake), seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and says in out, out
    assert "correct" not in out, out                                   # one verdict: every test runs first


def test_gamma_sampler_checker_accepts_times_built_in_float32(capsys):
    fn = _gamma_sampler("float32 times")
    assert checks.check_gamma_sampler(fn, seed=0) is fn, capsys.readouterr().out


def test_nb07_checkers_name_a_zeros_placeholder_without_the_recipe(capsys):
    assert checks.is_library(checks.check_tcf(lambda model, x, t, s, process: torch.zeros_like(x), seed=0))
    out = capsys.readouterr().out
    assert "all zeros" in out and "lambda_s" not in out, out
    zeros_loss = lambda student, target, teacher, x0, eps, t_next, t_cur, u, process: torch.zeros_like(u)
    assert checks.is_library(checks.check_tcd_loss(zeros_loss, seed=0))
    out = capsys.readouterr().out
    assert "all zeros" in out and "steps.ddim" not in out, out
    zeros_sampler = lambda model, x, ts, process, gamma, noises: torch.zeros_like(x)
    assert checks.is_library(checks.check_gamma_sampler(zeros_sampler, seed=0))
    out = capsys.readouterr().out
    assert "all zeros" in out and "renoise" not in out, out


# --- notebook 13: images to SD latents (exercise 13.1) -------------------------------------------------------------

def test_to_latents_checker_accepts_the_reference_and_float64_answers(capsys):
    from course_lib.checks.nb13 import check_to_latents, to_latents_ref

    assert check_to_latents(to_latents_ref, seed=0) is to_latents_ref
    as64 = lambda vae, x: to_latents_ref(vae, x).double()
    assert check_to_latents(as64, seed=0) is as64
    assert capsys.readouterr().out.count("Later cells use your function") == 2


@pytest.mark.parametrize("wrong, words", [
    (lambda vae, x: vae.encode(x).latent_dist.mean * vae.config.scaling_factor, ["[-1, 1]"]),
    (lambda vae, x: vae.encode(2 * x - 1).latent_dist.mean, ["unscaled", "scaling_factor"]),
    (lambda vae, x: vae.encode(2 * x - 1).latent_dist.mean / vae.config.scaling_factor, ["MULTIPLIES"]),
    (lambda vae, x: vae.encode(2 * x - 1).latent_dist.sample() * vae.config.scaling_factor, ["latent_dist.mean"]),
    (lambda vae, x: torch.zeros(len(x), 4, 4, 4), ["all zero"]),
    (lambda vae, x: vae.encode(2 * x - 1).latent_dist.mean[:, :2], ["shape"]),
    (lambda vae, x: 2 * x - 1, ["shape"]),
])
def test_to_latents_checker_names_each_slip(wrong, words, capsys):
    from course_lib.checks.nb13 import check_to_latents

    used = check_to_latents(wrong, seed=0)
    text = capsys.readouterr().out
    assert checks.is_library(used) and text.count("Exercise 13.1:") == 1, text
    assert all(w in text for w in words), text
    # a zeros placeholder is told what is wrong, not the recipe
    if "all zero" in words:
        assert "scaling_factor" not in text and "2 x - 1" not in text


# --- every checker of notebooks 05-10 and 13 (issue 24): one verdict on a right answer, float32 and float64 answers
# taken, a placeholder of zeros told what is wrong (checks.core.first_look) without the recipe, plausible mistakes

LATER_EXERCISES = sorted((e for e in _library_solutions() if int(e.split(".")[0]) >= 5),
                         key=lambda e: tuple(int(n) for n in e.split(".")))


def _answer_map(fn, change):
    """fn with `change` applied to every tensor it returns (also inside a tuple)."""
    def apply(out):
        if isinstance(out, torch.Tensor):
            return change(out)
        return tuple(apply(o) for o in out) if isinstance(out, tuple) else out
    return lambda *a, **k: apply(fn(*a, **k))


@pytest.mark.parametrize("exercise", LATER_EXERCISES)
def test_later_checkers_give_one_verdict_on_right_float32_and_float64_answers(exercise, capsys):
    check, right = checks.CHECKERS[exercise], _library_solutions()[exercise]
    for dtype in (None, torch.float32, torch.float64):
        answer = right if dtype is None else _answer_map(right, lambda v: v.to(dtype) if v.is_floating_point() else v)
        assert check(answer, seed=0) is answer, capsys.readouterr().out
        out = capsys.readouterr().out
        assert out.count(f"Exercise {exercise}:") == 1 and "Later cells use your function" in out, out


# words of each checker's recipe (its hint after a wrong value) that a placeholder must not hear
RECIPE_WORDS = {"5.1": "c_out^EDM", "5.2": "Heun", "5.3": "alpha_tau", "6.1": "guidance.cfg", "6.2": "re-noise",
                "6.3": "B_i @ A_i", "7.1": "lambda_s", "7.2": "steps.ddim", "7.3": "renoise", "8.1": "marginal",
                "8.2": "relu(1 -", "8.3": "alpha_{t_{i+1}}", "9.1": "no_grad", "9.2": "from_pred",
                "9.3": "process.marginal", "10.1": "softplus(-D", "10.3": "unbiased", "13.1": "scaling_factor"}


@pytest.mark.parametrize("exercise", sorted(RECIPE_WORDS))
def test_a_zeros_placeholder_hears_what_is_wrong_not_the_recipe(exercise, capsys):
    zeros = _answer_map(_library_solutions()[exercise], lambda v: torch.zeros_like(v).detach())
    used = checks.CHECKERS[exercise](zeros, seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and out.count(f"Exercise {exercise}:") == 1, out
    assert "returns all zeros" in out and "is it still the placeholder?" in out, out
    assert RECIPE_WORDS[exercise] not in out, out


def test_placeholders_of_the_exercises_without_a_tensor_answer_hear_what_is_wrong(capsys):
    # 5.4 returns (N, p, c) and 10.2 a fraction after freezing G in place: their zeros are named in their own words
    assert checks.is_library(checks.check_ict_pieces(lambda *a: (0, torch.zeros(1), 0.0), seed=0))
    out = capsys.readouterr().out
    assert "at least 2" in out and "erf" not in out and out.count("Exercise 5.4:") == 1, out
    assert checks.is_library(checks.check_freeze_rule(lambda G: 0.0, seed=0))
    out = capsys.readouterr().out
    assert "still frozen" in out and "time_emb_proj" not in out and out.count("Exercise 10.2:") == 1, out


def _planted_later_mistakes():
    """(exercise, a plausible mistake, words its verdict must say) for the named slips of 8.2, 9.2, 9.3 and 10.1
    that the tests beside those modules' own (test_add, test_dmd, test_gdd) do not plant."""
    import torch.nn.functional as F

    from course_lib.checks.nb09 import _simulate_variant
    from course_lib.checks.nb10 import _r1, gdd_losses_ref
    from course_lib.distill import dmd, gan

    def hinge(D, x_real, x_fake, gamma, r1_factor):
        fake = x_fake.detach()
        r1 = gan.r1_penalty(D, x_real) if r1_factor else 0.0
        return torch.relu(1 - D(x_real)) + torch.relu(1 + D(fake)) + r1_factor * gamma * r1

    def sim(**kw):
        return lambda G, z, i, times, p, generator: _simulate_variant(G, z, i, times, p, generator, **kw)

    def rounds(shift):
        return lambda G, z, i, times, p, gen: _simulate_variant(G, z, i, times, p, gen, rounds=max(i + shift, 0))

    def fake_no_grad(fake, x, t, eps):
        with torch.no_grad():
            return dmd.fake_score_loss(fake, x, t, eps)

    return [
        ("8.2", lambda D, r, f, g: hinge(D, r, f, g, 1.0), "factor 1/2"),
        ("8.2", lambda D, r, f, g: hinge(D, r, f, g, 0.0), "no R1 penalty"),
        ("9.2", fake_no_grad, "gradients on"),
        ("9.3", rounds(-1), "one round too few"),
        ("9.3", rounds(+1), "one round too many"),
        ("9.3", sim(renoise_at=0), "NEXT time"),
        ("10.1", lambda D, xr, xf, w: (-F.softplus(D(xf)), gdd_losses_ref(D, xr, xf, w)[1]), "SATURATING"),
        ("10.1", lambda D, xr, xf, w: (gdd_losses_ref(D, xr, xf, w)[0],
                                       F.softplus(-D(xf.detach())) + F.softplus(D(xr)) + w * _r1(D, xr)),
         "signs swapped"),
        ("10.1", lambda D, xr, xf, w: (-D(xf), F.relu(1 + D(xf.detach())) + F.relu(1 - D(xr)) + w * _r1(D, xr)),
         "hinge losses"),
    ]


@pytest.mark.parametrize("case", range(len(_planted_later_mistakes())))
def test_later_checkers_name_the_plausible_mistakes_planted_nowhere_else(case, capsys):
    exercise, wrong, says = _planted_later_mistakes()[case]
    used = checks.CHECKERS[exercise](wrong, seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and says in out and out.count(f"Exercise {exercise}:") == 1, out


# --- notebook 14 (flow maps): MeanFlow's target, the shortcut target, sCM's tangent (issue 26) -------------------

def _nb14_mistakes():
    """(exercise, a plausible mistake, words its verdict must say)."""
    from course_lib import steps
    from course_lib.checks import nb14
    from course_lib.conditioning import Cond
    from course_lib.distill import flowmap as fm

    def mf(**kw):
        return lambda m, z, t, r, v: (fm.average_velocity(m, z, t, r), nb14._meanflow_variant(m, z, t, r, v, **kw))

    def mf_no_stop_gradient(m, z, t, r, v):
        u, dudt = torch.func.jvp(lambda z_, r_, t_: fm.average_velocity(m, z_, t_, r_), (z, r, t),
                                 (v, torch.zeros_like(r), torch.ones_like(t)))
        return u, v - (t - r)[:, None] * dudt

    def mf_detached_u(m, z, t, r, v):
        u, tgt = fm.meanflow_target(m, z, t, r, v)
        return u.detach(), tgt

    def sc(mode):
        return lambda tgt, z, t, d, p, d_min: nb14._shortcut_variant(tgt, z, t, d, p, d_min, mode)

    def sc_no_stop_gradient(tgt, z, t, d, p, d_min):
        small = d <= d_min * (1 + 1e-6)
        jump = lambda x, a: steps.ddim_step(tgt(x, a, Cond(s=torch.where(small, a, a - d))), a, a - d, p)
        return jump(jump(z, t), t - d)

    def scm(mode):
        return lambda m, x, t, dxdphi, w, c: (fm.trigflow_velocity(m, x, t),
                                              nb14._scm_variant(m, x, t, dxdphi, w, c, mode))

    def scm_with_graph(m, x, t, dxdphi, w, c):
        F, g = fm.scm_tangent(m, x, t, dxdphi, None, w, c)
        return F, g + 0 * F

    return [
        ("14.1", mf(sign=+1.0), "sign of the (t - r) term is flipped"),
        ("14.1", mf(factor=False), "(t - r) factor is missing"),
        ("14.1", mf(tangent=(0.0, 0.0, 1.0)), "tangent is (0, 0, 1)"),
        ("14.1", mf(tangent=(1.0, 0.0, 0.0)), "tangent is (v, 0, 0)"),
        ("14.1", mf(tangent=(1.0, 1.0, 1.0)), "moves r with t"),
        ("14.1", mf(tangent=(1.0, 1.0, 0.0)), "the 1 is on r"),
        ("14.1", mf(tangent=(0.5, 0.0, 1.0)), "finite difference"),          # no named slip: the check by FD
        ("14.1", mf_no_stop_gradient, "sg(du/dt)"),
        ("14.1", mf_detached_u, "u has no gradient"),
        ("14.2", sc("one jump"), "TWO jumps of d"),
        ("14.2", sc("one d"), "one jump of d, to t - d"),
        ("14.2", sc("no smallest rule"), "instantaneous prediction"),
        ("14.2", sc_no_stop_gradient, "torch.no_grad()"),
        ("14.3", scm("no normalisation"), "not normalised"),
        ("14.3", scm("batch norm"), "per sample"),
        ("14.3", scm("squared norm"), "squared norm"),
        ("14.3", scm("dt without 1/a"), "dphi / a"),
        ("14.3", scm("warmup on all"), "multiplies only the"),
        ("14.3", scm_with_graph, "carries a graph"),
    ]


@pytest.mark.parametrize("case", range(len(_nb14_mistakes())))
def test_nb14_checkers_name_each_planted_mistake(case, capsys):
    exercise, wrong, says = _nb14_mistakes()[case]
    for seed in (0, 1):
        used = checks.CHECKERS[exercise](wrong, seed=seed)
        out = capsys.readouterr().out
        assert checks.is_library(used) and says in out and out.count(f"Exercise {exercise}:") == 1, out


def test_nb14_fallbacks_take_the_exercises_arguments(capsys):
    """A fallback is called as the student's function was: the exercise's signature, not the library's."""
    from course_lib.checks import nb14
    from course_lib.distill import flowmap as fm

    def unsolved(*args):
        raise NotImplementedError("Exercise")

    g = torch.Generator().manual_seed(0)
    model = nb14._tiny_flow_map(nb14.RF, g)
    z, t = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.75, dtype=torch.float64)
    d = torch.full((4,), 0.25, dtype=torch.float64)
    used = checks.check_shortcut_target(unsolved, seed=0)
    torch.testing.assert_close(used(model, z, t, d, nb14.RF, 1 / 128), fm.shortcut_target(model, z, t, d, nb14.RF))
    used = checks.check_meanflow_target(unsolved, seed=0)
    torch.testing.assert_close(used(model, z, t, 0.5 * t, z)[1], fm.meanflow_target(model, z, t, 0.5 * t, z)[1])
    from course_lib.checks.core import tiny_model
    from course_lib.processes import VPCosine
    m = tiny_model(VPCosine(), g, "v")
    used = checks.check_scm_tangent(unsolved, seed=0)
    torch.testing.assert_close(used(m, z, t, z, 0.5, 0.3)[1], fm.scm_tangent(m, z, t, z, None, 0.5, 0.3)[1])
    assert "not solved yet" in capsys.readouterr().out


@pytest.mark.parametrize("exercise", ["14.1", "14.2", "14.3"])
def test_nb14_zeros_placeholder_hears_what_is_wrong_not_the_recipe(exercise, capsys):
    zeros = _answer_map(_library_solutions()[exercise], lambda v: torch.zeros_like(v).detach())
    used = checks.CHECKERS[exercise](zeros, seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and "returns all zeros" in out and out.count(f"Exercise {exercise}:") == 1, out
    assert "jvp" not in out.lower() and "no_grad" not in out, out


def test_nb14_references_agree_with_finite_differences():
    """The checkers' finite differences (the arbiters of a wrong tangent) match the library's JVPs."""
    from course_lib.checks import nb14
    from course_lib.distill import flowmap as fm
    from course_lib.processes import VPCosine

    g = torch.Generator().manual_seed(0)
    model = nb14._tiny_flow_map(nb14.RF, g)
    t = 0.3 + 0.6 * torch.rand(6, generator=g, dtype=torch.float64)
    r = 0.5 * t
    z, v = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    u, tgt = fm.meanflow_target(model, z, t, r, v)
    torch.testing.assert_close(tgt, v - (t - r)[:, None] * nb14.meanflow_dudt_fd(model, z, t, r, v), rtol=0, atol=1e-6)
    vp = VPCosine()
    from course_lib.checks.core import tiny_model
    m = tiny_model(vp, g, "v", time_scale=0.01)
    dx = torch.randn(6, 2, generator=g, dtype=torch.float64)
    F, G = fm.scm_tangent(m, z, t, dx, c=None)
    phi = vp.a * t + vp.b
    want = -(torch.cos(phi) ** 2)[:, None] * (F.detach() - dx) - ((torch.cos(phi) * torch.sin(phi))[:, None] * z
                                                                  + nb14.scm_dFdt_fd(m, z, t, dx))
    torch.testing.assert_close(G, want, rtol=0, atol=1e-6)
# --- notebook 11: planted mistakes in the Hyper-SD exercises (segment start, TSCD target, reward loss, sampler) ----

def _segment_start(mistake):
    import math

    def fn(t, k, t_min):
        w = (1 - t_min) / k
        if mistake == "t_min for all":
            return torch.full_like(t, t_min)
        if mistake == "split [0, 1]":
            t_min, w = 0.0, 1.0 / k
        m = torch.ceil((t - t_min) / w - 1e-9) - 1
        if mistake == "edge to itself":
            m = torch.floor((t - t_min) / w + 1e-9)
        m = m.clamp(0, k - 1)
        start = t_min + m * w
        return torch.minimum(start + w, torch.ones_like(t)) if mistake == "segment end" else start
    assert math  # the right answer needs no more than ceil
    return fn


def _tscd_loss(mistake):
    from course_lib import steps
    from course_lib.distill.hypersd import segment_start
    from course_lib.distill.tcd import tcf

    def fn(student, target, teacher, x0, eps, t_next, t_cur, k, process):
        s = segment_start(t_cur if mistake == "crossing" else t_next, k, t_min=0.002)
        if mistake == "to t_min":
            s = torch.full_like(s, 0.002)
        x_next = process.marginal(x0, t_next, eps)
        with torch.enable_grad() if mistake == "no stopgrad" else torch.no_grad():
            x_cur = steps.ddim(teacher, x_next, t_next, t_cur, process)
            net = student if mistake == "online as target" else target
            tgt = tcf(net, x_next, t_next, s, process) if mistake == "no teacher step" else tcf(net, x_cur, t_cur, s,
                                                                                                process)
        return (tcf(student, x_next, t_next, s, process) - tgt).pow(2).mean(1)
    return fn


def _refl(mistake):
    def fn(student, x_t, t, process, reward_fn):
        if mistake == "reward on x_t":
            return -reward_fn(x_t, None)
        x0 = student(x_t, t).x0
        if mistake == "detached prediction":
            x0 = x0.detach()
        if mistake == "no grad":
            with torch.no_grad():
                return -reward_fn(x0, None)
        return reward_fn(x0, None) if mistake == "plus reward" else -reward_fn(x0, None)
    return fn


def _unified(mistake):
    from course_lib import samplers

    def fn(model, x, n, process, gamma, noises):
        ts = torch.linspace(1.0, 0.0, n if mistake == "n points" else n + 1, dtype=torch.float64)
        g = {"gamma reversed": 1 - gamma, "no gamma": 0.0}.get(mistake, gamma)
        return samplers.tcd(model, x, ts, process, gamma=g, noises=noises[: len(ts) - 2])
    return fn


PLANTED_11 = [   # (checker, variant factory, mistake, what the verdict must say)
    (checks.check_segment_start, _segment_start, "edge to itself", "belongs to the segment below"),
    (checks.check_segment_start, _segment_start, "segment end", "END of the segment"),
    (checks.check_segment_start, _segment_start, "t_min for all", "consistency distillation's end"),
    (checks.check_segment_start, _segment_start, "split [0, 1]", "not [t_min, 1]"),
    (checks.check_tscd_loss, _tscd_loss, "crossing", "crossing a segment"),
    (checks.check_tscd_loss, _tscd_loss, "to t_min", "jump to t_min"),
    (checks.check_tscd_loss, _tscd_loss, "online as target", "online student"),
    (checks.check_tscd_loss, _tscd_loss, "no teacher step", "teacher's ODE step"),
    (checks.check_tscd_loss, _tscd_loss, "no stopgrad", "gradient flows through the target"),
    (checks.check_refl_loss, _refl, "reward on x_t", "you scored x_t"),
    (checks.check_refl_loss, _refl, "detached prediction", "no gradient"),
    (checks.check_refl_loss, _refl, "no grad", "no gradient"),
    (checks.check_refl_loss, _refl, "plus reward", "minus the reward"),
    (checks.check_unified_sampler, _unified, "gamma reversed", "wrong way round"),
    (checks.check_unified_sampler, _unified, "no gamma", "ignores gamma"),
    (checks.check_unified_sampler, _unified, "n points", "n + 1 points"),
]


@pytest.mark.parametrize("check, variant, mistake, says", PLANTED_11,
                         ids=[f"{c.exercise}-{m.replace(' ', '-')}" for c, _, m, _ in PLANTED_11])
def test_hypersd_checkers_reject_planted_mistakes(check, variant, mistake, says, capsys):
    rejects_planted_mistake(check, variant, mistake, says, capsys)


@pytest.mark.parametrize("exercise", ["11.1", "11.2", "11.3", "11.4"])
def test_hypersd_placeholders_hear_what_is_wrong_not_the_recipe(exercise, capsys):
    recipe = {"11.1": "ceil(", "11.2": "steps.ddim", "11.3": "reward_fn(student_model", "11.4": "renoise"}[exercise]
    zeros = _answer_map(_library_solutions()[exercise], lambda v: torch.zeros_like(v).detach())
    used = checks.CHECKERS[exercise](zeros, seed=0)
    out = capsys.readouterr().out
    assert checks.is_library(used) and out.count(f"Exercise {exercise}:") == 1, out
    assert "returns all zeros" in out and recipe not in out, out


# --- notebook 12: the Pareto front ---------------------------------------------------------------------------------

def test_pareto_front_is_the_set_no_method_beats_on_both_axes():
    from course_lib.metrics import pareto_front

    cost, quality = torch.tensor([1.0, 2.0, 3.0, 1.0, 4.0, 2.0]), torch.tensor([5.0, 3.0, 1.0, 5.0, 0.5, 4.0])
    # (2, 4) is beaten by (2, 3); the repeated (1, 5) stays twice
    assert pareto_front(cost, quality).tolist() == [True, True, True, True, True, False]


def _pareto(mistake):
    from course_lib.checks import nb12
    from course_lib.metrics import pareto_front

    return {"right": pareto_front,
            "maximises quality": lambda c, q: pareto_front(c, -q),
            "drops ties": nb12._drops_ties,
            "only the extremes": nb12._extremes,
            "indices": lambda c, q: torch.nonzero(pareto_front(c, q)).flatten(),
            "zeros": lambda c, q: torch.zeros(len(c), dtype=torch.bool)}[mistake]


PLANTED_12 = [   # (checker, variant factory, mistake, what the verdict must say)
    (checks.check_pareto_front, _pareto, "maximises quality", "lower is better"),
    (checks.check_pareto_front, _pareto, "drops ties", "repeated point"),
    (checks.check_pareto_front, _pareto, "only the extremes", "cheapest method and the best"),
    (checks.check_pareto_front, _pareto, "indices", "not the indices"),
    (checks.check_pareto_front, _pareto, "zeros", "placeholder"),
]


@pytest.mark.parametrize("check, variant, mistake, says", PLANTED_12,
                         ids=[m.replace(" ", "-") for _, _, m, _ in PLANTED_12])
def test_pareto_checker_rejects_planted_mistakes(check, variant, mistake, says, capsys):
    rejects_planted_mistake(check, variant, mistake, says, capsys)
