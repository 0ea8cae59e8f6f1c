"""GDD and GDD-I: "Diffusion Models Are Innate One-Step Generators" (Zheng & Yang, arXiv 2405.20750; Zyriix/GDD).

GDD fine-tunes the teacher into a one-step generator with a GAN loss ALONE: no distillation term, the teacher only
gives the initialisation (the paper's "exclusive distributional loss", teacher_type='none' in its code).

    z ~ N(0, I),  x_g = G_theta(z) = D_theta(sigma_max z; sigma_max)          (EDM: G(80 z, 80))
    L_G = softplus(-D_phi(x_g))                                                (non-saturating, Goodfellow et al. 2014)
    L_D = softplus(D_phi(sg x_g)) + softplus(-D_phi(x_real))
          + [k % r1_every == 0] r1_every gamma / 2 ||grad_x D_phi(x_real)||^2  (lazy R1 on REAL samples, StyleGAN2)

The generator is the teacher's denoiser with GDD's preconditioning (`GDDPrecond` in the paper's code): EDM's
c_skip, c_out moved so that the boundary condition D(x; sigma_min) = x holds (a consistency-model parameterisation,
Song et al. 2023), with eps = sigma_min = 0.002 and sigma_data = 0.5:

    c_skip = sd^2 / ((sigma - eps)^2 + sd^2),   c_out = (sigma - eps) sd / sqrt(sigma^2 + sd^2)

The course's teachers are vp-cosine models. A VP model IS an EDM model in the variables x_ve = x / alpha_t,
sigma_ve = sigma_t / alpha_t (Karras et al. 2022, Sec. 2 and Table 1), so `GDDPrecond` applies the paper's scalings
at sigma_ve, to the backbone's EDM output F recovered from the teacher's x0 prediction. At t = 1 of vp-cosine
sigma_ve ~ 2.2e4 (EDM's generator runs at sigma = 80): c_skip ~ 1e-9 and c_out equals EDM's own c_out to 1e-7, so the
generator STARTS as the teacher's one-step prediction x0_hat(z, 1), exactly as GDD starts from EDM's D(80 z; 80).

GDD-I (`--freeze=1` in the code): the parameters whose NAME contains one of (block | up | down | in) AND one of
(conv | proj) are removed from the optimizer (`paper_frozen`): the convolutions of the UNet blocks and the attention
output projections. Norms, noise/label embeddings, the embedding projections ("affine"), skips and qkv stay
trainable. `frozen_name` translates the rule to the course's backbones (diffusers UNet2DModel and MLP2D).

Networks for `train.train_networks` (`gdd_step`): "generator" (a GDDPrecond, possibly partly frozen) and
"discriminator" (gan.Discriminator: trainable heads on a FROZEN feature network), updated 1:1 (paper). Batches are
dicts: "x" real samples (B, ...), optional "cond" (a Cond of labels).
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import precond
from ..conditioning import Cond, unpack
from ..train import Network, StepContext, Trained, TrainConfig, train_networks
from . import gan
from .gan import DenoiserFeatures, discriminator, generate_one_step, guard, ns_g, tapped, trainable_fraction

SIGMA_MIN = 0.002     # GDDPrecond's eps: the boundary condition D(x; eps) = x (EDM's sigma_min)
SIGMA_DATA = 0.5      # EDM's sigma_data


# --- the generator: GDD's preconditioning on a course model ---------------------------------------------------------

class GDDPrecond(precond.Boundary):
    """A course model (x, t[, y]) -> Pred with GDD's preconditioning (precond.Boundary with the "gdd" scalings): in
    EDM variables x_ve = x / alpha_t, sigma = sigma_t / alpha_t, with F = (x0_hat - c_skip^EDM x_ve) / c_out^EDM the
    backbone's EDM output,

        D(x, t) = c_skip^GDD(sigma) x_ve + c_out^GDD(sigma) F                                   (B, ...)

    i.e. D = x0_hat + (c_skip^GDD - r c_skip^EDM) x_ve + (r - 1) x0_hat with r = c_out^GDD / c_out^EDM. For an edm
    model alpha = 1 and this is the paper's GDDPrecond on the same network. D(x, t) = x / alpha at sigma = eps."""

    def __init__(self, model: nn.Module, eps: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA):
        super().__init__(model, "gdd", eps=eps, sigma_data=sigma_data)

    @property
    def eps(self) -> float:
        return self.params["eps"]

    @property
    def sigma_data(self) -> float:
        return self.params["sigma_data"]


