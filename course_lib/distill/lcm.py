"""Latent consistency models (Luo et al. 2023, arXiv 2310.04378) and LCM-LoRA (Luo et al. 2023, arXiv 2311.05556):
one-stage guided consistency distillation of a Stable Diffusion teacher, in its VAE's latent space.

Timesteps are diffusers' integer timesteps tau in {0..T-1} (the course time is t = (tau + 1) / T, see
processes.SDDiscrete); LCM defines its grid, skipping step and boundary scalings on them.

    DDIM grid       tau_i = i k - 1, i = 1..N, k = T // N  (N = 50: 19, 39, ..., 999)           `ddim_timesteps`
    skipping step   the teacher takes ONE guided DDIM step from tau_{n+k} to tau_n = max(tau_{n+k} - k, 0)
    consistency fn  f(z, w, c, tau) = c_skip(tau) z + c_out(tau) x0_hat(eps_theta(z, tau, c, Emb(w)))   (Eq. 9)
                    c_skip = sd^2 / ((s tau)^2 + sd^2),  c_out = s tau / sqrt((s tau)^2 + sd^2),  s = 10, sd = 0.5
    loss (LCD, Algorithm 1; diffusers' train_lcm_distill_sd_wds.py)
        w ~ U[w_min, w_max];  z_{n+k} = alpha z_0 + sigma eps
        z_hat_n = DDIM_teacher(z_{n+k}, tau_{n+k} -> tau_n) with x0 and eps guided: (1 + w) cond - w uncond
        L = d(f_theta(z_{n+k}, w, c, tau_{n+k}), stopgrad f_theta^-(z_hat_n, w, c, tau_n))
        theta^- <- 0.95 theta^- + 0.05 theta                  (train.Target, decay 0.95)
    sampling (Algorithm 3; diffusers' LCMScheduler)  `multistep`
        at each LCM timestep: z0 = f(z, tau); not last: z = alpha(next) z0 + sigma(next) eps, fresh eps; last: z0

Guidance convention, stated once. The course writes x0_w = (1 + w) x0(c) - w x0(null) (guidance.py), diffusers'
pipelines take guidance_scale = 1 + w. LCM's training scripts draw w ~ U[w_min, w_max] (defaults 5 and 15) and guide
the teacher as cond + w (cond - uncond): that is exactly the course's w (their --w_min help text calls it the
"Imagen formulation", which it is not). The w-embedding is Emb(w) of that same w, and diffusers'
LatentConsistencyModelPipeline embeds guidance_scale - 1 = w: training w in [5, 15] serves guidance_scale 6 to 16.
Here, everything takes the course's w.

The boundary scalings are LCM's own: c_out has no sigma_data factor (unlike Consistency Models' c_out, see
diffusers#8547), and c_skip(tau) is 1 only at tau = 0, so f is x0-prediction everywhere but the very end. Both sides
(training and sampling) use the same scalings, which is all that matters.

LCM-LoRA: the same loss training only a LoRA adapter (sd.add_lora, with LCM-LoRA's target modules) on the frozen
teacher, at one fixed w and without a w-embedding (the released LCM-LoRA: w fixed, no embedding); the teacher is the
same UNet with its adapter switched off (`sd.adapter_disabled`), and the target is the online student without gradients,
as in diffusers' LoRA scripts (one UNet in memory; LCMConfig.lora_target_decay > 0 follows an EMA copy instead).
The fixed w is the course's simplification: the
LCM-LoRA report's authors used a fixed guidance of 7.5, while diffusers' reference LoRA script draws
w ~ U[w_min, w_max] per sample without giving it to the student. Adapters compose by adding weighted deltas (`compose`, peft's adapter
weights) and merge into plain weights, W' = W + sum_i lambda_i (alpha_i / r_i) B_i A_i (`merge_lora`,
`merged_copy`: what `pipe.fuse_lora()` does).

Course choices (named): the student's new w-projection (TimestepEmbedding.cond_proj) starts at zero, so the student
starts exactly as the teacher (LCM's scripts leave it randomly initialised); the default w range for the mini SD is
[2, 6] around its default w = 4 (minisd.DEFAULT_W).
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import distances, precond, samplers, steps
from ..conditioning import Cond, unpack
from ..config import seeded
from ..grids import ddim_timesteps, lcm_timesteps, skipping_step
from ..guidance import cfg as guided
from ..predictions import Pred
from ..processes import SDDiscrete, time_dtype
from ..sd import AdapterOff, SDDenoiser, add_lora, lcm_timestep_cond, require_codec
from ..train import Network, StepContext, Target, Trained, TrainConfig, train_networks

TIMESTEP_SCALING = 10.0        # s in c_skip, c_out (diffusers' LCMScheduler timestep_scaling, PR #5681)
SIGMA_DATA = 0.5               # sd (LCMScheduler; must equal its training value, latent-consistency-model#30)
ORIGINAL_STEPS = 50            # N of the DDIM grid (LCMScheduler.original_inference_steps): k = 1000 // 50 = 20
W_EMBED_DIM = 256              # w-embedding width (--unet_time_cond_proj_dim)
W_RANGE = (2.0, 6.0)           # course default for the mini SD (course w; LCM's SD default is 5..15)
LORA_W = 4.0                   # the fixed w of the course's LCM-LoRA (minisd.DEFAULT_W; the released one used 7.5)
# LCM-LoRA's target modules (diffusers' train_lcm_distill_lora_sd_wds.py)
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


# ----------------------------------------------------------------------------------------------------------------
# Grids and scalings on diffusers' integer timesteps
# ----------------------------------------------------------------------------------------------------------------

def lcm_grid(n: int, process: SDDiscrete, original_steps: int = ORIGINAL_STEPS) -> Tensor:
    """lcm_timesteps as course times t = (tau + 1) / T, then t = 0 (the grids module's length contract: n + 1)."""
    ts = process.t_of_timestep(lcm_timesteps(n, original_steps, process.T))
    return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])


