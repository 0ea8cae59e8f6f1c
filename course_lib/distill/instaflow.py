"""InstaFlow (Liu, Zhang, Ma, Peng & Liu, "InstaFlow: One Step is Enough for High-Quality Diffusion-Based
Text-to-Image Generation", ICLR 2024, arXiv 2309.06380), built from the reflow pieces of `distill.reflow`.

The paper's pipeline, with class labels y standing in for text prompts (course time: t = 0 data, t = 1 noise;
see distill.reflow for the flip against the paper's t = 0 noise):

    (0) teacher: a conditional diffusion model with classifier-free guidance (course convention, guidance.cfg)
            x0_w(x, t | y) = (1 + w) x0(x, t | y) - w x0(x, t | null)
    (1) triplets (eps, x0, y): eps ~ N(0, I), y a label, x0 = ODE of the GUIDED teacher from eps  -> `triplets`
    (2) conditional reflow (2-rectified flow), initialised from the teacher's own weights, its output re-read
        as a velocity (reflow.as_flow):
            L = E || (eps - x0) - u_theta(x_t, t | y) ||^2,   x_t = (1 - t) x0 + t eps    -> `distill_conditional_reflow`
        labels are dropped to null with probability p_uncond so the 2-RF keeps an unconditional velocity and
        can be guided at use time on the velocity:  u_w = (1 + w) u(x, t | y) - w u(x, t | null)   -> `guided`
    (3) one-step distillation of the 2-RF on its own pairs (eps, x0' = ODE_2RF(eps | y)), initialised from the
        2-RF, time input fixed at t = 1 (the paper's t = 0). The paper guides the 2-RF (scale 1.5) to make these
        pairs; the course's triplets already carry the guidance, so its 2-RF pairs use w = 0 (notebook 04 shows
        that guidance on top of guided triplets over-guides):
            L = D( eps - u_theta(eps, 1 | y), x0' ),   D = L2 first, then a perceptual distance  -> `distill_onestep`
        The paper's second stage uses LPIPS; it needs pretrained network weights downloaded from the internet.
        The course runs offline, so `distances.get` offers LPIPS when the `lpips` package and its weights can be
        loaded, and otherwise a documented substitute: the Laplacian-pyramid L1 distance ("Lap1", Ling & Okada
        2006; the GLO loss of Bojanowski et al. 2018), which compares band-pass detail at every scale.

The paper's central ablation: "direct distillation" trains the same one-step student on the TEACHER's triplets
(its curved, hard-to-learn coupling) with the same budget (`distill_direct`); InstaFlow's claim is that reflow
first makes the coupling learnable (MS COCO 2017-5k FID 37.2 for direct distillation by progressive
distillation, 23.3 for reflow + distillation). `regression_error` measures how well a one-step student
reproduces the endpoints of the coupling it was trained on, on held-out noise.

The course's runs of these (the 2D recipe and its capacity sweep, the shipped digits models) are in
recipes/instaflow.py.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
from torch import Tensor, nn

from .. import distances
from ..conditioning import Cond
from ..guidance import cfg
from ..models import Denoiser, null_label
from ..train import Trained, TrainConfig, train
from . import reflow as rf


class Guided(nn.Module):
    """A conditional model with classifier-free guidance weight w baked in: forward(x, t, cond) -> guided Pred.

    Works for diffusion models (mixes x0 and eps) and flows alike: Pred mixes linearly, so the velocity
    eps - x0 of the mix is the mix of the velocities, u_w = (1 + w) u(. | y) - w u(. | null). Its `config`
    records w, so reflow pair caches (reflow.cached_pairs fingerprints config and weights) made with one
    guidance weight are never reused for another."""

    def __init__(self, model: Denoiser, w: float):
        super().__init__()
        null_label(model)                                   # refuses an unconditional model
        self.model, self.w = model, float(w)
        self.process = model.process

    def config(self) -> dict:
        return {**self.model.config(), "guidance_w": self.w}

    def forward(self, x: Tensor, t: Tensor, cond: Cond):
        return cfg(self.model, self.w)(x, t, cond)


def guided(model: Denoiser, w: float) -> Guided:
    """`model` with classifier-free guidance weight w (course convention; diffusers' guidance_scale = 1 + w)."""
    return Guided(model, w)


def triplets(teacher: Denoiser, w: float, cond: Cond, name: str, steps: int = 16, sampler: str = "dpmpp2m",
             seed: int = 0, noise_shape: tuple[int, ...] = (2,), cache_dir: str | os.PathLike = rf.CACHE_DIR,
             on_mismatch: str = "error", progress: bool = True, verbose: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 1: (eps (n, ...), x0 (n, ...), cond) with x0 the guided teacher's ODE solution from eps given the
    labels cond (conditioning.labels(y, num_classes), n of them).

    Cached like reflow pairs (data/cache/reflow/<name>-...): the cache is keyed by the teacher's weights, w,
    the solver, the steps, the seed and the labels, and a cache made by another teacher raises PairCacheError."""
    eps, x0 = rf.cached_pairs(guided(teacher, w), name, len(cond), steps, sampler, seed=seed, cache_dir=cache_dir,
                              cond=cond, noise_shape=noise_shape, on_mismatch=on_mismatch, progress=progress,
                              verbose=verbose)
    return eps, x0, cond


def distill_conditional_reflow(teacher: Denoiser, data: tuple[Tensor, Tensor, Cond], cfg: rf.ReflowConfig, *,
                               run: TrainConfig, ckpt_dir=None, accelerator=None, progress: bool = True
                               ) -> tuple[Denoiser, Trained]:
    """Stage 2: the 2-rectified flow trained on the teacher's triplets (eps, x0, cond), initialised from the teacher's
    weights (the diffusion output re-purposed as a velocity), labels dropped w.p. cfg.p_uncond (the course's 0.1):
    reflow.distill_reflow on triplets. Returns (the flow, eval, no grad; the engine's Trained)."""
    if cfg.p_uncond <= 0:
        raise ValueError("conditional reflow drops labels (cfg.p_uncond > 0) so that the flow keeps an "
                         f"unconditional velocity for guidance; got p_uncond = {cfg.p_uncond}")
    return rf.distill_reflow(teacher, data, cfg, run=run, ckpt_dir=ckpt_dir, accelerator=accelerator,
                             progress=progress)


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: one-step distillation, and the ablation's direct distillation
# ----------------------------------------------------------------------------------------------------------------

def one_step(model: Callable, eps: Tensor, cond: Cond | None = None) -> Tensor:
    """The one-step generator x0_hat = eps - u(eps, 1 | c): one Euler step of the flow from t = 1 to 0 (B, ...)."""
    t = torch.ones(eps.shape[0], dtype=eps.dtype, device=eps.device)
    pred = model(eps, t, cond)
    return eps - (pred.eps - pred.x0)


def onestep_loss(student: Callable, eps: Tensor, x0: Tensor, cond: Cond | None,
                 distance: Callable[[Tensor, Tensor], Tensor] = distances.l2) -> Tensor:
    """Per-sample distillation loss (B,): D(eps - u_theta(eps, 1 | c), x0), x0 the endpoint of the coupling.
    With D = l2 it equals reflow.distill_loss_at at t = 1 (the paper's || Z_1 - (Z_0 + v(Z_0, 0)) ||^2)."""
    return distance(one_step(student, eps, cond), x0)


@dataclasses.dataclass(frozen=True)
class OneStepConfig:
    """The one-step distillation's distance D: a name for distances.get ("l2", "lap1", ...) or a function
    (B, ...) x (B, ...) -> (B,)."""
    distance: str | Callable[[Tensor, Tensor], Tensor] = "l2"


def distill_onestep(init: Denoiser, data: tuple[Tensor, Tensor, Cond | None], cfg: OneStepConfig, *,
                    run: TrainConfig, ckpt_dir=None, accelerator=None, progress: bool = True
                    ) -> tuple[Denoiser, Trained]:
    """Train a one-step student, initialised from `init` (copied, relabelled as a flow), on data = (eps, x0, cond)
    (cond None: unconditional) with distance cfg.distance. Returns (the student, eval, no grad; the engine's
    Trained)."""
    distance = cfg.distance
    d = distances.get(distance)
    student = rf.as_flow(init).train().requires_grad_(True)
    eps, x0, cond = rf.split_pairs(data)

    def loss(model, batch, g):
        e, x, c = batch
        return onestep_loss(model, e, x, c, d)

    batches = rf.pair_batches(eps, x0, cond)
    done = train(student, loss, batches, run, ckpt_dir=ckpt_dir, progress=progress, accelerator=accelerator,
                 extra_config={"method": "instaflow-distill",
                               "distance": distance if isinstance(distance, str) else getattr(d, "__name__", "custom")})
    return done.best().eval().requires_grad_(False), done


def distill_direct(teacher: Denoiser, data: tuple[Tensor, Tensor, Cond | None], cfg: OneStepConfig, *,
                   run: TrainConfig, ckpt_dir=None, accelerator=None, progress: bool = True
                   ) -> tuple[Denoiser, Trained]:
    """The ablation's baseline: the same one-step student, initialised from the teacher, trained directly on the
    teacher's triplets (eps, x0 = guided teacher ODE(eps | y)), with no reflow in between."""
    return distill_onestep(teacher, data, cfg, run=run, ckpt_dir=ckpt_dir, accelerator=accelerator, progress=progress)


@torch.no_grad()
def regression_error(student: Callable, eps: Tensor, x0: Tensor, cond: Cond | None = None,
                     batch_size: int = 4096) -> float:
    """Held-out one-step regression error: mean over samples and dimensions of (one_step(student, eps | c) - x0)^2,
    x0 the endpoints of the coupling the student learns (the teacher's for direct distillation, the 2-RF's for
    InstaFlow), on noise it was not trained on."""
    total = 0.0
    for i in range(0, len(eps), batch_size):
        c = None if cond is None else cond[i:i + batch_size]
        total += float(distances.l2(one_step(student, eps[i:i + batch_size], c), x0[i:i + batch_size]).sum())
    return total / len(eps)
