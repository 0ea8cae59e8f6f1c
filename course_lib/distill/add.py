"""Adversarial diffusion distillation: ADD (Sauer, Lorenz, Blattmann & Rombach 2023, arXiv 2311.17042; SD-Turbo,
SDXL-Turbo), with LADD's discriminator features (Sauer et al. 2024, arXiv 2403.12015).

A student x_hat_theta(x_s, s), initialised from the teacher's weights, is trained to produce a sample in 1-4 steps.
Its inputs are REAL data noised to the student's times s in T_student = {1, 3/4, 1/2, 1/4} (SD's trailing grid
999, 749, 499, 249; s = 1 is pure noise), ADD Sec. 3.1:

    x0 ~ data,  s ~ U(T_student),  x_s = alpha_s x0 + sigma_s eps,  x_hat = x_hat_theta(x_s, s)          (B, ...)

Two losses train it (ADD Sec. 3, in the course's notation):

    adversarial (hinge, Sec. 3.2): a discriminator D = sum_k D_k(F_k(.)) of trainable heads on a FROZEN feature
        network F (ADD: DINOv2; here `feature_network`) tells real x0 from x_hat:
            L_adv^D = relu(1 - D(x0)) + relu(1 + D(sg x_hat)) + gamma / 2 ||grad_x D(x0)||^2  (R1 on REAL data)
            L_adv^G = -D(x_hat)
    score distillation (Sec. 3.3): re-noise the student's sample to a teacher time t and ask the frozen teacher
        where it would denoise it; the student moves towards that (a constant target):
            t ~ U(T_teacher),  x_hat_t = alpha_t x_hat + sigma_t eps',
            L_distill = c(t) || x_hat - sg( x_hat_psi(x_hat_t, t) ) ||^2,   c(t) = alpha_t  (ADD's "exponential")

    L_G = L_adv^G + lambda L_distill,   lambda = 2.5 (ADD's experiments)

Sampling: k steps on the trailing grid, denoise -> re-noise with fresh noise (`sample`; samplers.consistency on
grids.uniform(k)), the schedule of diffusers' SD-Turbo pipelines.

Networks seen by the method step (`add_step`, for `train.train_networks`): "discriminator" (its heads; updated
first each iteration), "student", and the frozen "teacher". Batches are dicts: "x" real samples (B, ...), optional
"cond" a Cond of labels (conditioning.labels; the heads then add a projection term; the student and teacher are
class-conditional).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .. import grids, samplers
from ..conditioning import Cond, labels, unpack
from ..config import announce_once, seeded
from ..predictions import Pred
from ..processes import AffineProcess
from ..train import Network, StepContext, Trained, TrainConfig, train_networks
from . import gan
from .dmd import generator_times
from .gan import DenoiserFeatures, RandomFeatures2D, adversarial, discriminator, guard

LAMBDA = 2.5          # ADD's experiments: the weight of the distillation loss
WEIGHTINGS = ("exponential", "sds", "none")


# --- the pieces of the method --------------------------------------------------------------------------------------

def student_times(k: int = 4) -> list[float]:
    """T_student: the k times the student is trained and sampled at, 1, (k-1)/k, ..., 1/k (ADD: 4 timesteps
    999, 749, 499, 249, diffusers' "trailing" spacing). s = 1 is pure noise."""
    return generator_times(k)


def student_input(x0: Tensor, s: Tensor, eps: Tensor, process: AffineProcess) -> Tensor:
    """x_s = alpha_s x0 + sigma_s eps: REAL data x0 (B, ...) noised to the student's times s (B,) (ADD Sec. 3.1)."""
    return process.marginal(x0, s, eps)


def distill_weight(t: Tensor, process: AffineProcess, weighting: str = "exponential") -> Tensor:
    """c(t) of the distillation loss (ADD Sec. 3.3 and its appendix), (B,): "exponential" c(t) = alpha_t (ADD's choice: the
    teacher's target counts less at high noise, where it is only the data mean), "sds" c(t) = sigma_t^2 (SDS's
    weighting w(t) in x0 space up to a constant), "none" c(t) = 1."""
    if weighting == "exponential":
        return process.alpha(t)
    if weighting == "sds":
        return process.sigma(t) ** 2
    if weighting == "none":
        return torch.ones_like(t)
    raise ValueError(f"unknown distillation weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def distillation_loss(x_hat: Tensor, teacher: Callable[..., Pred], t: Tensor, eps: Tensor, process: AffineProcess,
                      cond: Cond | None = None, weighting: str = "exponential") -> Tensor:
    """L_distill (ADD Sec. 3.3) per sample (B,): x_hat_t = alpha_t x_hat + sigma_t eps (t (B,), eps like x_hat), the
    teacher's x0 of it under stop-gradient (no graph through the teacher), c(t) ||x_hat - target||^2 as a mean
    over the data dimensions. Gradients reach x_hat (the student) only through its first occurrence."""
    with torch.no_grad():
        x_t = process.marginal(x_hat.detach(), t, eps)
        target = teacher(x_t, t, cond).x0
    return distill_weight(t, process, weighting) * (x_hat - target).pow(2).flatten(1).mean(1)


def discriminator_loss(D: Callable[[Tensor], Tensor], x_real: Tensor, x_fake: Tensor, r1_gamma: float = 0.0,
                       loss: str = "hinge") -> Tensor:
    """L_adv^D (ADD Sec. 3.2) per sample (B,): the hinge loss relu(1 - D(x_real)) + relu(1 + D(sg x_fake)) plus
    gamma / 2 R1 at the REAL samples (Mescheder et al. 2018; gan.r1_penalty). D: x (B, ...) -> logits (B,)."""
    return gan.discriminator_loss(D, x_real, x_fake, 0.5 * r1_gamma, loss)


def generator_adv_loss(D: Callable[[Tensor], Tensor], x_fake: Tensor, loss: str = "hinge") -> Tensor:
    """L_adv^G (ADD Sec. 3.2) per sample (B,): -D(x_hat) for the hinge loss (gradients flow through D to x_hat)."""
    _, g_loss = adversarial(loss)
    return g_loss(D(x_fake))


def d_time_labels(i: Tensor, student_steps: int) -> Cond:
    """The discriminator's conditioning of the course's variant (ADDConfig.d_time_cond): the index i (B,) of each
    sample's student time in T_student as a label, so the heads judge the student's outputs time by time. ADD
    conditions its discriminator on an embedding of the real image behind the student's input (c_img, Sec. 3.2);
    on 2D data with one unconditional discriminator, the outputs from pure noise (too wide) and those from low noise
    (too narrow) otherwise receive the same correction."""
    return labels(i, student_steps)


# --- the discriminator's feature network ---------------------------------------------------------------------------

DINO_ID = "facebook/dinov2-small"


def load_dinov2(model_id: str = DINO_ID) -> nn.Module | None:
    """DINOv2 ViT-S (ADD's feature network) from the local Hugging Face cache only (never the network), frozen; None
    when transformers or the weights are not there."""
    try:
        from transformers import AutoModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModel.from_pretrained(model_id, local_files_only=True)
    except Exception:  # noqa: BLE001 (absent weights raise OSError; a broken install anything)
        return None
    return model.requires_grad_(False).eval()


class DinoFeatures(nn.Module):
    """Frozen DINOv2 features of images x (B, C, H, W) in [-1, 1]: grey -> RGB, resized to 224, ImageNet-normalised;
    the CLS token of `layers` hidden states, each (B, width)."""

    def __init__(self, dino: nn.Module, layers: tuple[int, ...] = (3, 6, 9, 12)):
        super().__init__()
        self.dino, self.layers = dino, layers
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x) * 0.5 + 0.5
        x = torch.nn.functional.interpolate(x, size=224, mode="bilinear", align_corners=False)
        hidden = self.dino(pixel_values=(x - self.mean) / self.std, output_hidden_states=True).hidden_states
        return [hidden[i][:, 0] for i in self.layers]


