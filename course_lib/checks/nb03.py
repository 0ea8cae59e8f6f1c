"""Checkers of notebook 03 (rectified flow): the rectified-flow loss, reflow pairs, the straightness S(Z)."""
from __future__ import annotations

from typing import Callable

import torch

from ..config import seeded
from ..processes import RectifiedFlow
from .core import checker, draw_seed, fresh_generator, library_version, run_check


def _rf_models(g: torch.Generator):
    """Flows to check reflow exercises on: two tiny random velocity MLPs and the exact Gaussian-mixture flow."""
    from ..data2d import exact_denoiser
    from ..models import Denoiser, MLP2D

    for k in range(2):
        with seeded(draw_seed(g)):                     # initialisation; the notebook's global RNG is left alone
            model = Denoiser(MLP2D(hidden=16, depth=2), RectifiedFlow(), "velocity").double()
        yield model, f"a random velocity MLP ({k + 1})"
    yield exact_denoiser("gmm", RectifiedFlow()), "the exact Gaussian-mixture flow"


@checker("3.1")
def check_rf_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 3.1: student(model, x0, eps, t) -> per-sample rectified-flow loss (B,)."""
    from ..distill.reflow import rf_loss_at

    g = fresh_generator(seed)

    def cases():
        for model, name in _rf_models(g):
            B = 7
            x0 = 2 * torch.randn(B, 2, generator=g, dtype=torch.float64)
            eps = torch.randn(B, 2, generator=g, dtype=torch.float64)
            t = 0.02 + 0.96 * torch.rand(B, generator=g, dtype=torch.float64)
            yield (model, x0, eps, t), f"for {name}"

    return run_check("3.1", student, lambda m, x0, eps, t: rf_loss_at(m, x0, eps, t), cases(), atol=1e-8, rtol=1e-6,
                     hint="x_t = (1 - t) x0 + t eps (reshape t to (B, 1)); the target velocity is eps - x0; the "
                          "model's velocity is pred.eps - pred.x0 (or predictions.velocity(pred, t, process)); "
                          "average the squared error over the data dimensions, one value per sample.")


@checker("3.2")
def check_make_pairs(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 3.2: student(flow, eps, steps) -> (eps, x0), x0 the Euler solution from t = 1 to 0 in `steps`
    equal steps."""
    from ..distill.reflow import generate_pairs

    g = fresh_generator(seed)

    def cases():
        for (model, name), steps in zip(_rf_models(g), (1, 3, 8)):
            eps = torch.randn(9, 2, generator=g, dtype=torch.float64)
            yield (model, eps, steps), f"for {name} with {steps} Euler step{'s' * (steps > 1)}"

    return run_check("3.2", student, lambda m, eps, steps: generate_pairs(m, eps, steps, "euler", RectifiedFlow()),
                     cases(), atol=1e-7, rtol=1e-6,
                     hint="Start at x = eps, t = 1; for each of the steps: x <- x + (s - t) u(x, t) with s = t - 1/steps "
                          "and u = pred.eps - pred.x0; return the pair (eps, x) with eps unchanged.")


@checker("3.3")
def check_straightness(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 3.3: student(path, ts) -> S(Z) (a float) of trajectories path (n+1, B, D) at decreasing times ts."""
    from ..metrics import straightness

    g = fresh_generator(seed)

    def reference(path, ts):
        return torch.tensor(straightness(path, ts), dtype=torch.float64)

    def student_scalar(path, ts):
        return torch.as_tensor(student(path, ts), dtype=torch.float64).reshape(())

    def cases():   # grids from 1 to 0, and grids that do not span [0, 1] (the total duration T is not 1)
        for n, B, start, end, uneven in ((1, 5, 1.0, 0.0, False), (4, 20, 1.0, 0.0, False), (16, 50, 1.0, 0.0, True),
                                         (3, 10, 0.8, 0.3, False), (8, 30, 0.9, 0.2, True)):
            u = torch.linspace(0, 1, n + 1, dtype=torch.float64)
            ts = start + (end - start) * (u**0.5 if uneven else u)
            path = torch.randn(n + 1, B, 2, generator=g, dtype=torch.float64).cumsum(0)
            yield (path, ts), (f"for {B} paths of {n} segment{'s' * (n > 1)} on {'an uneven' if uneven else 'a'} "
                               f"time grid from t = {start:g} to {end:g}")

    use = run_check("3.3", student_scalar, reference, cases(), atol=1e-8, rtol=1e-6,
                    hint="Per segment the velocity is (Z_{i+1} - Z_i) / (t_{i+1} - t_i); the straight-line velocity is "
                         "(Z_n - Z_0) / (t_n - t_0). Sum the squared difference over dimensions, average over paths, "
                         "weight each segment by its duration |t_{i+1} - t_i| (the grid may be uneven), divide by the "
                         "total duration |t_n - t_0| (not always 1: the grid need not span [0, 1]).")
    return student if use is student_scalar else library_version(lambda path, ts: float(reference(path, ts)))