# ----------------------------------------------------------------------------------------------------------------
# The consistency function around an SD denoiser
# ----------------------------------------------------------------------------------------------------------------

def w_embedding(w: Tensor | float, dim: int, batch: int) -> Tensor:
    """Emb(w): LCM's sinusoidal embedding of 1000 w, (B, dim) (sd.lcm_timestep_cond), for a float or (B,) w."""
    w = torch.as_tensor(w, dtype=torch.float32)
    return lcm_timestep_cond(w.expand(batch) if w.ndim == 0 else w, dim)


class LCMModel(nn.Module):
    """An LCM student as a course model: forward(x, t, cond) -> Pred(x0 = f(x, w, c, tau), eps consistent with it),
    with w = cond.w (B,) (`cond.with_w(w)`), which reaches the UNet as timestep_cond = Emb(w) (`w_input`).

    denoiser: an sd.SDDenoiser whose UNet has time_cond_proj_dim (an LCM with a w-embedding, trained on w_range), or
    none and a LoRA adapter (an LCM-LoRA, distilled at the fixed w_fixed). `.x0` of the result is the consistency
    function, so `multistep` (and samplers.consistency on lcm_grid) samples it."""

    def __init__(self, denoiser: nn.Module, w_range: tuple[float, float] | None = None, w_fixed: float | None = None,
                 sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING):
        super().__init__()
        self.denoiser, self.process = denoiser, denoiser.process
        self.w_dim = denoiser.unet.config.get("time_cond_proj_dim")
        if self.w_dim is not None and w_range is None:
            raise ValueError("an LCM with a w-embedding needs the range of w it was trained on (w_range=(lo, hi))")
        if self.w_dim is None and w_fixed is None:
            raise ValueError("this UNet has no w-embedding (time_cond_proj_dim is None): an LCM-LoRA is distilled at "
                             "one fixed w; pass w_fixed")
        self.w_range = None if w_range is None else (float(w_range[0]), float(w_range[1]))
        self.w_fixed = None if w_fixed is None else float(w_fixed)
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def check_w(self, w: Tensor | float | None) -> Tensor | float | None:
        if self.w_dim is None:
            if w is not None and not torch.allclose(torch.as_tensor(w, dtype=torch.float64),
                                                    torch.tensor(self.w_fixed, dtype=torch.float64)):
                raise ValueError(f"this LCM-LoRA was distilled at the fixed guidance weight w = {self.w_fixed} "
                                 f"(diffusers' guidance_scale {1 + self.w_fixed}) and has no w input; pass w=None")
            return None
        if w is None:
            raise ValueError(f"this LCM takes the guidance weight as an input: pass w in its trained range "
                             f"{self.w_range} (course w; diffusers' guidance_scale = 1 + w)")
        wt = torch.as_tensor(w, dtype=torch.float64)
        lo, hi = self.w_range
        if bool((wt < lo - 1e-6).any()) or bool((wt > hi + 1e-6).any()):
            bad = float(wt.min()) if bool((wt < lo - 1e-6).any()) else float(wt.max())
            raise ValueError(f"guidance weight w = {bad:g} is outside the range this LCM was trained on, "
                             f"[{lo:g}, {hi:g}] (course w; guidance_scale {1 + lo:g} to {1 + hi:g}); its w-embedding "
                             "has never seen it. Pick a w in the range or distil with a wider w_range")
        return w

    def w_input(self, cond: Cond) -> Cond:
        """The UNet's conditioning: cond with Emb(cond.w) as timestep_cond and w taken out (an LCM-LoRA: w taken out,
        after checking it is None or its fixed w)."""
        w = self.check_w(cond.w)
        if self.w_dim is None:
            return cond.with_w(None)
        emb = w_embedding(w, self.w_dim, len(cond))
        return replace(cond.with_w(None),
                       timestep_cond=emb.to(cond.text.device if cond.text is not None else emb.device))

    def forward(self, x: Tensor, t: Tensor, cond: Cond) -> Pred:
        return self.boundary(x, t, self.denoiser(x, t, self.w_input(cond)).x0)

    def boundary(self, x: Tensor, t: Tensor, x0_hat: Tensor) -> Pred:
        """f = c_skip x + c_out x0_hat with LCM's scalings (precond's "lcm"), as Pred(f, eps consistent with x)."""
        return precond.boundary("lcm", x, t.to(time_dtype(x.dtype)), x0_hat, self.process,
                                sigma_data=self.sigma_data, timestep_scaling=self.timestep_scaling)

    def config(self) -> dict:
        return {"arch": "lcm", "denoiser": self.denoiser.config(), "w_range": self.w_range, "w_fixed": self.w_fixed,
                "sigma_data": self.sigma_data, "timestep_scaling": self.timestep_scaling}