def feature_network(kind: str, teacher: nn.Module | None = None, t_range: tuple[float, float] = (0.0, 0.75),
                    seed: int = 0) -> nn.Module:
    """The frozen feature network F of the discriminator:
        "random2d"  2D points: gan.RandomFeatures2D (a frozen random MLP; no pretrained network exists for the plane);
        "teacher"   images: the frozen teacher's own layers on re-noised inputs, t ~ U(t_range) (LADD; no download);
        "dinov2"    images: DINOv2 ViT-S (ADD's choice) from the local cache; when it cannot be loaded offline, say
                    so loudly and fall back to "teacher" (the documented offline features)."""
    if kind == "random2d":
        return RandomFeatures2D(seed=seed)
    if kind not in ("teacher", "dinov2"):
        raise ValueError(f"unknown feature network {kind!r}; valid: random2d, teacher, dinov2")
    if teacher is None:
        raise ValueError(f"feature network {kind!r} needs the teacher (the offline fallback reads its layers)")
    if kind == "dinov2":
        dino = load_dinov2()
        if dino is not None:
            return DinoFeatures(dino)
        announce_once("add-dinov2", f"ADD: the DINOv2 feature network ({DINO_ID}) could not be loaded offline (not in "
                      "the local Hugging Face cache, or transformers is missing). Falling back to LADD's features: the "
                      "frozen teacher's own layers on re-noised inputs. To use DINOv2, download it once with network "
                      f"access (huggingface-cli download {DINO_ID}).")
    frozen = copy.deepcopy(teacher).requires_grad_(False).eval()
    return DenoiserFeatures(frozen, t_range=t_range)


