"""Exercise checkers accept right answers, reject wrong ones with an explanation, and fall back when unsolved."""
import pytest
import torch

from course_lib import checks
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


def test_pd_round_checker_accepts_a_round_and_rejects_wrong_ones(capsys):
    import copy

    from course_lib.distill.pd import distill_round

    def right(teacher, N, sample_data, cfg):
        return distill_round(teacher, N, sample_data, cfg, progress=False).model.eval()

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


# --- notebook 02: guided distillation --------------------------------------------------------------------------

def right_guided_target(teacher, z_t, t, y, w, null_label):
    from course_lib.distill.guided import guided_target
    return guided_target(teacher, z_t, t, y, w, null_label)


def imagen_guided_target(teacher, z_t, t, y, w, null_label):  # Imagen's convention: the weight is off by one
    cond, uncond = teacher(z_t, t, y).x0, teacher(z_t, t, torch.full_like(y, null_label)).x0
    return uncond + w[:, None] * (cond - uncond)


def right_guided_loss(student, teacher, x0, y, t, eps, w, null_label, process):
    from course_lib.distill.guided import guided_loss_at
    return guided_loss_at(student, teacher, x0, y, t, eps, w, null_label, process)


def unweighted_guided_loss(student, teacher, x0, y, t, eps, w, null_label, process):  # forgets max(SNR, 1)
    z_t = process.marginal(x0, t, eps)
    return (student(z_t, t, y, w).x0 - right_guided_target(teacher, z_t, t, y, w, null_label)).pow(2).mean(1)


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
            x0, y = sample_data(n, g)
            w = w_range[0] + (w_range[1] - w_range[0]) * torch.rand((), generator=g)
            return x0, {"y": y, "w": w.expand(n)}
        return sample_batch

    assert checks.check_guided_batches(guided_batches, seed=0) is guided_batches
    assert "correct" in capsys.readouterr().out
    assert checks.check_guided_batches(one_w_per_batch, seed=0) is guided_batches
    assert "uniform" in capsys.readouterr().out
    assert checks.check_guided_batches(unsolved, seed=0) is guided_batches
    assert "not solved yet" in capsys.readouterr().out


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


# --- the registry and RNG hygiene (issue 9) ---------------------------------------------------------------------

def _library_solutions():
    """The library's own implementation of every exercise: a correct student."""
    from course_lib.distill import guided, instaflow, pd, reflow
    from course_lib.metrics import straightness
    from course_lib.processes import RectifiedFlow
    from course_lib.samplers import ddim_step

    def guided_velocity(flow, x, t, y, w, null_label):
        p = instaflow.guided(flow, w)(x, t, y)
        return p.eps - p.x0

    return {
        "0.1": right_v, "0.2": ddim_step, "0.3": right_swd,
        "1.1": pd.pd_target, "1.2": pd.pd_loss_at,
        "1.3": lambda teacher, N, sample, cfg: pd.distill_round(teacher, N, sample, cfg, progress=False).best.eval(),
        "2.1": guided.guided_target, "2.2": guided.guided_loss_at, "2.3": guided.guided_batches,
        "3.1": lambda m, x0, eps, t: reflow.rf_loss_at(m, x0, eps, t),
        "3.2": lambda m, eps, steps: reflow.generate_pairs(m, eps, steps, "euler", RectifiedFlow()),
        "3.3": straightness,
        "4.1": guided_velocity, "4.2": lambda m, eps, x0, y: instaflow.onestep_loss(m, eps, x0, y),
        "4.3": instaflow.laplacian_pyramid_l1,
    }


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
    orphans = sorted(set(checks.CHECKERS) - set(found))
    assert not orphans, f"checkers registered for exercises no solution notebook has: {orphans}"
    for number, notebook in found.items():      # exercise n.m is checked by checks/nb0n.py, for notebook 0n_*
        chapter = int(number.split(".")[0])
        assert notebook.startswith(f"{chapter:02d}_")
        assert checks.CHECKERS[number].__module__ == f"course_lib.checks.nb{chapter:02d}"
