"""Checkers of notebook 00 (why distill): v-prediction, one DDIM step, the sliced Wasserstein distance."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..metrics import sliced_wasserstein
from ..predictions import Pred, to_pred
from ..processes import AffineProcess, RectifiedFlow, SDDiscrete, VPCosine
from ..samplers import ddim_step as _ref_ddim_step
from .core import checker, fresh_generator, library_version, run_check


def _processes() -> list[AffineProcess]:
    return [VPCosine(), RectifiedFlow(), SDDiscrete()]


@checker("0.1")
def check_v_to_pred(student: Callable[[Tensor, Tensor, Tensor, AffineProcess], Pred], seed: int | None = None
                    ) -> Callable:
    """Exercise 0.1: student(v, x, t, process) -> Pred(x0, eps) for a v-prediction network."""
    g = fresh_generator(seed)

    def reference(v, x, t, process):
        return to_pred(v, x, t, process, "v")

    def cases():
        for process in _processes():
            for _ in range(3):
                B = 5
                t = 0.05 + 0.9 * torch.rand(B, generator=g, dtype=torch.float64)
                x = torch.randn(B, 2, generator=g, dtype=torch.float64)
                v = torch.randn(B, 2, generator=g, dtype=torch.float64)
                yield (v, x, t, process), f"for the {process.name} process at t = {t[0].item():.2f}"

    return run_check("0.1", student, reference, cases(), atol=1e-8, rtol=1e-6,
                     hint="Check: x = alpha x0 + sigma eps and v = alpha eps - sigma x0; solve these two for x0 and eps.")


@checker("0.2")
def check_ddim_step(student: Callable[[Pred, Tensor, Tensor, AffineProcess], Tensor], seed: int | None = None
                    ) -> Callable:
    """Exercise 0.2: student(pred, t, s, process) -> x_s, one deterministic DDIM step from t to s < t."""
    g = fresh_generator(seed)

    def cases():
        for process in _processes():
            for s_zero in (False, True):
                B = 6
                t = 0.2 + 0.8 * torch.rand(B, generator=g, dtype=torch.float64)
                s = torch.zeros(B, dtype=torch.float64) if s_zero else t * torch.rand(B, generator=g, dtype=torch.float64)
                pred = Pred(torch.randn(B, 2, generator=g, dtype=torch.float64),
                            torch.randn(B, 2, generator=g, dtype=torch.float64))
                yield (pred, t, s, process), (f"for the {process.name} process stepping from t = {t[0].item():.2f} "
                                              f"to s = {s[0].item():.2f}")

    return run_check("0.2", student, _ref_ddim_step, cases(), atol=1e-8, rtol=1e-6,
                     hint="DDIM re-noises the predicted x0 with the predicted eps at the new time: "
                          "x_s = alpha(s) x0 + sigma(s) eps. Mind the shapes: t and s are (B,), x0 is (B, D).")


@checker("0.3")
def check_sliced_wasserstein(student: Callable[[Tensor, Tensor, Tensor], Tensor | float], seed: int | None = None
                             ) -> Callable:
    """Exercise 0.3: student(x, y, directions) -> SW_2 between point sets x, y (N, D) along unit directions (K, D)."""
    g = fresh_generator(seed)

    def reference(x, y, directions):
        return torch.tensor(sliced_wasserstein(x, y, directions=directions), dtype=torch.float64)

    def student_scalar(x, y, directions):
        out = student(x, y, directions)
        return torch.as_tensor(out, dtype=torch.float64).reshape(())

    def cases():
        for n, k, shift in ((50, 8, 0.0), (200, 32, 1.0), (500, 64, 2.5)):
            x = torch.randn(n, 2, generator=g, dtype=torch.float64)
            y = torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.7 + shift
            d = torch.randn(k, 2, generator=g, dtype=torch.float64)
            d = d / d.norm(dim=1, keepdim=True)
            yield (x, y, d), f"for {n} points and {k} directions (shift {shift})"

    use = run_check("0.3", student_scalar, reference, cases(), atol=1e-6, rtol=1e-5,
                    hint="Project both sets on each direction, sort each projection, average the squared "
                         "differences over points and directions, then take the square root.")
    return student if use is student_scalar else library_version(
        lambda x, y, directions: float(reference(x, y, directions)))
