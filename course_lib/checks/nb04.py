"""Checkers of notebook 04 (InstaFlow): the guided velocity, the conditional reflow loss with label dropout, the
one-step loss, and the optional Laplacian-pyramid L1."""
from __future__ import annotations

from typing import Callable

import torch

from ..conditioning import labels
from ..distances import laplacian_pyramid_l1
from ..distill.instaflow import guided, onestep_loss
from ..distill.reflow import rf_loss_at
from ..processes import RectifiedFlow
from .core import checker, fresh_generator, run_check, tiny_model


def _cond_flows(g: torch.Generator):
    """Conditional velocity MLPs (3 classes + the null label) to check InstaFlow exercises on."""
    for k in range(2):
        yield tiny_model(RectifiedFlow(), g, "velocity", num_classes=3), f"a random conditional velocity MLP ({k + 1})"


@checker("4.1")
def check_guided_velocity(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 4.1: student(flow, x, t, cond, w) -> (B, D) the guided velocity (1 + w) u(x, t | y) - w u(x, t | null),
    cond the labels (conditioning.labels(y, num_classes))."""
    g = fresh_generator(seed)

    def reference(flow, x, t, cond, w):
        pred = guided(flow, w)(x, t, cond)
        return pred.eps - pred.x0

    def cases():
        for (flow, name), w in zip(_cond_flows(g), (0.0, 1.5)):
            x = torch.randn(6, 2, generator=g, dtype=torch.float64)
            t = torch.rand(6, generator=g, dtype=torch.float64)
            y = torch.randint(3, (6,), generator=g)
            yield (flow, x, t, labels(y, 3), w), f"for {name} at w = {w}"

    return run_check("4.1", student, reference, cases(), atol=1e-8, rtol=1e-6,
                     hint="Evaluate the flow twice, with the labels cond and with the null label everywhere "
                          "(cond.null()); each velocity is pred.eps - pred.x0; mix them as "
                          "(1 + w) u_cond - w u_uncond (w = 0 is the plain conditional velocity).")


@checker("4.2")
def check_cond_reflow_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 4.2: student(flow, eps, x0, cond, t, drop) -> per-sample conditional reflow loss (B,): the
    rectified-flow loss on the pair (x0, eps) at times t, with the labels cond.y replaced by the null label
    cond.null_y where the boolean mask drop (B,) is True (classifier-free label dropout; the pair itself is kept)."""
    g = fresh_generator(seed)

    def reference(flow, eps, x0, cond, t, drop):
        return rf_loss_at(flow, x0, eps, t, labels(torch.where(drop, cond.null().y, cond.y), cond.null_y))

    def cases():
        for (flow, name), B in zip(_cond_flows(g), (8, 12)):
            eps = torch.randn(B, 2, generator=g, dtype=torch.float64)
            x0 = 2 * torch.randn(B, 2, generator=g, dtype=torch.float64)
            y = torch.randint(3, (B,), generator=g)
            t = 0.02 + 0.96 * torch.rand(B, generator=g, dtype=torch.float64)
            drop = torch.arange(B) % 3 == 0                      # a third of the labels dropped, the rest kept
            drop = drop[torch.randperm(B, generator=g)]
            yield (flow, eps, x0, labels(y, 3), t, drop), f"for {name} with {int(drop.sum())} of {B} labels dropped"
        flow, name = next(_cond_flows(g))
        B = 6
        yield ((flow, torch.randn(B, 2, generator=g, dtype=torch.float64),
                2 * torch.randn(B, 2, generator=g, dtype=torch.float64), labels(torch.randint(3, (B,), generator=g), 3),
                torch.rand(B, generator=g, dtype=torch.float64), torch.zeros(B, dtype=torch.bool)),
               f"for {name} with no label dropped")

    return run_check("4.2", student, reference, cases(), atol=1e-8, rtol=1e-6,
                     hint="Replace the LABEL (not the pair) where drop is True: y_in = torch.where(drop, "
                          "cond.null().y, cond.y), with cond.null_y the extra class the model keeps for 'no label' "
                          "(not 0, which is a real class); keep eps and x0 as they are. Then the loss of notebook 03: "
                          "x_t = (1 - t) x0 + t eps, u = pred.eps - pred.x0 from flow(x_t, t, "
                          "conditioning.labels(y_in, cond.null_y)), "
                          "mean over the data dimensions of (u - (eps - x0))^2, one value per sample.")


@checker("4.3")
def check_onestep_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 4.3: student(model, eps, x0, cond) -> per-sample L2 one-step distillation loss (B,) (cond: the labels,
    conditioning.labels(y, num_classes))."""
    g = fresh_generator(seed)

    def cases():
        for flow, name in _cond_flows(g):
            eps = torch.randn(7, 2, generator=g, dtype=torch.float64)
            x0 = 2 * torch.randn(7, 2, generator=g, dtype=torch.float64)
            y = torch.randint(3, (7,), generator=g)
            yield (flow, eps, x0, labels(y, 3)), f"for {name}"

    return run_check("4.3", student, lambda m, eps, x0, cond: onestep_loss(m, eps, x0, cond), cases(), atol=1e-8,
                     rtol=1e-6,
                     hint="One Euler step from t = 1 to 0: x0_hat = eps - u(eps, 1 | cond), with t a (B,) tensor of ones "
                          "and u = pred.eps - pred.x0; return the mean over data dimensions of (x0_hat - x0)^2, one "
                          "value per sample.")


@checker("4.4")
def check_lap1(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 4.4: (an optional extra) student(a, b, levels) -> (B,) Laplacian-pyramid L1 distance of image batches (B, C, H, W)."""
    g = fresh_generator(seed)

    def cases():
        for (B, H), levels in zip(((3, 16), (2, 8), (4, 16)), (3, 2, 1)):
            a = torch.randn(B, 1, H, H, generator=g, dtype=torch.float64)
            b = a + 0.3 * torch.randn(B, 1, H, H, generator=g, dtype=torch.float64)
            yield (a, b, levels), f"for {B} images of {H}x{H} with {levels} level{'s' * (levels > 1)}"

    return run_check("4.4", student, laplacian_pyramid_l1, cases(), atol=1e-8, rtol=1e-6,
                     hint="Per level j = 0..levels-1: low = F.avg_pool2d(x, 2); band = x - F.interpolate(low, "
                          "size=x.shape[-2:], mode='nearest'); add 2**-j * mean |band_a - band_b| per sample; go on "
                          "with x = low. After the loop add 2**-levels * mean |a_low - b_low|.")