# --- the method step -----------------------------------------------------------------------------------------------

@dataclass
class ADDConfig:
    """One ADD run. The defaults are ADD's, with budgets for the course's toy scale."""
    adversarial: bool = True        # the adversarial term (ablation: distillation only)
    distill: bool = True            # the score-distillation term (ablation: adversarial only)
    lambda_distill: float = LAMBDA  # lambda of L_G = L_adv + lambda L_distill (ADD: 2.5)
    weighting: str = "exponential"  # c(t): "exponential" (alpha_t, ADD's), "sds", "none"
    teacher_t: tuple[float, float] = (0.02, 0.98)   # T_teacher: t ~ U(lo, hi) of the distillation loss
    student_steps: int = 4          # |T_student| (ADD: 4)
    r1_gamma: float = 1e-4          # R1 weight gamma (penalty gamma / 2 ||grad D(x0)||^2); 0 turns R1 off
    r1_every: int = 1               # lazy R1 (StyleGAN2; GDD uses 16): every r1_every-th D update, weight x r1_every
    loss: str = "hinge"             # adversarial loss: "hinge" (ADD) or "ns"
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.99)
    grad_clip: float = 10.0
    d_every: int = 1                # discriminator updates on iterations with step % d_every == 0
    ema_decay: float = 0.0          # student EMA for sampling (0: none)
    max_loss: float = 1e4           # guard: a loss above this (or NaN) stops the run
    d_time_cond: bool = False       # the course's variant: heads conditioned on the index of the student's time s
                                    # (a projection term, `d_time_labels`); real x0 get the index of their own x_s


def add_step(cfg: ADDConfig, process: AffineProcess, distill_fn: Callable | None = None,
             disc_fn: Callable | None = None) -> Callable[[StepContext, Mapping[str, Tensor]], Tensor]:
    """The ADD method step for train_networks (nets "discriminator", "student", frozen "teacher"):

    discriminator phase: x_hat = student(x_s, s) without grad, L = L_adv^D(x0, x_hat) (hinge + gamma/2 R1 on x0)
    student phase:       x_hat = student(x_s, s),  L = L_adv^G(x_hat) + lambda c(t) ||x_hat - sg teacher(x_hat_t)||^2

    distill_fn(x_hat, teacher, t, eps, process, cond) -> (B,) and disc_fn(D, x_real, x_fake, r1_gamma) -> (B,)
    replace the library's losses (a notebook's exercises); cond is the batch's conditioning (labels) or None.
    """
    times = torch.tensor(student_times(cfg.student_steps))
    if distill_fn is None:
        distill_fn = lambda x_hat, T, t, eps, proc, c: distillation_loss(x_hat, T, t, eps, proc, c, cfg.weighting)
    if disc_fn is None:
        disc_fn = lambda D, x_real, x_fake, gamma: discriminator_loss(D, x_real, x_fake, gamma, cfg.loss)

    def student_sample(ctx: StepContext, x0: Tensor, cond: Cond | None) -> tuple[Tensor, Tensor]:
        g = ctx.generator
        i = torch.randint(len(times), (len(x0),), generator=g, device=g.device).cpu()
        s = times[i].to(x0.device)                                                        # (B,) s ~ U(T_student)
        eps = torch.randn(x0.shape, generator=g, device=g.device).to(x0)
        x_s = student_input(x0, s, eps, process)
        G = ctx.nets["student"]
        return G(x_s, s, cond).x0, i

    def disc(ctx: StepContext, cond: Cond | None, i: Tensor, device: torch.device) -> Callable[[Tensor], Tensor]:
        d_cond = d_time_labels(i.to(device), cfg.student_steps) if cfg.d_time_cond else cond
        return lambda x: ctx.nets["discriminator"](x, d_cond, ctx.generator)

    def step(ctx: StepContext, batch: Mapping[str, Tensor]) -> Tensor:
        x0, cond = unpack(batch)
        g = ctx.generator
        if cfg.d_time_cond and cond is not None:
            raise ValueError("d_time_cond conditions the discriminator on the student's time; it cannot also take "
                             "the batch's labels (use it on unconditional data)")
        if ctx.phase == "discriminator":
            with torch.no_grad():
                x_hat, i = student_sample(ctx, x0, cond)
            D = disc(ctx, cond, i, x0.device)
            lazy = ctx.step % (cfg.r1_every * cfg.d_every) == 0
            gamma = cfg.r1_gamma * cfg.r1_every if lazy else 0.0
            with gan.math_attention() if gamma > 0 else contextlib.nullcontext():
                loss = disc_fn(D, x0, x_hat, gamma)
            return guard(loss, "discriminator", ctx.step, cfg.max_loss)
        x_hat, i = student_sample(ctx, x0, cond)
        D = disc(ctx, cond, i, x0.device)
        loss = torch.zeros(len(x0), device=x0.device)
        if cfg.adversarial:
            loss = loss + generator_adv_loss(D, x_hat, cfg.loss)
        if cfg.distill:
            lo, hi = cfg.teacher_t
            t = (lo + (hi - lo) * torch.rand(len(x0), generator=g, device=g.device)).to(x0.device)
            eps = torch.randn(x0.shape, generator=g, device=g.device).to(x0)
            loss = loss + cfg.lambda_distill * distill_fn(x_hat, ctx.nets["teacher"], t, eps, process, cond)
        return guard(loss, "student", ctx.step, cfg.max_loss)

    return step


