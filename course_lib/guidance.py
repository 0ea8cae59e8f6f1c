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

from .conditioning import Cond, check
from .predictions import Pred
from .processes import bcast


def cfg(model: Callable[..., Pred], w: float | Tensor) -> Callable[..., Pred]:
    """Return model_w(x, t, cond) = (1 + w) model(x, t, cond) - w model(x, t, cond.null()), in one batched call.

    cond: a `Cond` of labels or text embeddings that knows its own null value (conditioning.labels(y, num_classes)
    for class labels). w: one float, or a (B,) tensor of per-sample weights (guided distillation draws one w per
    sample); a float w = 0 makes one plain conditional call."""

    def guided(x: Tensor, t: Tensor, cond: Cond) -> Pred:
        if not isinstance(cond, Cond):
            check(cond)
            raise ValueError("classifier-free guidance needs a conditioning Cond (its null value is the "
                             "unconditional input); got None")
        if not isinstance(w, Tensor) and w == 0:
            return model(x, t, cond)
        both = Cond.cat([cond, cond.null()])                                      # (2B): conditional, then null
        out = model(torch.cat([x, x]), torch.cat([t, t]), both)
        c = Pred(*(f[: len(x)] for f in out))
        u = Pred(*(f[len(x):] for f in out))
        weight = bcast(w.to(device=x.device, dtype=x.dtype), x) if isinstance(w, Tensor) and w.ndim else w
        return c.mix(u, weight)

    return guided
