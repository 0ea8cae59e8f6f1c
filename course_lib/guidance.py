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

from .conditioning import Cond, accepts_cond, as_cond
from .predictions import Pred
from .processes import bcast


def cfg(model: Callable[..., Pred], w: float | Tensor, null_label: int | None = None) -> Callable[..., Pred]:
    """Return model_w(x, t, c) = (1 + w) model(x, t, c) - w model(x, t, null(c)), in one batched call.

    c: class labels y (B,) (then null_label, the model's num_classes, is the null label) or a `Cond` of labels or
    text embeddings that knows its own null value. w: one float, or a (B,) tensor of per-sample weights (guided
    distillation draws one w per sample); a float w = 0 makes one plain conditional call.

    The model is called with a Cond when it declares `accepts_cond = True` (sd.SDDenoiser, models.Denoiser), and
    with label tensors otherwise (any callable model(x, t, y))."""

    def guided(x: Tensor, t: Tensor, c: Tensor | Cond) -> Pred:
        labels_in = isinstance(c, Tensor)
        if not isinstance(w, Tensor) and w == 0:
            return model(x, t, c if labels_in else _model_input(model, c, labels_in))
        if labels_in and null_label is None:
            raise ValueError("classifier-free guidance on class labels needs the null label: "
                             "cfg(model, w, null_label=<the model's num_classes>)")
        c = as_cond(c, null_label)
        both = Cond.cat([c, c.null()])                                            # (2B): conditional, then null
        out = model(torch.cat([x, x]), torch.cat([t, t]), _model_input(model, both, labels_in))
        cond = Pred(*(f[: len(x)] for f in out))
        uncond = Pred(*(f[len(x):] for f in out))
        weight = bcast(w.to(device=x.device, dtype=x.dtype), x) if isinstance(w, Tensor) and w.ndim else w
        return cond.mix(uncond, weight)

    return guided


def _model_input(model: Callable[..., Pred], c: Cond, labels_in: bool) -> Tensor | Cond:
    """What to hand `model`: the Cond itself when the model takes one (and the caller gave a Cond), else the labels."""
    if accepts_cond(model) and not labels_in:
        return c
    if c.y is None or any(v is not None for v in (c.text, c.pooled, c.w, c.timestep_cond)):
        raise TypeError(f"{type(model).__name__} takes class-label tensors (it has no `accepts_cond = True`), but "
                        f"this Cond holds more than labels: {c!r}. Use a model that accepts a Cond (sd.SDDenoiser, "
                        "models.Denoiser)")
    return c.y


def condition(model: Callable[..., Pred], y: Tensor | Cond) -> Callable[[Tensor, Tensor], Pred]:
    """Fix the conditioning (labels y (B,) or a Cond) so that samplers, which call model(x, t), can use a
    conditional model."""
    return lambda x, t: model(x, t, y)
