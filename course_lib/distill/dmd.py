"""Distribution matching distillation: DMD (Yin et al., CVPR 2024, arXiv 2311.18828) and DMD2 (Yin et al., NeurIPS
2024, arXiv 2405.14867; tianweiy/DMD2).

A one-step generator G_theta(z) is trained so that the distribution of its samples matches the teacher's. The
gradient of the reverse KL, diffused to every noise level t (DMD Eq. 7), needs two scores of the noised samples
x_t = alpha_t x + sigma_t eps, x = G_theta(z):

    grad_theta KL(p_fake || p_real) = E_{z, t, eps} [ w_t alpha_t (s_fake(x_t, t) - s_real(x_t, t)) dG_theta(z)/dtheta ]

s_real is the frozen teacher's score (with classifier-free guidance for conditional data), s_fake the score of the
generator's own distribution, learned ONLINE by a second diffusion model mu_fake trained to denoise generator
samples. With denoisers, s(x_t) = -(x_t - alpha_t mu(x_t, t)) / sigma_t^2, so the score difference is
alpha_t (mu_fake - mu_real) / sigma_t^2. DMD's weighting w_t = sigma_t^2 / alpha_t / mean|x - mu_real(x_t)| turns
the gradient with respect to x into (DMD Eq. 8; DMD2 code `sd_guidance.py`, `compute_distribution_matching_loss`):

    g = (mu_fake(x_t, t) - mu_real(x_t, t)) / mean_{CHW} |x - mu_real(x_t, t)|                       (B, ...)
    L_DM = 1/2 || x - stopgrad(x - g) ||^2       so that dL_DM / dx = g (per element, over the mean's D)

Gradient DEscent moves x by -g, towards the real denoiser's output and away from the fake one's.
The fake score is trained on stopgrad(x) with the ordinary denoising loss (`fake_score_loss`).

DMD adds a regression loss on the teacher's noise -> sample pairs (z_ref, x_ref): lambda_reg d(G(z_ref), x_ref)
(LPIPS in the paper; the course's distances), which keeps the generator from collapsing onto a few modes.
DMD2 drops it and instead (Sec. 4):
    - updates the fake score r times per generator update (two time-scale update rule, TTUR; r = 5 or 10);
    - adds a GAN: a head on the fake score's bottleneck features of re-noised inputs tells REAL data from
      generator samples (non-saturating loss), so the student can correct the teacher's own errors;
    - trains multi-step generators with "backward simulation": the generator's input at step k of its grid is
      produced by the generator itself (k steps from noise, no grad), as at inference.

TTUR is the engine's `Network(every=ttur)`. Networks seen by the method step (`dmd_step`, for
`train.train_networks`): "generator" (trained every `ttur`-th iteration), "critic" (a `Critic`: the fake score and
its GAN head, trained every iteration) and the frozen "teacher". Batches are dicts: "x" real samples (B, ...), optional "cond" (a Cond of labels), optional "z_ref", "x_ref"
(the regression pairs).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .. import distances, grids, samplers
from ..conditioning import Cond, check, unpack
from ..config import seeded
from ..guidance import cfg as guided
from ..losses import denoising_loss_at
from ..predictions import Pred
from ..processes import AffineProcess
from ..train import Network, Observer, StepContext, Trained, TrainConfig, train_networks
from .gan import DenoiserFeatures, Discriminator, adversarial, discriminator, guard


# --- the two losses ------------------------------------------------------------------------------------------------

def dm_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor, normalize: str = "sample") -> Tensor:
    """The distribution-matching gradient g with respect to the generator sample x (DMD Eq. 7-8), (B, ...):
    (x0_fake - x0_real) / mean|x - x0_real|, the mean per sample over its data dimensions; NaNs set to 0 (DMD2).

    normalize "batch" takes the mean over the whole batch instead: for 2D points, where a mean over two coordinates
    can be ~0 (x at a mode of the teacher) and one sample's g explodes; images average over thousands of pixels."""
    if normalize not in ("sample", "batch"):
        raise ValueError(f"normalize is 'sample' (the paper's) or 'batch' (low-dimensional data); got {normalize!r}")
    norm = (x - x0_real).abs().flatten(1).mean(1)                                 # (B,)
    if normalize == "batch":
        norm = norm.mean().expand(len(x))
    g = (x0_fake - x0_real) / norm.clamp_min(1e-12).view(-1, *[1] * (x.ndim - 1))
    return torch.nan_to_num(g)


