"""Guided distillation (Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023, arXiv 2210.03142).

Classifier-free guidance costs two network evaluations per sampling step, conditional and unconditional
(course convention, Meng's and LCM's; Imagen / diffusers' guidance_scale s = 1 + w):

    x0_w(z_t) = (1 + w) x0(z_t, t | y) - w x0(z_t, t | null)

Meng et al. remove both costs, the second evaluation and the many steps, in two stages:

Stage 1 (Sec. 3.1): one w-conditioned student x_hat_eta1(z_t, t, c) with c = (y, w) (the course's
`cond.with_w(w)`) learns the guided teacher for every
w in [w_min, w_max] at once (w enters through a Fourier embedding added to the time embedding:
`models.with_guidance_input`):

    w ~ U[w_min, w_max],  t ~ U(t_min, 1),  z_t = alpha_t x + sigma_t eps,  (x, y) ~ data
    L(eta1) = max(alpha_t^2 / sigma_t^2, 1) || x_hat_eta1(z_t, t, y, w) - x0_w(z_t) ||^2

(the paper writes a generic weighting omega(lambda_t); the course uses PD's truncated SNR, as for stage 2).

Stage 2 (Sec. 3.2): progressive distillation (course_lib.distill.pd, unchanged) of the stage-1 student, w kept
as an input: the batches carry Cond(y=y, null_y=num_classes, w=w) with w ~ U[w_min, w_max] per sample, and teacher and
student see the same w. A student for a step count not reachable by halving is refused by pd.check_halving;
a w outside [w_min, w_max] by the student's guidance embedding.

Course choice beside the paper's w ~ U[w_min, w_max]: `p_w_min` (default 0, the paper's plain uniform) draws
w = w_min exactly with probability p_w_min, the rest uniform, in stage 1 (`draw_w` in `guided_loss`) and in
every stage-2 round (`guided_batches`). Why: on the course's gmm-overlap benchmark the guided teacher's class
accuracy is steepest in w at the boundary (87% at w = 0, about 99% at w = 0.25), where uniform w puts little
training mass and the learned function of w is least constrained, and PD compounds the error each round. With
the plain uniform the students came out over-guided at w = 0 (`bench guided --mode laptop`: teacher 0.870,
4-step student 0.904, 1-step 0.934); with p_w_min = 0.25 (`recipes.guided.P_W_MIN`) the same run gives 0.886
and 0.890 (+1.6 and +1.9 points; SWD 1.04x and 1.14x the teacher's), w = 1, 2, 4 unchanged. Part of what is
left is the sampler, not the student: the conditional teacher itself sampled with 64 DDIM steps (the sampler
stage 2 distils) gives 0.882, with 16 DDIM steps 0.908.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
from torch import Tensor

from ..conditioning import Cond, unpack
from ..guidance import cfg
from ..models import Denoiser, guidance_range, null_label, with_guidance_input
from ..processes import AffineProcess
from ..train import Trained, TrainConfig, train
from . import pd


def draw_w(n: int, w_range: tuple[float, float], generator: torch.Generator, p_w_min: float = 0.0) -> Tensor:
    """w, shape (n,), on the generator's device: w = w_min with probability p_w_min, else w ~ U[w_min, w_max].

    p_w_min = 0 (the default) is the paper's plain U[w_min, w_max]; see the module docstring for the course's
    p_w_min > 0."""
    if not 0.0 <= p_w_min <= 1.0:
        raise ValueError(f"p_w_min is a probability; got {p_w_min}")
    w_min, w_max = w_range
    w = w_min + (w_max - w_min) * torch.rand(n, generator=generator, device=generator.device)
    if p_w_min > 0:
        at_min = torch.rand(n, generator=generator, device=generator.device) < p_w_min
        w = torch.where(at_min, torch.full_like(w, w_min), w)
    return w


@torch.no_grad()
def guided_target(teacher: Callable, z_t: Tensor, t: Tensor, cond: Cond, w: Tensor) -> Tensor:
    """x0_w (B, ...): the guided teacher's x-prediction (1 + w) x0(z_t | y) - w x0(z_t | null), one batched call.

    z_t (B, ...), t (B,), cond the labels (conditioning.labels(y, num_classes)), w (B,) guidance weights (or a
    float); teacher(x, t, cond) -> Pred."""
    return cfg(teacher, w)(z_t, t, cond).x0


def guided_loss_at(student: Callable, teacher: Callable, x0: Tensor, cond: Cond, t: Tensor, eps: Tensor, w: Tensor,
                   process: AffineProcess) -> Tensor:
    """Stage-1 loss (B,) at given t (B,), eps (B, ...), w (B,): truncated-SNR-weighted squared error between the
    student's x-prediction x_hat(z_t, t, (y, w)) and the guided teacher's x0_w(z_t)."""
    z_t = process.marginal(x0, t, eps)                                            # (B, ...)
    x0_w = guided_target(teacher, z_t, t, cond, w)                                # (B, ...)
    x_hat = student(z_t, t, cond.with_w(w)).x0                                 # (B, ...)
    weight = (process.alpha(t) ** 2 / process.sigma(t) ** 2).clamp_min(1.0)      # max(SNR, 1), (B,)
    return weight * (x_hat - x0_w).pow(2).flatten(1).mean(1)


def guided_loss(student: Denoiser, teacher: Callable, x0: Tensor, cond: Cond, w_range: tuple[float, float],
                generator: torch.Generator, t_min: float = 1e-3, p_w_min: float = 0.0) -> Tensor:
    """Stage-1 loss (B,) with w from draw_w (U[w_min, w_max], w_min with probability p_w_min), t ~ U(t_min, 1),
    eps ~ N(0, I) drawn from `generator`."""
    B = x0.shape[0]
    w = draw_w(B, w_range, generator, p_w_min).to(x0)
    t = t_min + (1 - t_min) * torch.rand(B, generator=generator, device=generator.device).to(x0)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
    return guided_loss_at(student, teacher, x0, cond, t, eps, w, student.process)


@dataclasses.dataclass(frozen=True)
class GuidedConfig:
    """Stage 1: w ~ U[w_range] (w_range[0] exactly with probability p_w_min: the module docstring), t ~ U(t_min, 1)."""
    w_range: tuple[float, float]
    t_min: float = 1e-3
    p_w_min: float = 0.0


def distill_guidance(teacher: Denoiser, data: Callable[[int, torch.Generator], dict],
                     cfg: GuidedConfig, *, run: TrainConfig, ckpt_dir=None, accelerator=None,
                     progress: bool = True) -> tuple[Denoiser, Trained]:
    """Stage 1: train a w-conditioned student (a copy of `teacher` plus a guidance embedding on cfg.w_range) on the
    guided teacher.

    data(n, g) -> {"x": x0 (n, ...), "cond": cond} draws labelled data (cond = conditioning.labels(y, K);
    `conditioning.labelled` wraps an (x0, y) sampler). The teacher must be class-conditional with null label
    num_classes (trained with label dropout). Returns (the student: its EMA when run.ema_decay > 0, eval, no grad;
    the engine's Trained). Resumes from ckpt_dir like every course training run."""
    null_label(teacher)                           # guided distillation needs a class-conditional teacher
    w_range = tuple(cfg.w_range)
    frozen = copy.deepcopy(teacher).eval().requires_grad_(False)
    student = with_guidance_input(teacher, w_range)

    def loss(model, batch, g):
        x0, cond = unpack(batch)
        return guided_loss(model, frozen, x0, cond, w_range, g, cfg.t_min, cfg.p_w_min)

    done = train(student, loss, data, run, ckpt_dir=ckpt_dir, progress=progress, accelerator=accelerator,
                 extra_config={"method": "guided-distillation-stage1", "w_range": list(w_range),
                               "p_w_min": cfg.p_w_min})
    return done.best().eval().requires_grad_(False), done


def guided_batches(sample_data: Callable[[int, torch.Generator], dict],
                   w_range: tuple[float, float], p_w_min: float = 0.0
                   ) -> Callable[[int, torch.Generator], dict]:
    """Stage 2's sample_batch for pd: (n, g) -> {"x": x0, "cond": cond.with_w(w)} with w from draw_w per
    sample (U[w_min, w_max], w_min with probability p_w_min)."""

    def sample_batch(n: int, g: torch.Generator) -> dict:
        x0, cond = unpack(sample_data(n, g))
        return {"x": x0, "cond": cond.with_w(draw_w(n, w_range, g, p_w_min).to(x0))}

    return sample_batch


@dataclasses.dataclass(frozen=True)
class StepsConfig:
    """Stage 2: PD's rounds n_start/2, ..., n_end (pd.PDConfig) with w drawn as in stage 1 (p_w_min)."""
    n_start: int
    n_end: int = 1
    p_w_min: float = 0.0


def distill_steps(student: Denoiser, data: Callable[[int, torch.Generator], dict], cfg: StepsConfig, *,
                  run: TrainConfig | Callable[[int], TrainConfig], ckpt_dir=None, accelerator=None,
                  progress: bool = True, rounds: dict[int, Denoiser] | None = None) -> tuple[Denoiser, Trained]:
    """Stage 2: progressive distillation (pd.distill_pd) of a stage-1 student from cfg.n_start DDIM steps to
    cfg.n_end, w as an input. The w range is the student's own (its guidance embedding's). Returns (the final
    student; the last round's Trained); `rounds`, a dict, is filled with {student steps: student}."""
    w_range = guidance_range(student)
    if w_range is None:
        raise ValueError("stage 2 distills a guided student (stage 1's output, which takes w as an input); "
                         "this model has no guidance input")
    return pd.distill_pd(student, guided_batches(data, w_range, cfg.p_w_min), pd.PDConfig(cfg.n_start, cfg.n_end),
                         run=run, ckpt_dir=ckpt_dir, accelerator=accelerator, progress=progress, rounds=rounds)