def generator(teacher: nn.Module, freeze: str = "none") -> GDDPrecond:
    """A trainable GDD generator: a copy of the teacher in GDDPrecond, with the `freeze` rule applied (FREEZE)."""
    G = GDDPrecond(copy.deepcopy(teacher)).requires_grad_(True).train()
    apply_freeze(G, freeze)
    return G


# --- GDD-I: which parameters are frozen ----------------------------------------------------------------------------

def paper_frozen(name: str) -> bool:
    """The paper code's rule (train.py, --freeze=1), literally: frozen when the parameter name contains one of
    'block', 'up', 'down', 'in' AND one of 'conv', 'proj' (EDM/ADM names: enc.16x16_block0.conv0.weight,
    dec.8x8_block2.proj.weight; the affine, norm, qkv, skip and map_* embedding parameters stay trainable)."""
    return any(k in name for k in ("block", "up", "down", "in")) and any(k in name for k in ("conv", "proj"))


# The same roles in the course's backbones (the substring rule read literally would freeze the wrong things here:
# diffusers' 'time_emb_proj' (EDM's 'affine') and 'conv_shortcut' (EDM's 'skip') contain proj/conv, and every
# MLP2D name contains 'in'):
#   UNet2DModel: resnets.*.conv1/conv2 (EDM conv0/conv1), down/upsamplers.*.conv (the resampling blocks' convs),
#                attentions.*.to_out (EDM's attention 'proj'). Trainable: conv_in, conv_out (EDM's enc.*_conv and
#                aux_conv stay trainable in the paper too: their names hold no block/up/down/in), conv_shortcut,
#                time_emb_proj, norms, time/class embeddings, to_q/to_k/to_v.
#   MLP2D:       the hidden layers' linear maps net.inp and net.layers.* (its "convolutions"). Trainable: the time
#                embedding MLP net.time_mlp, its per-layer projections net.emb_proj.* (EDM's affine), net.out.
UNET_FROZEN = re.compile(r"(resnets\.\d+\.conv[12]|(down|up)samplers\.\d+\.conv|attentions\.\d+\.to_out\.\d+)\.")
MLP_FROZEN = re.compile(r"(^|\.)net\.(inp|layers\.\d+)\.")


def frozen_name(name: str) -> bool:
    """GDD-I's rule on a course model's parameter name (see the table above): True = frozen."""
    return bool(UNET_FROZEN.search(name) or MLP_FROZEN.search(name))


# Wider rules for the sweep "frozen fraction vs one-step quality" (the paper's --freeze=2, 3 also freeze qkv / skips;
# "embeddings-only" trains nothing but the time / label embeddings and the norms).
WIDER = re.compile(r"(attentions\.\d+\.to_[qkv]\.|conv_shortcut\.)")
EMBEDDINGS = re.compile(r"(time_embedding|class_embedding|time_mlp|class_emb\.|norm)")

FREEZE: dict[str, Callable[[str], bool]] = {
    "none": lambda n: False,                                     # GDD: every parameter trains
    "gdd-i": frozen_name,                                        # GDD-I
    "gdd-i+": lambda n: frozen_name(n) or bool(WIDER.search(n)), # + qkv and skips (the code's --freeze=2/3)
    "embeddings-only": lambda n: not EMBEDDINGS.search(n),       # only the time / label embeddings and norms
}


def apply_freeze(model: nn.Module, rule: str | Callable[[str], bool]) -> float:
    """requires_grad_(False) on the parameters `rule` (a FREEZE key or name -> bool) freezes; returns the trained
    fraction of the parameters (by count)."""
    if isinstance(rule, str) and rule not in FREEZE:
        raise ValueError(f"unknown freezing rule {rule!r}; valid: {', '.join(FREEZE)}")
    fn = FREEZE[rule] if isinstance(rule, str) else rule
    for n, p in model.named_parameters():
        p.requires_grad_(not fn(n))
    return trainable_fraction(model)


# --- the losses ----------------------------------------------------------------------------------------------------

def generator_loss(d_fake: Tensor) -> Tensor:
    """L_G = softplus(-D(x_g)) per sample (B,) from the discriminator's logits (B,) (non-saturating)."""
    return ns_g(d_fake)