class GuidedTeacherLCM(nn.Module):
    """The guided teacher read as an LCM without any distillation: f = c_skip z + c_out x0_hat^w (two evaluations per
    step, the CFG pair). The baseline that tells what LCD adds to LCM's multistep sampler."""

    def __init__(self, teacher: nn.Module, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING):
        super().__init__()
        self.denoiser, self.process = teacher, teacher.process
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def forward(self, x: Tensor, t: Tensor, cond: Cond) -> Pred:
        if cond.w is None:
            raise ValueError("the guided teacher needs its guidance weight w: pass cond.with_w(w)")
        x0 = guided(self.denoiser, cond.w)(x, t, cond.with_w(None)).x0
        return precond.boundary("lcm", x, t.to(time_dtype(x.dtype)), x0, self.process, sigma_data=self.sigma_data,
                                timestep_scaling=self.timestep_scaling)


def lcm_student(teacher: nn.Module, w_dim: int = W_EMBED_DIM, w_range: tuple[float, float] = W_RANGE,
                seed: int = 0) -> LCMModel:
    """A student UNet built from the teacher's config with time_cond_proj_dim = w_dim, initialised with the teacher's
    weights (all but the new w-projection, which starts at zero: the student starts as the teacher). Trainable."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in dict(teacher.unet.config).items() if not k.startswith("_")}
    if config.get("time_cond_proj_dim") is not None:
        raise ValueError("the teacher already has a w-embedding (time_cond_proj_dim): distil from the guided teacher, "
                         "not from an LCM")
    with seeded(seed):
        unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": w_dim})
    missing, unexpected = unet.load_state_dict(teacher.unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"the student's UNet does not match the teacher's: missing {missing}, "
                           f"unexpected {unexpected}")
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.zero_()
    p = next(teacher.unet.parameters())
    unet.to(device=p.device, dtype=p.dtype).train().requires_grad_(True)
    den = SDDenoiser(unet, teacher.process, teacher.parameterization, None)
    return LCMModel(den, w_range=w_range)


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------

def lcm_target(teacher: Callable[..., Pred], target: Callable[..., Pred], z: Tensor, timesteps: Tensor, k: int,
               cond: Cond, w: Tensor, process: SDDiscrete) -> Tensor:
    """The consistency target (B, ...) of LCD (Luo et al. 2023, Eq. 8-9 and Algorithm 1), without gradients:
    the guided teacher's ONE DDIM step from tau_{n+k} = timesteps to tau_n = max(tau_{n+k} - k, 0), then the target
    network's f there. teacher(x, t, cond) -> Pred; target(x, t, cond.with_w(w)) -> Pred with .x0 = f; w (B,) course
    w."""
    t_next = process.t_of_timestep(timesteps).to(torch.float32)
    t_cur = process.t_of_timestep((timesteps - k).clamp_min(0)).to(torch.float32)
    with torch.no_grad():
        pred = guided(teacher, w)(z, t_next, cond)                         # (1 + w) cond - w uncond, x0 and eps
        z_cur = steps.ddim_step(pred, t_next, t_cur, process)             # z_hat_{t_n}
        return target(z_cur, t_cur, cond.with_w(w)).x0                    # f_theta^-(z_hat_{t_n}, w, c, t_n)


def lcm_loss(student: Callable[..., Pred], target: Callable[..., Pred], teacher: Callable[..., Pred], z0: Tensor,
             eps: Tensor, timesteps: Tensor, k: int, cond: Cond, w: Tensor, process: SDDiscrete,
             distance: str = "huber", target_fn: Callable[..., Tensor] | None = None) -> Tensor:
    """LCD's loss per sample (B,) (Algorithm 1): d(f_theta(z_{n+k}, w, c, tau_{n+k}), lcm_target(...)).
    target_fn: a function with lcm_target's signature (a notebook's own), default lcm_target."""
    d = distances.get(distance)
    t_next = process.t_of_timestep(timesteps).to(torch.float32)
    z_next = process.marginal(z0, t_next, eps).to(z0.dtype)                  # z_{t_{n+k}}
    tgt = (target_fn or lcm_target)(teacher, target, z_next, timesteps, k, cond, w, process)
    pred = student(z_next, t_next, cond.with_w(w)).x0
    return d(pred, tgt)


@dataclass
class LCMConfig:
    """LCM distillation settings (course w throughout; diffusers' guidance_scale = 1 + w)."""
    steps: int = 1000
    batch: int = 64
    lr: float = 1e-4                  # LCM full model: 1e-6 on SD 1.5 (batch 12/GPU); the tiny UNet takes more
    original_steps: int = ORIGINAL_STEPS   # N: k = 1000 // N
    w_min: float = W_RANGE[0]
    w_max: float = W_RANGE[1]         # LoRA: w_min = w_max = the fixed w
    w_dim: int = W_EMBED_DIM
    target_decay: float = 0.95        # theta^- EMA of the full student (--ema_decay)
    lora_target_decay: float = 0.0    # the LoRA's theta^-: 0 its online weights (diffusers' LoRA scripts), else an EMA
    distance: str = "huber"
    grad_clip: float = 1.0
    warmup: int = 0
    seed: int = 0
    lora_rank: int = 8                # LCM-LoRA (SD 1.5: 64)
    ckpt_every: int = 0


def lcm_step(ctx: StepContext, batch: Mapping[str, Any], process: SDDiscrete, cfg: LCMConfig,
             lora: bool = False, target_fn: Callable[..., Tensor] | None = None) -> Tensor:
    """The method step for train.train_networks: draws tau_{n+k} on the DDIM grid, eps and w per sample, returns the
    per-sample LCD loss of nets["student"] against nets["target"] (the online student without grad for a LoRA) and
    nets["teacher"] (the student's own UNet with its adapter disabled for a LoRA)."""
    z0, cond = unpack(batch)
    g, B = ctx.generator, len(z0)
    student = ctx.nets["student"]
    k = skipping_step(cfg.original_steps, process.T)
    grid = ddim_timesteps(cfg.original_steps, process.T)
    idx = torch.randint(len(grid), (B,), generator=g, device=g.device).cpu()
    timesteps = grid[idx].to(z0.device)
    eps = torch.randn(z0.shape, generator=g, device=g.device).to(z0)
    w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(B, generator=g, device=g.device)).to(z0.device)
    if lora:
        teacher = AdapterOff(student.denoiser)                     # the same UNet, adapter off
        # w = w_min = w_max, the LoRA's fixed w (no w input); the target is the online student without grad, or
        # an EMA copy of it (cfg.lora_target_decay > 0)
        return lcm_loss(student, ctx.nets.get("target", student), teacher, z0, eps, timesteps, k, cond, w, process,
                        cfg.distance, target_fn)
    return lcm_loss(student, ctx.nets["target"], ctx.nets["teacher"], z0, eps, timesteps, k, cond, w, process,
                    cfg.distance, target_fn)


