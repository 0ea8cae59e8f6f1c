"""Conversions between what a network predicts and what samplers need, in one place.

A course model returns `Pred(x0, eps)`: the denoised estimate and the noise estimate, tied together by
x_t = alpha x0 + sigma eps. Networks may natively predict any of

    "eps"       the noise eps                                  (DDPM, Stable Diffusion)
    "x0"        the clean sample x0                            (PD's CIFAR config)
    "v"         v = alpha eps - sigma x0                       (Salimans & Ho 2022, Sec. 4)
    "velocity"  u = dx_t/dt = alpha'(t) x0 + sigma'(t) eps     (flow matching; for rf: u = eps - x0)

    "edm"       F of EDM's preconditioning (Karras et al. 2022, Table 1; edm process only, see `edm_scalings`):
                x0 = D = c_skip x + c_out F, so F's target is (x0 - c_skip x) / c_out

and `to_pred` / `from_pred` convert both ways. For "v" the inverse holds for any affine process:
x0 = (alpha x - sigma v) / (alpha^2 + sigma^2), eps = (sigma x + alpha v) / (alpha^2 + sigma^2).
For "velocity", (x0, eps) solve the 2x2 system [alpha sigma; alpha' sigma'] [x0; eps] = [x; u].
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .processes import EDM, AffineProcess, bcast

PARAMETERIZATIONS = ("eps", "x0", "v", "velocity")   # for any process
PRECONDITIONED = ("edm",)                            # tied to one process (and an input scaling: models.EDMPrecond)


class Pred(NamedTuple):
    """A model's estimate at (x_t, t): x0 (B, ...) and eps (B, ...), with x_t = alpha x0 + sigma eps."""

    x0: Tensor
    eps: Tensor

    def mix(self, other: "Pred", weight: float | Tensor) -> "Pred":
        """(1 + w) * self - w * other, applied to both fields (guidance; weights sum to one so x_t is kept)."""
        return Pred((1 + weight) * self.x0 - weight * other.x0, (1 + weight) * self.eps - weight * other.eps)


def _check(kind: str) -> None:
    if kind not in PARAMETERIZATIONS + PRECONDITIONED:
        raise ValueError(f"unknown parameterization {kind!r}; valid ones: {', '.join(PARAMETERIZATIONS + PRECONDITIONED)}")


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    """EDM's preconditioning (Karras et al. 2022, Table 1), elementwise on sigma:
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2)
    (c_noise = log(sigma) / 4 is the edm process's `timestep`). Returns (c_skip, c_out, c_in)."""
    norm = sigma * sigma + sigma_data**2
    return sigma_data**2 / norm, sigma * sigma_data / norm.sqrt(), norm.rsqrt()


def _edm_process(process: AffineProcess) -> EDM:
    if not isinstance(process, EDM):
        raise ValueError(f"the 'edm' parameterization (EDM preconditioning) needs the edm process (alpha = 1, "
                         f"sigma = sigma_max t); got {process!r}. Use make_process('edm') or another parameterization.")
    return process


def to_pred(out: Tensor, x: Tensor, t: Tensor, process: AffineProcess, kind: str) -> Pred:
    """Native network output `out` at (x, t) -> Pred(x0, eps). Shapes: out, x (B, ...); t (B,).

    The coefficients are computed in t's dtype (keep t float32 or wider); the result has the dtype of x and out
    promoted (bf16 data stays bf16)."""
    _check(kind)
    dtype = torch.promote_types(x.dtype, out.dtype)
    return Pred(*(f.to(dtype) for f in _to_pred(out, x, t, process, kind)))


def _to_pred(out: Tensor, x: Tensor, t: Tensor, process: AffineProcess, kind: str) -> Pred:
    a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    if kind == "edm":                                  # D = c_skip x + c_out F;  eps = (x - D) / sigma  (alpha = 1)
        c_skip, c_out, _ = (bcast(c, x) for c in edm_scalings(process.sigma(t), _edm_process(process).sigma_data))
        x0 = c_skip * x + c_out * out
        return Pred(x0, (x - x0) / s)
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
    if kind == "edm":                                  # F's target (x0 - c_skip x_t) / c_out, x_t = x0 + sigma eps
        s = process.sigma(t)
        c_skip, c_out, _ = (bcast(c, x0) for c in edm_scalings(s, _edm_process(process).sigma_data))
        return (x0 - c_skip * (x0 + bcast(s, x0) * eps)) / c_out
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