def discriminator_loss(D: Callable[[Tensor], Tensor], x_real: Tensor, x_fake: Tensor, r1_weight: float) -> Tensor:
    """L_D per sample (B,): softplus(D(sg x_fake)) + softplus(-D(x_real)) + r1_weight ||grad_x D(x_real)||^2,
    the R1 term on REAL samples only (skipped when r1_weight == 0): gan.discriminator_loss with the
    non-saturating loss. D: x (B, ...) -> logits (B,)."""
    return gan.discriminator_loss(D, x_real, x_fake, r1_weight, "ns")


# --- the method step -----------------------------------------------------------------------------------------------

@dataclass
class GDDConfig:
    """One GDD / GDD-I run (paper code defaults where they transfer; budgets from the notebook/benchmark)."""
    freeze: str = "none"             # "none" (GDD), "gdd-i" (GDD-I), or a wider FREEZE rule for the sweep
    gamma: float = 1e-4              # R1 weight gamma (paper: 1e-4 with ImageNet features; the course's is per data)
    r1_every: int = 16               # lazy R1: every r1_every discriminator updates, weight r1_every * gamma / 2
    lr_g: float = 1e-4               # paper CIFAR-10: 1e-4 / 1e-4
    lr_d: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.99)   # paper: Adam (0, 0.99)
    ema_decay: float = 0.0           # generator EMA (paper: half-life 0.5 Mimg)
    lr_schedule: str = "constant"    # both networks' learning rates over the run (paper: constant; "cosine" anneals)
    grad_clip: float | None = None   # paper: none (nan_to_num instead)
    max_loss: float = 1e4            # guard: a loss above this (or NaN) stops the run


def gdd_step(cfg: GDDConfig) -> Callable[[StepContext, Mapping[str, Tensor]], Tensor]:
    """The GDD step for train_networks (nets "generator", "discriminator"; 1:1 updates):

    generator phase:     L_G = softplus(-D(G(z)))
    discriminator phase: L_D = softplus(D(sg G(z))) + softplus(-D(x)) (+ lazy R1 on x every r1_every updates)
    """

    def step(ctx: StepContext, batch: Mapping[str, Tensor]) -> Tensor:
        x_real, cond = unpack(batch)
        g = ctx.generator
        G, Dnet = ctx.nets["generator"], ctx.nets["discriminator"]
        D = lambda x: Dnet(x, cond, g)                                                     # (B, ...) -> (B,)
        z = torch.randn(x_real.shape, generator=g, device=g.device).to(x_real)
        if ctx.phase == "generator":
            x_g = generate_one_step(G, z, cond)
            return guard(generator_loss(D(x_g)), "generator", ctx.step, cfg.max_loss)
        with torch.no_grad():
            x_g = generate_one_step(G, z, cond)
        lazy = cfg.r1_every > 0 and ctx.step % cfg.r1_every == 0
        w = cfg.r1_every * cfg.gamma / 2 if lazy and cfg.gamma > 0 else 0.0
        return guard(discriminator_loss(D, x_real, x_g, w), "discriminator", ctx.step, cfg.max_loss)

    return step


def _nan_to_num_hook(p: nn.Parameter) -> None:
    # the paper's code: nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5) before each optimizer step
    p.register_hook(lambda grad: torch.nan_to_num(grad, nan=0.0, posinf=1e5, neginf=-1e5))


def distill_gdd(teacher: nn.Module, data: Callable[[int, torch.Generator], Mapping[str, Tensor]], cfg: GDDConfig, *,
                run: TrainConfig, disc: nn.Module, ckpt_dir=None, accelerator=None, progress: bool = True
                ) -> tuple[GDDPrecond, Trained]:
    """GDD (cfg.freeze = "none") or GDD-I ("gdd-i") of `teacher` against the discriminator `disc` (gan.Discriminator,
    trainable heads on frozen features; a fresh one per run). Returns (the generator: its EMA when ema_decay > 0, eval,
    no grad; Trained, whose logs hold "trained_fraction")."""
    G = generator(teacher, cfg.freeze)
    for p in [*G.parameters(), *disc.parameters()]:
        if p.requires_grad:
            _nan_to_num_hook(p)
    nets = {"generator": Network(G, lr=cfg.lr_g, betas=cfg.betas, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
                                 lr_schedule=cfg.lr_schedule),
            "discriminator": Network(disc, lr=cfg.lr_d, betas=cfg.betas, grad_clip=cfg.grad_clip,
                                     lr_schedule=cfg.lr_schedule)}
    done = train_networks(nets, gdd_step(cfg), data, run, ckpt_dir=ckpt_dir, progress=progress,
                          accelerator=accelerator, extra_config={"method": "gdd-i" if cfg.freeze != "none" else "gdd",
                                                                 **asdict(cfg)})
    done.logs["trained_fraction"] = [trainable_fraction(G)]
    return done.best("generator").eval().requires_grad_(False), done


