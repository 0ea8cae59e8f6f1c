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
