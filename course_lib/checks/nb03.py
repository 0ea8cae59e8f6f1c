"""Checkers of notebook 03 (rectified flow): the rectified-flow loss, reflow pairs, the straightness S(Z), one reflow
round."""
from __future__ import annotations

from typing import Callable

import torch

from ..data2d import exact_denoiser
from ..distill.reflow import ReflowConfig, distill_reflow, generate_pairs, rf_loss_at
from ..grids import uniform
from ..metrics import flow_map_error, straightness
from ..processes import RectifiedFlow
from ..samplers import euler
from ..teachers import load_teacher
from ..train import TrainConfig
from .core import (accept, checker, draw_seed, explain_exception, fall_back, fresh_generator, library_version,
                   run_check, tiny_model)


def _rf_models(g: torch.Generator):
    """Flows to check reflow exercises on: two tiny random velocity MLPs and the exact Gaussian-mixture flow."""
    for k in range(2):
        yield tiny_model(RectifiedFlow(), g, "velocity"), f"a random velocity MLP ({k + 1})"
    yield exact_denoiser("gmm", RectifiedFlow()), "the exact Gaussian-mixture flow"


@checker("3.1")
def check_rf_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 3.1: student(model, x0, eps, t) -> per-sample rectified-flow loss (B,)."""
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


# 3.4: one reflow round must make the flow's single Euler step land this many times closer to the OLD flow's ODE
# solution (from the same noise) than the old flow's own single Euler step does. Measured on this check (shipped
# gmm-rf teacher, 4000 pairs, 120 updates): a correct round 13-15x; pairs re-drawn independently (the independent
# coupling: a new 1-RF) 0.97-0.99x; pairs with noise and data swapped (the paper's time direction) 1.0-1.1x.
REFLOW_ROUND_MIN_GAIN = 4.0


@checker("3.4")
def check_reflow_round(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 3.4: student(flow, eps, steps, cfg) -> the next rectified flow (one round of Algorithm 1).

    A round cannot be compared output by output (training is random), so this checks what a round must do, on the
    shipped Gaussian-mixture flow (gmm-rf) with a short budget: the flow is left untouched, a new model comes back,
    and one Euler step of the new flow lands at least REFLOW_ROUND_MIN_GAIN times closer to the old flow's ODE
    solution (16 Euler steps, same noise) than one Euler step of the old flow does.
    """
    import copy

    def reference(flow, eps, steps, cfg):
        pairs = generate_pairs(flow, eps, steps, "euler", RectifiedFlow())
        _, done = distill_reflow(flow, pairs, ReflowConfig(), run=cfg, progress=False)
        return done.model.eval().requires_grad_(False)

    g = fresh_generator(seed)
    with torch.random.fork_rng(devices=[]):   # building the model to load into may draw initial weights
        flow = load_teacher("gmm-rf")
    before = copy.deepcopy(flow.state_dict())
    eps = torch.randn(4000, 2, generator=g)
    steps = 16
    cfg = TrainConfig(steps=120, batch_size=256, lr=1e-3, lr_schedule="linear", ema_decay=0.0, seed=draw_seed(g),
                      desc="check 3.4")
    try:
        with torch.random.fork_rng(devices=[]):   # a student drawing from the global RNG must not shift the notebook's
            out = student(flow, eps.clone(), steps, cfg)
    except Exception as e:
        return fall_back("3.4", reference, explain_exception(e))
    changed = [k for k, v in flow.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        return fall_back("3.4", reference, f"the round changed the old flow's weights ({changed[0]}, ...): train a "
                                           "copy (reflow.as_flow(flow) or copy.deepcopy) and keep the old flow as it is.")
    if out is flow or not callable(out):
        return fall_back("3.4", reference, f"return the newly trained flow, a new model (got {type(out).__name__}).")
    x1 = torch.randn(2000, 2, generator=g)
    rf = RectifiedFlow()
    with torch.no_grad():
        target = euler(flow, x1, uniform(steps), rf)
        err_old = flow_map_error(euler(flow, x1, uniform(1), rf), target)
        err_new = flow_map_error(euler(out, x1, uniform(1), rf), target)
    gain = err_old / err_new
    if not gain >= REFLOW_ROUND_MIN_GAIN:       # also catches a nan
        return fall_back("3.4", reference,
                         f"after the round, one Euler step of the new flow is {err_new:.3f} (RMS) from the old flow's "
                         f"{steps}-step solution; one step of the old flow is {err_old:.3f} away ({gain:.1f}x; a correct "
                         f"round gets about 13x here, this check asks for {REFLOW_ROUND_MIN_GAIN:g}x), so the new flow "
                         "did not straighten. Check that the pairs come from the flow itself, x0 = make_pairs(flow, "
                         "eps, steps)[1], with the SAME eps that you train on (fresh noise drawn independently of x0 "
                         "is the independent coupling again: a new 1-RF, as curved as the old one), and that "
                         "rf_loss gets them in the course's order, rf_loss(model, x0, eps, t): x0 is the data end "
                         "(t = 0), eps the noise end (t = 1).")
    return accept("3.4", student, f"correct: one Euler step of the new flow lands {gain:.1f}x closer to the old "
                                  f"flow's ODE solution than one step of the old flow does.")