# --- "innately one-step": how much each layer's activations depend on the timestep ----------------------------------

def time_share(acts: Tensor) -> Tensor:
    """The share of a layer's activation variance explained by the timestep (eta^2 of a one-way ANOVA, per channel,
    averaged over channels), from acts (K, B, C, ...) of the layer at K timesteps on B inputs each:

        mu_k = E_b acts[k]  (per channel, spatial positions pooled with the inputs)
        between = Var_k(mu_k),  within = E_k Var_b(acts[k]),  share = between / (between + within)   in [0, 1]

    ~0: the layer computes the same statistics at every timestep; 1: its output depends on the timestep alone."""
    if acts.ndim < 3:
        raise ValueError(f"acts must be (K timesteps, B inputs, C channels, ...); got shape {tuple(acts.shape)}")
    a = acts.double().movedim(2, -1).reshape(acts.shape[0], -1, acts.shape[2])        # (K, B * spatial, C)
    mu = a.mean(1)                                                                    # (K, C)
    between = mu.var(0, unbiased=False)                                               # (C,)
    within = a.var(1, unbiased=False).mean(0)                                         # (C,)
    return (between / (between + within).clamp_min(1e-12)).mean()


def layer_modules(model: nn.Module) -> list[str]:
    """The layers the activation statistic reads: every Linear / Conv2d of the model, in call order of definition."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@torch.no_grad()
def activations(model: nn.Module, x0: Tensor, times: Sequence[float], names: Sequence[str], generator: torch.Generator,
                cond: Cond | None = None) -> dict[str, Tensor]:
    """{layer: acts (K, B, C, ...)}: the outputs of the named layers of `model` on x_t = alpha_t x0 + sigma_t eps
    (fresh eps per time, from `generator`) at each of the K `times`, on the same clean samples x0 (B, ...)."""
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for t in times:
        tt = torch.full((len(x0),), float(t), device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
        with tapped(model, names) as got:
            model(model.process.marginal(x0, tt, eps), tt, cond)
        for n in names:
            out[n].append(got[n].detach().cpu())
    return {n: torch.stack(v) for n, v in out.items()}


def layer_time_shares(model: nn.Module, x0: Tensor, times: Sequence[float], generator: torch.Generator,
                      cond: Cond | None = None, names: Sequence[str] | None = None) -> dict[str, float]:
    """{layer: time_share} for every Linear / Conv2d layer of `model` (or `names`)."""
    names = list(names) if names is not None else layer_modules(model)
    acts = activations(model, x0, times, names, generator, cond)
    return {n: float(time_share(a)) for n, a in acts.items()}


# --- the discriminators the course uses ----------------------------------------------------------------------------
# GDD's discriminator reads FROZEN ImageNet networks (VGG16 / EfficientNet / DeiT, Projected GAN). The course has none
# for its data, and must not use the digits classifier: it is the feature network of the KID / FD metrics, and
# training against it would game them (Kynkaanniemi et al. 2023, the pitfall the GDD authors answer with CLIP-FID).
# So the features come from the frozen TEACHER on re-noised inputs (LADD, gan.DenoiserFeatures): no download, no
# leak into the metric.

T_RANGE_2D = (0.0, 0.3)       # re-noising range of the 2D discriminator (the teacher's hidden layers)
T_RANGE_DIGITS = (0.0, 0.6)   # and of the digits discriminator (down blocks and bottleneck)


def make_discriminator(teacher: nn.Module, x_example: Tensor, cond_example: Cond | None = None,
                       t_range: tuple[float, float] | None = None, hidden: int = 64) -> nn.Module:
    """A fresh gan.Discriminator: trainable heads (class-projection heads when cond_example holds labels) on the frozen
    teacher's default feature layers (gan.default_taps) of re-noised inputs, t ~ U(t_range)."""
    frozen = copy.deepcopy(teacher).requires_grad_(False).eval()
    image = x_example.ndim == 4
    rng = t_range if t_range is not None else (T_RANGE_DIGITS if image else T_RANGE_2D)
    return discriminator(DenoiserFeatures(frozen, t_range=rng), x_example, hidden, cond_example)