def distill_add(teacher: nn.Module, data: Callable[[int, torch.Generator], Mapping[str, Tensor]], cfg: ADDConfig, *,
                run: TrainConfig, features: nn.Module, example: Mapping[str, Any], init: str = "teacher",
                hidden: int = 64, init_seed: int = 0, distill_fn: Callable | None = None,
                disc_fn: Callable | None = None, ckpt_dir=None, accelerator=None, progress: bool = True
                ) -> tuple[nn.Module, Trained]:
    """Train an ADD student on data(n, g) -> {"x": x0, "cond": Cond (optional)}. init "teacher" copies the teacher's
    weights (ADD); "scratch" re-initialises the same architecture (seed init_seed), the ablation the paper reports
    as failing. `features` is the frozen feature network (`feature_network`); the heads are sized on `example`, a
    batch {"x": (B, ...), "cond": Cond (class-projection heads) or absent}. With cfg.adversarial False the
    discriminator is not trained (distillation only). Returns (the student to sample from: its EMA when
    ema_decay > 0, eval, no grad; Trained). distill_fn, disc_fn: see add_step."""
    if init not in ("teacher", "scratch"):
        raise ValueError(f"init is 'teacher' (ADD) or 'scratch'; got {init!r}")
    if not (cfg.adversarial or cfg.distill):
        raise ValueError("ADD needs at least one of its losses: set adversarial or distill (or both)")
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    if init == "scratch":
        with seeded(init_seed):
            for m in student.modules():
                if m is not student and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    x_example, cond_example = example["x"], example.get("cond")
    if cfg.d_time_cond:                 # heads with one embedding per student time
        cond_example = d_time_labels(torch.zeros(len(x_example), dtype=torch.long), cfg.student_steps)
    with seeded(init_seed + 1):
        D = discriminator(features, x_example, hidden, cond_example)
    nets = {"discriminator": Network(D, lr=cfg.lr_d, betas=cfg.betas, grad_clip=cfg.grad_clip, every=cfg.d_every)}
    if not cfg.adversarial:          # distillation only: no discriminator to train
        nets = {}
    nets["student"] = Network(student, lr=cfg.lr_g, betas=cfg.betas, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay)
    frozen = copy.deepcopy(teacher).requires_grad_(False).eval()
    done = train_networks(nets, add_step(cfg, teacher.process, distill_fn, disc_fn), data, run,
                          frozen={"teacher": frozen}, ckpt_dir=ckpt_dir, progress=progress, accelerator=accelerator,
                          extra_config={"method": "add", "init": init, **asdict(cfg)})
    return done.best("student").eval().requires_grad_(False), done


def sample(G: Callable[..., Pred], z: Tensor, k: int, process: AffineProcess, generator: torch.Generator | None = None,
           cond: Cond | None = None, noises: Tensor | None = None) -> Tensor:
    """k-step ADD sampling from z = x_1 (B, ...) on the trailing grid t_i = 1 - i / k (i = 0..k-1; SD-Turbo's 999,
    749, 499, 249 for k = 4): x0 = G(x, t_i).x0, then x = alpha x0 + sigma eps at t_{i+1} with fresh eps (noises[i]
    (k - 1, B, ...) when given, else drawn from `generator`), and the last x0 is the sample: samplers.multistep with
    a clean denoised point on grids.trailing(k), ending at x0 itself rather than at t = 0."""
    return samplers.multistep(G, z, grids.trailing(k), process, cond=cond, denoised="clean", noises=noises,
                              generator=generator)


__all__ = ["LAMBDA", "ADDConfig", "DinoFeatures", "add_step", "d_time_labels", "discriminator_loss", "distill_add",
           "distill_weight", "distillation_loss", "feature_network", "generator_adv_loss", "load_dinov2", "sample",
           "student_input", "student_times"]
