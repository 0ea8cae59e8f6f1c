"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper that turns a conditional model into another model.

Convention used throughout the course (Meng et al. 2023; LCM):

    x0_w = (1 + w) x0(x, t | y) - w x0(x, t | null)        w = 0: the plain conditional model

Imagen (and diffusers' `guidance_scale`) write x0_u + s (x0_c - x0_u): s = 1 + w. Both fields of Pred are
mixed with weights summing to one, so x_t = alpha x0 + sigma eps still holds for the guided prediction.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .predictions import Pred
from .processes import bcast


def cfg(model: Callable[..., Pred], w: float | Tensor, null_label: int) -> Callable[..., Pred]:
    """Return model_w(x, t, y) = (1 + w) model(x, t, y) - w model(x, t, null), in one batched call.

    w: one float, or a (B,) tensor of per-sample weights (guided distillation draws one w per sample)."""

    def guided(x: Tensor, t: Tensor, y: Tensor) -> Pred:
        if not isinstance(w, Tensor) and w == 0:
            return model(x, t, y)
        null = torch.full_like(y, null_label)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond = Pred(*(f[: len(x)] for f in out))
        uncond = Pred(*(f[len(x):] for f in out))
        weight = bcast(w.to(device=x.device, dtype=x.dtype), x) if isinstance(w, Tensor) and w.ndim else w
        return cond.mix(uncond, weight)

    return guided


def condition(model: Callable[..., Pred], y: Tensor) -> Callable[[Tensor, Tensor], Pred]:
    """Fix the class labels y (B,) so that samplers, which call model(x, t), can use a conditional model."""
    return lambda x, t: model(x, t, y)