# ----------------------------------------------------------------------------------------------------------------
# Distillation: a full student with a w-embedding, or an LCM-LoRA
# ----------------------------------------------------------------------------------------------------------------

def train_config(cfg: LCMConfig, desc: str) -> TrainConfig:
    """The engine's run for an LCMConfig's budget (steps, batch, seed, ckpt_every): the SD drivers' `run`."""
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch, seed=cfg.seed, ckpt_every=cfg.ckpt_every, desc=desc)


def distill_lcm(sd: Any, data: Callable, cfg: LCMConfig, *, run: TrainConfig,
                ckpt_dir: str | os.PathLike | None = None, accelerator=None, progress: bool = True,
                target_fn: Callable[..., Tensor] | None = None) -> tuple[LCMModel, Trained]:
    """Latent consistency distillation (LCD) of sd (sd.SD: model, text, vae; the teacher is sd.model) into a student
    with a w-embedding trained on [cfg.w_min, cfg.w_max], on data(n, generator) -> {"x": z0 latents, "cond": Cond} (e.g.
    minisd.digit_batches(sd)); run: e.g. train_config(cfg, "LCD: LCM student"). Resumes from ckpt_dir. Returns
    (the trained student, eval, no grad; the engine's Trained)."""
    require_codec(sd)
    teacher = sd.model
    student = lcm_student(teacher, cfg.w_dim, (cfg.w_min, cfg.w_max), cfg.seed)
    net = Network(student, lr=cfg.lr, grad_clip=cfg.grad_clip, warmup=cfg.warmup, weight_decay=0.0)
    done = train_networks({"student": net}, lambda ctx, b: lcm_step(ctx, b, teacher.process, cfg, target_fn=target_fn),
                          data, run,
                          targets={"target": Target("student", cfg.target_decay)}, frozen={"teacher": teacher},
                          ckpt_dir=ckpt_dir, accelerator=accelerator, extra_config={"lcm": asdict(cfg)},
                          progress=progress)
    return student.eval().requires_grad_(False), done


