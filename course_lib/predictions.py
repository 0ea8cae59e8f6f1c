"""Conversions between what a network predicts and what samplers need, in one place.

A course model returns `Pred(x0, eps)`: the denoised estimate and the noise estimate, tied together by
x_t = alpha x0 + sigma eps. Networks may natively predict any of

    "eps"       the noise eps                                  (DDPM, Stable Diffusion)
    "x0"        the clean sample x0                            (PD's CIFAR config)
    "v"         v = alpha eps - sigma x0                       (Salimans & Ho 2022, Sec. 4)
    "velocity"  u = dx_t/dt = alpha'(t) x0 + sigma'(t) eps     (flow matching; for rf: u = eps - x0)

and `to_pred` / `from_pred` convert both ways. For "v" the inverse holds for any affine process:
x0 = (alpha x - sigma v) / (alpha^2 + sigma^2), eps = (sigma x + alpha v) / (alpha^2 + sigma^2).
For "velocity", (x0, eps) solve the 2x2 system [alpha sigma; alpha' sigma'] [x0; eps] = [x; u].
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .processes import AffineProcess, bcast

PARAMETERIZATIONS = ("eps", "x0", "v", "velocity")


class Pred(NamedTuple):
    """A model's estimate at (x_t, t): x0 (B, ...) and eps (B, ...), with x_t = alpha x0 + sigma eps."""

    x0: Tensor
    eps: Tensor

    def mix(self, other: "Pred", weight: float | Tensor) -> "Pred":
        """(1 + w) * self - w * other, applied to both fields (guidance; weights sum to one so x_t is kept)."""
        return Pred((1 + weight) * self.x0 - weight * other.x0, (1 + weight) * self.eps - weight * other.eps)


def _check(kind: str) -> None:
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {kind!r}; valid ones: {', '.join(PARAMETERIZATIONS)}")


def to_pred(out: Tensor, x: Tensor, t: Tensor, process: AffineProcess, kind: str) -> Pred:
    """Native network output `out` at (x, t) -> Pred(x0, eps). Shapes: out, x (B, ...); t (B,)."""
    _check(kind)
    a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    if kind == "eps":
        return Pred((x - s * out) / a, out)
    if kind == "x0":
        return Pred(out, (x - a * out) / s)
    if kind == "v":
        norm = a * a + s * s
        return Pred((a * x - s * out) / norm, (s * x + a * out) / norm)
    da, ds = bcast(process.d_alpha(t), x), bcast(process.d_sigma(t), x)
    det = a * ds - s * da
    return Pred((ds * x - s * out) / det, (a * out - da * x) / det)


def from_pred(pred: Pred, t: Tensor, process: AffineProcess, kind: str) -> Tensor:
    """Pred(x0, eps) -> the quantity a network of parameterization `kind` should output (its training target)."""
    _check(kind)
    x0, eps = pred
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return bcast(process.alpha(t), x0) * eps - bcast(process.sigma(t), x0) * x0
    return velocity(pred, t, process)


def velocity(pred: Pred, t: Tensor, process: AffineProcess) -> Tensor:
    """The probability-flow ODE drift dx_t/dt = alpha'(t) x0_hat + sigma'(t) eps_hat."""
    x0, eps = pred
    return bcast(process.d_alpha(t), x0) * x0 + bcast(process.d_sigma(t), x0) * eps