def dm_loss(x: Tensor, real: Callable[..., Pred], fake: Callable[..., Pred], process: AffineProcess, t: Tensor,
            eps: Tensor, cond: Cond | None = None, normalize: str = "sample") -> Tensor:
    """L_DM per sample (B,) for generator samples x (B, ...) (with grad), times t (B,) and noise eps (B, ...):
    x_t = alpha_t sg(x) + sigma_t eps, both denoisers evaluated without grad, then 1/2 ||x - sg(x - g)||^2 as a mean
    over the data dimensions, whose gradient with respect to x is g / D. real and fake are course models
    (x, t, cond) -> Pred; real may be a guided model (guidance.cfg)."""
    with torch.no_grad():
        x_t = process.marginal(x.detach(), t, eps)
        x0_real, x0_fake = real(x_t, t, cond).x0, fake(x_t, t, cond).x0
        g = dm_gradient(x.detach(), x0_real, x0_fake, normalize)
    return 0.5 * (x - (x.detach() - g)).pow(2).flatten(1).mean(1)


def fake_score_loss(fake: nn.Module, x: Tensor, t: Tensor, eps: Tensor, cond: Cond | None = None) -> Tensor:
    """The fake score's denoising loss on generator samples (DMD Eq. 6), per sample (B,): the ordinary diffusion
    loss in the fake model's own parameterization (losses.denoising_loss_at), on stopgrad(x) (the generator is not
    trained by it)."""
    return denoising_loss_at(fake, x.detach(), t, eps, cond)


# --- the critic: fake score + GAN head -----------------------------------------------------------------------------