def distill_lcm_lora(sd: Any, data: Callable, cfg: LCMConfig, *, run: TrainConfig, w: float,
                     ckpt_dir: str | os.PathLike | None = None, accelerator=None, progress: bool = True,
                     target_fn: Callable[..., Tensor] | None = None) -> tuple[LCMModel, Trained]:
    """LCM-LoRA: add a LoRA adapter (rank cfg.lora_rank, LCM-LoRA's target modules) to sd.model IN PLACE and distil
    it with LCD at the fixed guidance weight w (no w-embedding; the course's is LORA_W) on data (as distill_lcm's).
    The teacher is sd.model with the adapter disabled. Returns (the LCM-LoRA student: sd.model with its adapter, as
    an LCMModel, eval; the engine's Trained)."""
    require_codec(sd)
    model = sd.model
    if model.lora is None:
        add_lora(model, r=cfg.lora_rank, target_modules=present_targets(model.unet), seed=cfg.seed)
    student = LCMModel(model, w_fixed=w)
    lcfg = LCMConfig(**{**asdict(cfg), "w_min": w, "w_max": w})
    net = Network(student, lr=cfg.lr, grad_clip=cfg.grad_clip, warmup=cfg.warmup, save_frozen=False)
    step = lambda ctx, b: lcm_step(ctx, b, model.process, lcfg, lora=True, target_fn=target_fn)
    targets = {"target": Target("student", cfg.lora_target_decay)} if cfg.lora_target_decay > 0 else None
    done = train_networks({"student": net}, step, data, run, targets=targets, ckpt_dir=ckpt_dir,
                          accelerator=accelerator, extra_config={"lcm_lora": {**asdict(lcfg), "w": w}},
                          progress=progress)
    return student.eval(), done


