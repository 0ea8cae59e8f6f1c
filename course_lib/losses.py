"""Teacher training losses. Each returns per-sample values of shape (B,); the training loop reduces them.

Diffusion and flow matching are one loss here: draw t, noise x0 into x_t = alpha x0 + sigma eps, and
regress the network's native output onto the same quantity computed from the true (x0, eps):

    L(theta) = E_{t, x0, eps} || F_theta(x_t, t) - target_kind(x0, eps, t) ||^2          (Ho et al. 2020, Eq. 14)

kind "eps" is DDPM's loss, "v" Salimans & Ho (2022), "velocity" with the rf process is flow matching /
1-rectified flow (Lipman et al. 2023; Liu et al. 2022): target eps - x0 in the course's time direction.

`denoising_loss_at` is that regression at given (t, eps): the one copy of the loss. `denoising_loss` draws t and eps
for a teacher; Stable Diffusion's loss (minisd.ldm_loss) draws SD's integer timesteps; DMD's fake score (distill.dmd
.fake_score_loss) regresses onto the generator's samples.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .conditioning import Cond, check
from .models import Denoiser
from .predictions import Pred, from_pred


def denoising_loss_at(model: Any, x0: Tensor, t: Tensor, eps: Tensor, cond: Cond | None = None) -> Tensor:
    """|| F(x_t, t, cond) - target(x0, eps, t) ||^2 per sample (B,), averaged over the data dimensions (Ho et al.
    2020, Eq. 14, in the model's own parameterization): x_t = alpha_t x0 + sigma_t eps, F = model.raw, the target
    predictions.from_pred(Pred(x0, eps)) in model.parameterization. x0, eps (B, ...), t (B,); cond is passed to
    model.raw as it is. Gradients reach x0 as well: detach it where only the model is trained."""
    x_t = model.process.marginal(x0, t, eps)
    target = from_pred(Pred(x0, eps), t, model.process, model.parameterization)
    return (model.raw(x_t, t, cond) - target).pow(2).flatten(1).mean(1)


def denoising_loss(model: Denoiser, x0: Tensor, generator: torch.Generator, cond: Cond | None = None,
                   t_min: float = 1e-3, p_uncond: float = 0.0) -> Tensor:
    """Per-sample denoising / flow-matching loss in the model's own parameterization.

    x0 (B, ...) data; cond a Cond (labels or text, dropped to its null value w.p. p_uncond: `Cond.drop`) or None.
    t ~ U(t_min, 1), eps ~ N(0, I).
    """
    B = x0.shape[0]
    t = t_min + (1 - t_min) * torch.rand(B, generator=generator, device=generator.device).to(x0)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
    if check(cond) is not None:
        cond = cond.drop(p_uncond, generator)
    return denoising_loss_at(model, x0, t, eps, cond)