class Critic(nn.Module):
    """DMD2's critic: the fake score mu_fake (a course model, initialised from the teacher) and, for the GAN, a
    Discriminator whose features are mu_fake's own bottleneck on re-noised inputs (so GAN gradients also train
    mu_fake's encoder). head is None without the GAN term."""

    synced_methods = ("raw", "logits")  # dmd_step calls these, not forward: the engine runs them through DDP / FSDP

    def __init__(self, fake: nn.Module, head: Discriminator | None = None):
        super().__init__()
        self.fake, self.head = fake, head
        features = getattr(head, "features", None)
        if isinstance(features, DenoiserFeatures) and features._modules.get("model") is fake:
            # the head's feature network IS the fake score: register it once (as `fake`; DenoiserFeatures' shared
            # mode), so state_dict and safetensors checkpoints hold each tensor once (safetensors refuses tensors
            # shared under two names). make_critic builds the features shared already.
            del features._modules["model"]
            features._shared = (fake,)

    @property
    def process(self) -> AffineProcess:
        return self.fake.process

    @property
    def parameterization(self) -> str:
        return self.fake.parameterization

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Pred:
        return self.fake(x, t, cond)

    def raw(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """The fake score's native output (what `fake_score_loss` regresses)."""
        return self.fake.raw(x, t, cond)

    def logits(self, x: Tensor, cond: Cond | None = None, generator: torch.Generator | None = None) -> Tensor:
        """The GAN head's logits (B,) for samples x (re-noised inside, DenoiserFeatures)."""
        if self.head is None:
            raise ValueError("this critic has no GAN head (built with gan=False)")
        return self.head(x, cond, generator)


def make_critic(teacher: nn.Module, x_example: Tensor, gan: bool, cond_example: Cond | None = None,
                taps: list[str] | None = None, t_range: tuple[float, float] = (0.0, 1.0), hidden: int = 64) -> Critic:
    """A Critic around a trainable copy of the teacher; with gan, a head on its `taps` (default: the bottleneck),
    sized on x_example (B, ...) and cond_example (the examples' Cond; class-projection heads when it holds labels)."""
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    head = None
    if gan:
        names = taps if taps is not None else DenoiserFeatures(fake).taps[-1:]
        head = discriminator(DenoiserFeatures(fake, names, t_range, shared=True), x_example, hidden, cond_example)
    return Critic(fake, head)


# --- the generator's time grid and backward simulation -------------------------------------------------------------

def generator_times(k: int, t_first: float = 1.0) -> list[float]:
    """The times at which a k-step generator is called: t_first (1 - i/k) for i = 0..k-1, i.e. 1, (k-1)/k, ..., 1/k
    for t_first = 1 (grids.trailing without its final 0: SD's trailing grid 999, 749, 499, 249 for k = 4; DMD2
    `denoising_step_list`). Its first input is pure noise whatever t_first: a one-step generator told t_first < 1
    (DMD2's one-step SDXL uses timestep 399) starts from a teacher that already maps noise to data-like samples
    instead of to their mean."""
    if k < 1:
        raise ValueError(f"a generator needs at least one step; got {k}")
    return grids.trailing(k, t_first)[:-1].tolist()


def backward_simulate(G: Callable[..., Pred], z: Tensor, i: int, times: list[float], process: AffineProcess,
                      generator: torch.Generator, cond: Cond | None = None) -> Tensor:
    """DMD2's backward simulation (Sec. 4.4): the input of generator step i, made by the generator itself. From
    z = x_{times[0]}: i rounds of x0 = G(x, t_j) and x_{t_{j+1}} = alpha x0 + sigma eps' (fresh eps'), no grad.
    i = 0 returns z. (B, ...)"""
    x = z
    with torch.no_grad():
        for j in range(i):
            t = torch.full((len(z),), times[j], device=z.device)
            x0 = G(x, t, cond).x0
            eps = torch.randn(z.shape, generator=generator, device=generator.device).to(z)
            x = process.marginal(x0, torch.full_like(t, times[j + 1]), eps)
    return x


# --- the method step -----------------------------------------------------------------------------------------------

# The optimizer. DMD2's released code (tianweiy/DMD2 main/train_sd.py and main/edm/train_edm.py) trains both networks
# with AdamW at PyTorch's defaults, betas (0.9, 0.999) and weight decay 0.01, after a 500-update warm-up: DMD2_BETAS
# and DMD2_WEIGHT_DECAY, which the Stable Diffusion stage (scale.dmd2, DMD2's SD 1.5 recipe) uses. The course's short
# runs use beta1 = 0 and no weight decay (DMDConfig's defaults, COURSE_BETAS), as GAN training does (GDD: Adam (0,
# 0.99); SiD: (0, 0.999)): without momentum each generator update follows the fake score of that moment, which moves
# at every critic update. Benches dmd and dmd2 and the shipped mini-SD generator (recipes.dmd.RECIPE) were
# trained with it; the two settings were not compared at the course's budgets.
DMD2_BETAS, DMD2_WEIGHT_DECAY = (0.9, 0.999), 0.01
COURSE_BETAS = (0.0, 0.999)


@dataclass
class DMDConfig:
    """One DMD or DMD2 run. The defaults are DMD2's (ImageNet recipe's ratios, scaled to the course's budgets), but
    for the optimizer: the course's COURSE_BETAS without weight decay (DMD2's released code: DMD2_BETAS,
    DMD2_WEIGHT_DECAY)."""
    ttur: int = 5                    # critic updates per generator update (DMD: 1; DMD2: 5 ImageNet/SDXL, 10 SD 1.5)
    t_range: tuple[float, float] = (0.02, 0.98)   # t of the distribution-matching gradient (min/max_step_percent)
    real_w: float = 0.0              # classifier-free guidance of the real score (course convention, w = s - 1)
    real_w_interval: tuple[float, float] = (0.0, 1.0)   # the t (lo, hi] where the real score is guided at real_w;
                                     # outside it, the conditional teacher (w = 0): Kynkaanniemi et al. 2024's
                                     # guidance interval. A guided x0 at high noise extrapolates the MEAN, and a
                                     # one-step generator matched to it there inherits the shift (the mini SD's
                                     # green prompts came out blue at w = 4 everywhere; recipes.dmd)
    lambda_reg: float = 0.0          # DMD's regression weight (paper 0.25 with LPIPS); 0: none (DMD2)
    regression: str = "l2"           # distance of the regression loss: "l2" or "pseudo-huber"
    gan: bool = True                 # DMD2's GAN term (head on the fake score's bottleneck)
    lambda_g: float = 3e-3           # GAN weight in the generator loss (DMD2 ImageNet 3e-3, SD 1.5 1e-3)
    lambda_d: float = 1e-2           # GAN weight in the critic loss (DMD2 1e-2)
    gen_steps: int = 1               # generator steps (>1: backward simulation)
    t_gen: float = 1.0               # the time the generator is told at its first step (its input is pure noise)
    lr_g: float = 2e-4
    lr_critic: float = 2e-4
    betas: tuple[float, float] = COURSE_BETAS    # both networks' AdamW betas (DMD2's code: DMD2_BETAS)
    weight_decay: float = 0.0        # both networks' AdamW weight decay (DMD2's code: DMD2_WEIGHT_DECAY)
    warmup: int = 0                  # linear learning-rate warm-up over each network's first updates (DMD2: 500)
    lr_schedule: str = "constant"    # both networks' rates over their updates (train.Network): constant (DMD2's),
                                     # linear or cosine (the course's 2D recipe: a constant rate leaves the one-step
                                     # generator jittering around its fixed point, bench.dmd)
    grad_clip: float = 10.0          # DMD2 clips both networks at 10
    ema_decay: float = 0.0           # generator EMA (DMD2's released loop: none)
    max_loss: float = 1e4            # guard: a loss above this (or NaN) stops the run
    normalize: str = "sample"        # dm_gradient's normaliser: per "sample" (images) or over the "batch" (2D)
    t_shared: bool = False           # one t of the distribution-matching gradient per generator batch (the 2D
                                     # recipe: the "batch" normaliser is then that noise level's own mean, as the
                                     # per-sample one is for an image; with t per sample, the high-noise samples'
                                     # large |x - mu_real| shrink the low-noise samples' steps)


def real_weight(cfg: DMDConfig, t: Tensor) -> float | Tensor:
    """The real score's guidance weight at times t (B,): cfg.real_w (a float) when cfg.real_w_interval covers every
    t, else a (B,) tensor, real_w for t in (lo, hi] and 0 outside (guidance.cfg takes per-sample weights)."""
    lo, hi = cfg.real_w_interval
    if lo <= 0.0 and hi >= 1.0:
        return cfg.real_w
    inside = (t > lo) & (t <= hi)
    return torch.where(inside, torch.full_like(t, cfg.real_w), torch.zeros_like(t))


def dmd_step(cfg: DMDConfig, process: AffineProcess, dm_loss_fn: Callable | None = None,
             fake_fn: Callable | None = None,
             simulate_fn: Callable | None = None) -> Callable[[StepContext, Mapping[str, Tensor]], Tensor]:
    """The DMD / DMD2 method step for train_networks (nets "generator", "critic", frozen "teacher"):

    generator phase: x = G(x_in, t_k) (x_in by backward simulation), L_G = L_DM + lambda_reg L_reg
                     + lambda_g softplus(-D(x))        (D: the critic's head; regression only with pairs)
    critic phase:    L = fake_score_loss(sg x)  + lambda_d [softplus(D(sg x)) + softplus(-D(x_real))]

    dm_loss_fn(x, real, fake, process, t, eps, cond, normalize) -> (B,), fake_fn(fake, x, t, eps, cond) -> (B,) and
    simulate_fn(G, z, i, times, process, generator, cond) -> (B, ...) replace the library's dm_loss, fake_score_loss
    and backward_simulate (a notebook's exercises); None uses the library's (the same run, number for number).
    """
    d_loss, g_loss = adversarial("ns")
    times = generator_times(cfg.gen_steps, cfg.t_gen)
    dm_loss_fn = dm_loss_fn or dm_loss
    fake_fn = fake_fn or fake_score_loss
    simulate_fn = simulate_fn or backward_simulate

    def sample(ctx: StepContext, n: int, like: Tensor, cond: Cond | None) -> Tensor:
        G = ctx.nets["generator"]
        g = ctx.generator
        z = torch.randn((n, *like.shape[1:]), generator=g, device=g.device).to(like)
        # the backward-simulation depth; under FSDP the same on every process (each generator call gathers weights)
        gi = getattr(ctx, "shared", None) or g
        i = int(torch.randint(len(times), (1,), generator=gi, device=gi.device)) if len(times) > 1 else 0
        x_in = simulate_fn(G, z, i, times, process, g, cond)
        t = torch.full((n,), times[i], device=like.device)
        return G(x_in, t, cond).x0

    def draw_t(n: int, lo: float, hi: float, ctx: StepContext, like: Tensor) -> Tensor:
        g = ctx.generator
        return (lo + (hi - lo) * torch.rand(n, generator=g, device=g.device)).to(like.device, torch.float32)

    def step(ctx: StepContext, batch: Mapping[str, Tensor]) -> Tensor:
        x_real, cond = unpack(batch)
        n, g = len(x_real), ctx.generator
        critic: Critic = ctx.nets["critic"]
        if ctx.phase == "generator":
            x = sample(ctx, n, x_real, cond)
            t = draw_t(n, *cfg.t_range, ctx, x)
            if cfg.t_shared:
                t = t[:1].expand(n)
            eps = torch.randn(x.shape, generator=g, device=g.device).to(x)
            teacher = ctx.nets["teacher"]
            real = guided(teacher, real_weight(cfg, t)) if (cfg.real_w and cond is not None) else teacher
            loss = dm_loss_fn(x, real, critic.fake, process, t, eps, cond, cfg.normalize)
            if cfg.lambda_reg > 0 and "z_ref" in batch:
                z_ref = batch["z_ref"]
                x_hat = ctx.nets["generator"](z_ref, torch.full((len(z_ref),), times[0], device=z_ref.device),
                                              check(batch.get("cond_ref"))).x0
                d = distances.get(cfg.regression, "regression distance")
                reg = d(x_hat, batch["x_ref"])                                                      # (B_ref,)
                loss = loss + cfg.lambda_reg * reg.mean()
            if cfg.gan and critic.head is not None:
                loss = loss + cfg.lambda_g * g_loss(critic.logits(x, cond, g))
            return guard(loss, "generator", ctx.step, cfg.max_loss)
        with torch.no_grad():
            x = sample(ctx, n, x_real, cond)
        t = draw_t(n, 0.0, 1.0, ctx, x)
        eps = torch.randn(x.shape, generator=g, device=g.device).to(x)
        # through the critic's own methods (raw, logits), so that under DDP the gradients are averaged over processes
        loss = fake_fn(critic, x, t, eps, cond)
        if cfg.gan and critic.head is not None:
            loss = loss + cfg.lambda_d * d_loss(critic.logits(x_real, cond, g), critic.logits(x, cond, g))
        return guard(loss, "critic", ctx.step, cfg.max_loss)

    return step


def distill_dmd(teacher: nn.Module, data: Callable[[int, torch.Generator], Mapping[str, Tensor]], cfg: DMDConfig, *,
                run: TrainConfig, example: Mapping[str, Any] | None = None, ckpt_dir=None, accelerator=None,
                progress: bool = True, networks: tuple[nn.Module, nn.Module, nn.Module] | None = None,
                save_frozen: bool = True, extra_config: dict | None = None, observer: Observer | None = None,
                observe_every: int = 1, dm_loss_fn: Callable | None = None, fake_fn: Callable | None = None,
                simulate_fn: Callable | None = None) -> tuple[nn.Module, Trained]:
    """The DMD / DMD2 driver: train a generator initialised from the teacher's weights (the teacher's network used as
    x0_hat(z, t) on its grid) against the frozen teacher's score and a critic (`make_critic`, its GAN head initialised
    under seeded(run.seed) from `example`, a batch {"x": (B, ...), "cond": Cond or absent}), with dmd_step through train_networks: the
    generator updated every cfg.ttur-th iteration, both networks with AdamW (cfg.betas, weight_decay, warmup,
    lr_schedule, grad_clip). networks=(generator, real score, critic) trains networks built elsewhere instead (the SD
    stage's generator is the teacher's own UNet or a LoRA on it, whose real score is the UNet with the adapter off:
    scale.methods.networks); save_frozen=False checkpoints only the generator's trainable tensors (a LoRA).
    observer, observe_every: the engine's (train.Observer). dm_loss_fn, fake_fn, simulate_fn: dmd_step's hooks (a
    notebook's exercises in place of the library's losses and backward simulation). Returns (the generator: its EMA
    when ema_decay > 0, eval, no grad; Trained)."""
    if networks is None:
        G = copy.deepcopy(teacher).requires_grad_(True).train()
        example = example or {}                 # needed with cfg.gan only
        with seeded(run.seed):                  # the GAN head's initialisation: the same critic for the same seed
            critic = make_critic(teacher, example.get("x"), cfg.gan, example.get("cond"))
        real = copy.deepcopy(teacher).requires_grad_(False).eval()
    else:
        G, real, critic = networks
    common = dict(betas=cfg.betas, weight_decay=cfg.weight_decay, warmup=cfg.warmup, grad_clip=cfg.grad_clip,
                  lr_schedule=cfg.lr_schedule)
    nets = {"generator": Network(G, lr=cfg.lr_g, ema_decay=cfg.ema_decay, every=cfg.ttur, save_frozen=save_frozen,
                                 **common),
            "critic": Network(critic, lr=cfg.lr_critic, **common)}
    if extra_config is None:
        extra_config = {"method": "dmd2" if cfg.gan or cfg.ttur > 1 else "dmd", **asdict(cfg)}
    done = train_networks(nets, dmd_step(cfg, teacher.process, dm_loss_fn, fake_fn, simulate_fn), data, run,
                          frozen={"teacher": real}, ckpt_dir=ckpt_dir, progress=progress, accelerator=accelerator,
                          extra_config=extra_config, observer=observer, observe_every=observe_every)
    return done.best("generator").eval().requires_grad_(False), done


def sample(G: Callable[..., Pred], z: Tensor, k: int, process: AffineProcess, generator: torch.Generator,
           cond: Cond | None = None, t_first: float = 1.0) -> Tensor:
    """k-step generation on the generator's grid grids.trailing(k, t_first) (denoise, re-noise with fresh noise,
    ...; DMD2 / LCM scheduling): backward simulation to the last step, then its x0 (B, ...). samplers.consistency:
    samplers.multistep with the jump to t = 0 (gamma = 1)."""
    return samplers.consistency(G, z, grids.trailing(k, t_first), process, generator=generator, cond=cond)