def merge_lora(weight: Tensor, loras: Sequence[tuple[float, float, Tensor, Tensor]]) -> Tensor:
    """LoRA arithmetic on one layer (LCM-LoRA report, Sec. 3.2; peft's merge): W' = W + sum_i lambda_i s_i B_i A_i.
    weight (out, in) the base weight W (a convolution's flattened to (out, in k k)); loras: (lambda_i the adapter's
    weight in the composition, s_i = alpha_i / r_i peft's scaling, A_i (r_i, in), B_i (out, r_i)). Returns a new
    (out, in) tensor in weight's dtype; W itself is not changed."""
    merged = weight.clone()
    for lam, scaling, A, B in loras:
        merged = merged + (lam * scaling) * (B.to(weight) @ A.to(weight))
    return merged


def lora_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, peft LoRA layer) pairs of a UNet: modules with a base_layer and lora_A/lora_B dicts."""
    return [(n, m) for n, m in unet.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]


@torch.no_grad()
def merged_copy(model: nn.Module, adapters: dict[str, float],
                merge: Callable[[Tensor, Sequence[tuple[float, float, Tensor, Tensor]]], Tensor] = merge_lora
                ) -> nn.Module:
    """A copy of model (an LCMModel or SDDenoiser whose UNet carries LoRA adapters) whose base weights are the
    composition theta' = theta_pre + sum_name lambda_name tau_name computed layer by layer with `merge` (merge_lora's
    signature), and whose adapters are switched off: one plain UNet, as `pipe.fuse_lora()` gives. The original is
    not changed."""
    out = copy.deepcopy(model)
    unet = getattr(out, "denoiser", out)
    unet = getattr(unet, "unet", unet)
    for _, layer in lora_layers(unet):
        W = layer.base_layer.weight
        # s = alpha / r from the adapter's config: layer.scaling[a] already holds the weight of the last set_adapters
        loras = [(lam, layer.lora_alpha[a] / layer.r[a], layer.lora_A[a].weight.flatten(1),
                  layer.lora_B[a].weight.flatten(1)) for a, lam in adapters.items() if a in layer.lora_A]
        if loras:
            W.copy_(merge(W.flatten(1), loras).reshape(W.shape))
    unet.disable_adapters()
    return out


def present_targets(unet: nn.Module, targets: Sequence[str] = LCM_LORA_TARGETS) -> list[str]:
    """The LCM-LoRA target module names that this UNet has (a small UNet may lack e.g. conv_shortcut)."""
    names = [n for n, _ in unet.named_modules()]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


def compose(unet: nn.Module, adapters: dict[str, float]) -> None:
    """Activate LoRA adapters with weights, e.g. {"default": 1.0, STYLE: 0.8}: the LCM-LoRA paper's
    theta' = theta_pre + lambda_1 tau_style + lambda_2 tau_LCM ({} switches every adapter off)."""
    if not adapters:
        unet.disable_adapters()
        return
    unet.enable_adapters()
    unet.set_adapters(list(adapters), weights=list(adapters.values()))


# ----------------------------------------------------------------------------------------------------------------
# Sampling (Luo et al. 2023, Algorithm 3; diffusers' LCMScheduler)
# ----------------------------------------------------------------------------------------------------------------

def multistep(f: Callable[..., Pred], z: Tensor, timesteps: Tensor, process: SDDiscrete,
              generator: torch.Generator | None = None, cond: Cond | None = None) -> Tensor:
    """Multistep latent consistency sampling. f(z, t, cond) -> Pred whose .x0 is the consistency function (cond: the
    prompts' Cond, with w for an LCM: cond.with_w(w)); timesteps the LCM timesteps (n,) (lcm_timesteps), decreasing.
    At each tau_i: z0 = f(z, t_i); before the last step, re-noise to
    the NEXT timestep with fresh noise: z = alpha(t_{i+1}) z0 + sigma(t_{i+1}) eps, eps = torch.randn(z.shape,
    generator, dtype=z.dtype); the last step returns z0. samplers.multistep with a clean denoised point on the
    integer grid ending at timestep -1 (t = 0). Equals LCMScheduler with the same noise (tests/test_lcm.py)."""
    grid = torch.cat([timesteps.to(torch.int64), torch.tensor([-1])])
    return samplers.multistep(f, z, grid, process, cond=cond, denoised="clean", generator=generator)


@torch.no_grad()
def sample(sd: Any, student: nn.Module, prompts: Sequence[str], steps: int = 4, w: float | None = None,
           seed: int = 0, batch: int = 256, sampler: Callable[..., Tensor] | None = None,
           renoise_seed: int | None = None) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] from `steps`-step LCM sampling of the student (no CFG pair: one evaluation per
    step). Initial noise from a generator seeded `seed` (as minisd.sample draws it), then the re-noising noise (from
    the same generator, or from one seeded renoise_seed). sampler: multistep's signature (a notebook's own)."""
    require_codec(sd)
    g = torch.Generator().manual_seed(seed)
    unet = student.denoiser.unet
    h = unet.config.sample_size
    z1 = torch.randn(len(prompts), unet.config.in_channels, h, h, generator=g)
    taus = lcm_timesteps(steps)
    if renoise_seed is not None:
        g = torch.Generator().manual_seed(renoise_seed)
    out = []
    for k in range(0, len(prompts), batch):
        cond = sd.text(list(prompts[k:k + batch]))
        z = (sampler or multistep)(student, z1[k:k + batch], taus, student.process, g, cond=cond.with_w(w))
        out.append(sd.vae.decode(z).clamp(-1, 1))
    return torch.cat(out)
