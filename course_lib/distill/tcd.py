"""Trajectory consistency distillation (TCD; Zheng, Hu, Zhang, Li & Yan, arXiv 2402.19159, 2024) and its strategic
stochastic sampler (SSS, the gamma sampler), on the course's 2D processes and on the mini Stable Diffusion.

A consistency model (notebooks 05, 06) maps every point of a trajectory to its END. TCD's trajectory consistency
function (TCF) maps a point x_t to ANY earlier point s <= t of the same probability-flow ODE trajectory. It is the
first-order semi-linear (exponential-integrator) solution of the ODE from t to s, with the network's data estimate
frozen at t (paper Sec. 4.1, the first-order TCF; lambda = log(alpha / sigma), h = lambda_s - lambda_t >= 0):

    f_theta(x_t, t, s) = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) x0_hat_theta(x_t, t)          `tcf`
                       = alpha_s x0_hat + sigma_s eps_hat,   eps_hat = (x_t - alpha_t x0_hat) / sigma_t   (a DDIM jump)

so f(x_t, t, t) = x_t exactly (h = 0) and no c_skip / c_out is needed; at s = 0 it is x0_hat. The network does not
see s: the whole s-dependence is the closed form above.

The loss (paper Algorithm 1; LCD of notebook 06 with a random end point), per sample:

    n on the grid, t_{n+k} > t_n adjacent (the skipping step);   s ~ U[0, t_n]                       (end point)
    x_{t_{n+k}} = alpha x0 + sigma eps
    x_hat_{t_n} = Phi_teacher(x_{t_{n+k}}, t_{n+k} -> t_n)            one DDIM step (guided on the mini SD)
    L = d( f_theta(x_{t_{n+k}}, t_{n+k}, s),  stopgrad f_theta^-(x_hat_{t_n}, t_n, s) )             both jump to s
    theta^- <- mu theta^- + (1 - mu) theta                                                           (train.Target)

Sampling (Sec. 4.3, diffusers' TCDScheduler with eta = gamma): at each step t -> t', jump with the TCF to
s' = (1 - gamma) t' (below t'), then add fresh noise forward from s' to t'. gamma = 0 is deterministic (DDIM-like),
gamma = 1 jumps to 0 and re-noises (multistep consistency sampling). In course time this is `samplers.tcd`; on
diffusers' integer timesteps (the mini SD) it is `sss`, which equals TCDScheduler step for step.

TCD's released code is inference only (jabir-zheng/TCD); its trainer was never published. The course's choices,
named: on 2D the grid is consistency.cm_grid (uniform in t from t_min, N points), the teacher's step one DDIM step,
s ~ U[0, t_n] continuous, squared L2; on the mini SD everything is LCM's (notebook 06: the 50-point DDIM grid with
skipping step k = 20, the guided teacher (1 + w) cond - w uncond, the zero-initialised w-embedding, Huber distance,
target EMA 0.95) and the end point is an integer timestep tau_s ~ U{0, ..., tau_n}, so that the sampler's end
points floor((1 - gamma) tau') are all in the training range (the authors (TCD issue 8) report that drawing it on the
skip grid or on every timestep both work, the skip grid "slightly" better).
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import distances, samplers, steps
from ..conditioning import Cond, unpack
from ..grids import ddim_timesteps, lcm_timesteps, skipping_step
from ..guidance import cfg as guided
from ..predictions import Pred
from ..processes import AffineProcess, SDDiscrete, bcast
from ..sd import require_codec
from ..train import Network, StepContext, Target, Trained, TrainConfig, train_networks
from . import lcm
from .consistency import T_MIN, cm_grid

GAMMA = 0.3          # the README's recommended gamma (jabir-zheng/TCD; "higher with more steps")


# ----------------------------------------------------------------------------------------------------------------
# The trajectory consistency function
# ----------------------------------------------------------------------------------------------------------------

def tcf_from_x0(x0: Tensor, x_t: Tensor, t: Tensor, s: Tensor, process: AffineProcess) -> Tensor:
    """The first-order TCF given the data estimate x0_hat (B, ...) at (x_t (B, ...), t (B,)), to s (B,), s <= t:
    (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) x0_hat, with alpha_s e^{-h} = sigma_s alpha_t / sigma_t."""
    a_s, s_s = bcast(process.alpha(s).to(x_t), x_t), bcast(process.sigma(s).to(x_t), x_t)
    a_t, s_t = bcast(process.alpha(t).to(x_t), x_t), bcast(process.sigma(t).to(x_t), x_t)
    ratio = s_s / s_t.clamp_min(1e-12)                                     # sigma_s / sigma_t = e^{-h} alpha_s / alpha_t
    return (ratio * x_t + (a_s - ratio * a_t) * x0).to(x_t.dtype)


def tcf(model: Callable[..., Pred], x_t: Tensor, t: Tensor, s: Tensor, process: AffineProcess,
        cond: Cond | None = None) -> Tensor:
    """f_theta(x_t, t, s) (B, ...): the trajectory consistency function of a course model (model(x_t, t, ...) -> Pred,
    its x0 is x0_hat_theta), from t (B,) to s (B,) with s <= t (Zheng et al. 2024, Sec. 4.1, first order).
    cond goes to the model (labels; on the mini SD the prompts' Cond with w, cond.with_w(w))."""
    return tcf_from_x0(model(x_t, t, cond).x0, x_t, t, s, process)


# ----------------------------------------------------------------------------------------------------------------
# The loss on the course's continuous-time processes (the 2D teachers)
# ----------------------------------------------------------------------------------------------------------------

def tcd_loss_at(student: Callable[..., Pred], target: Callable[..., Pred], teacher: Callable[..., Pred], x0: Tensor,
                eps: Tensor, t_next: Tensor, t_cur: Tensor, s: Tensor, process: AffineProcess, solver: str = "ddim",
                distance: str = "l2", cond: Cond | None = None) -> Tensor:
    """TCD's loss per sample (B,) at adjacent times t_cur = t_n < t_next = t_{n+k} (B,) and end points s <= t_cur
    (B,) (Algorithm 1): the teacher's ONE `solver` step (steps.STEPS) from x_{t_next} = alpha x0 + sigma eps to t_cur,
    then d(f_theta(x_{t_next}, t_next, s), stopgrad f_theta^-(x_hat_{t_cur}, t_cur, s)). student, target: course
    models (their x0 is x0_hat_theta; the TCF is built around them); cond: keyword inputs (labels y) of all three."""
    x_next = process.marginal(x0, t_next, eps)                                    # x_{t_{n+k}}
    with torch.no_grad():                                                         # the target is a constant
        x_cur = steps.STEPS[solver](teacher, x_next, t_next, t_cur, process, cond)     # x_hat_{t_n}
        f_target = tcf(target, x_cur, t_cur, s, process, cond)                   # f_theta^-(x_hat_{t_n}, t_n, s)
    f_online = tcf(student, x_next, t_next, s, process, cond)                    # f_theta(x_{t_{n+k}}, t_{n+k}, s)
    return distances.get(distance)(f_online, f_target)


def draw_times(grid: Tensor, B: int, generator: torch.Generator, device=None, dtype=torch.float32
               ) -> tuple[Tensor, Tensor, Tensor]:
    """(t_cur, t_next, s) (B,) each: n ~ U{1..N-1} on the increasing grid (N,), t_n = grid[n-1], t_{n+1} = grid[n],
    and the end point s = u t_n with u ~ U[0, 1) (s in [0, t_n], the course's continuous choice)."""
    n = torch.randint(1, len(grid), (B,), generator=generator, device=generator.device).cpu()
    u = torch.rand(B, generator=generator, device=generator.device, dtype=torch.float64).cpu()
    t_cur, t_next = grid[n - 1], grid[n]
    return (t_cur.to(device=device, dtype=dtype), t_next.to(device=device, dtype=dtype),
            (u * t_cur).to(device=device, dtype=dtype))


@dataclass
class TCDConfig:
    """Settings of a 2D (or digits) TCD run (the engine's TrainConfig holds steps, batch, seed)."""
    N: int = 10                     # grid points from t_min to 1 (the skipping step is one interval)
    t_min: float = T_MIN
    solver: str = "ddim"            # the teacher's step: "ddim" (1 NFE, as TCD/LCM on SD) or "heun" (2 NFE)
    mu: float = 0.9                 # target EMA (TCD/LCM on SD: 0.95)
    distance: str = "l2"
    lr: float = 1e-3
    ema_decay: float = 0.95         # the sampling EMA, separate from the target


def tcd_step(cfg: TCDConfig, grid: Tensor) -> Callable[[StepContext, Any], Tensor]:
    """The TCD method step for train.train_networks: nets "student" (trained), "target" (its train.Target) and
    "teacher" (frozen); batches are {"x": x0, "cond": Cond or None}."""
    def step(ctx: StepContext, batch: Any) -> Tensor:
        x0, cond = unpack(batch)
        t_cur, t_next, s = draw_times(grid, len(x0), ctx.generator, x0.device, x0.dtype)
        eps = torch.randn(x0.shape, generator=ctx.generator, device=ctx.generator.device).to(x0)
        return tcd_loss_at(ctx.nets["student"], ctx.nets["target"], ctx.nets["teacher"], x0, eps, t_next, t_cur, s,
                           ctx.nets["student"].process, cfg.solver, cfg.distance, cond)
    return step


def distill_tcd(teacher: nn.Module, data: Callable[[int, torch.Generator], Any], cfg: TCDConfig, *, run: TrainConfig,
                ckpt_dir=None, accelerator=None, progress: bool = True) -> tuple[nn.Module, Trained]:
    """TCD of a course model (a 2D or digits teacher): the student is a copy of the teacher (a plain course model:
    sample it with samplers.tcd, whose steps are its TCF). Returns (the student to sample from, its EMA when
    cfg.ema_decay > 0, eval mode, no grad; the engine's Trained)."""
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    frozen = copy.deepcopy(teacher).requires_grad_(False).eval()
    grid = cm_grid(cfg.N, teacher.process, cfg.t_min)
    done = train_networks({"student": Network(student, lr=cfg.lr, ema_decay=cfg.ema_decay)}, tcd_step(cfg, grid),
                          data, run, targets={"target": Target("student", decay=cfg.mu)},
                          frozen={"teacher": frozen}, ckpt_dir=ckpt_dir, progress=progress, accelerator=accelerator,
                          extra_config={"method": "trajectory-consistency-distillation", **asdict(cfg)})
    return done.best("student").eval().requires_grad_(False), done


# ----------------------------------------------------------------------------------------------------------------
# The mini Stable Diffusion: LCM's pieces, a TCF student
# ----------------------------------------------------------------------------------------------------------------

class TCDModel(lcm.LCMModel):
    """A TCD student of a latent teacher: forward(x, t, cond) -> Pred, the denoiser's own x0_hat and eps (no
    boundary scalings: the TCF needs none), with LCM's w-embedding of cond.w and its range check (lcm.LCMModel)."""

    def forward(self, x: Tensor, t: Tensor, cond: Cond) -> Pred:
        return self.denoiser(x, t, self.w_input(cond))

    def config(self) -> dict:
        return {**super().config(), "arch": "tcd"}


def tcd_student(teacher: nn.Module, w_dim: int = lcm.W_EMBED_DIM, w_range: tuple[float, float] = lcm.W_RANGE,
                seed: int = 0) -> TCDModel:
    """A trainable TCD student: the teacher's UNet with a zero-initialised w-embedding (lcm.lcm_student)."""
    return TCDModel(lcm.lcm_student(teacher, w_dim, w_range, seed).denoiser, w_range=w_range)


def tcd_sd_target(teacher: Callable[..., Pred], target: Callable[..., Pred], z: Tensor, timesteps: Tensor, k: int,
                  s_timesteps: Tensor, cond: Cond, w: Tensor, process: SDDiscrete) -> Tensor:
    """The TCD target (B, ...) without gradients: the guided teacher's ONE DDIM step from tau_{n+k} = timesteps (B,)
    to tau_n = max(tau_{n+k} - k, 0) (lcm.lcm_target's step), then the target network's TCF from tau_n to the end
    timesteps s_timesteps (B,) <= tau_n. z = z_{tau_{n+k}} (B, ...); w (B,) course w."""
    t_next = process.t_of_timestep(timesteps).to(torch.float32)
    t_cur = process.t_of_timestep((timesteps - k).clamp_min(0)).to(torch.float32)
    s = process.t_of_timestep(s_timesteps).to(torch.float32)
    with torch.no_grad():
        pred = guided(teacher, w)(z, t_next, cond)                        # (1 + w) cond - w uncond, x0 and eps
        z_cur = steps.ddim_step(pred, t_next, t_cur, process)            # z_hat_{tau_n}
        return tcf(target, z_cur, t_cur, s, process, cond.with_w(w))     # f_theta^-(z_hat_{tau_n}, tau_n, s)


def tcd_sd_loss(student: Callable[..., Pred], target: Callable[..., Pred], teacher: Callable[..., Pred], z0: Tensor,
                eps: Tensor, timesteps: Tensor, k: int, s_timesteps: Tensor, cond: Cond, w: Tensor,
                process: SDDiscrete, distance: str = "huber") -> Tensor:
    """TCD's loss per sample (B,) on integer timesteps: d(f_theta(z_{n+k}, tau_{n+k}, s), tcd_sd_target(...))."""
    t_next = process.t_of_timestep(timesteps).to(torch.float32)
    s = process.t_of_timestep(s_timesteps).to(torch.float32)
    z_next = process.marginal(z0, t_next, eps).to(z0.dtype)                  # z_{tau_{n+k}}
    tgt = tcd_sd_target(teacher, target, z_next, timesteps, k, s_timesteps, cond, w, process)
    return distances.get(distance)(tcf(student, z_next, t_next, s, process, cond.with_w(w)), tgt)


def draw_end_timesteps(timesteps: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """tau_s ~ U{0, ..., tau_n} per sample (int64 (B,)), tau_n = max(timesteps - k, 0)."""
    tau_n = (timesteps.cpu() - k).clamp_min(0)
    u = torch.rand(len(timesteps), generator=generator, device=generator.device, dtype=torch.float64).cpu()
    return torch.floor(u * (tau_n + 1).to(torch.float64)).to(torch.int64).clamp(max=tau_n)


def tcd_sd_step(ctx: StepContext, batch: Mapping[str, Any], process: SDDiscrete, cfg: lcm.LCMConfig) -> Tensor:
    """The method step for train.train_networks on the mini SD: tau_{n+k} on LCM's DDIM grid, the end timestep, eps
    and w per sample; nets "student", "target" (its EMA) and "teacher"."""
    z0, cond = unpack(batch)
    g, B = ctx.generator, len(z0)
    k = skipping_step(cfg.original_steps, process.T)
    grid = ddim_timesteps(cfg.original_steps, process.T)
    timesteps = grid[torch.randint(len(grid), (B,), generator=g, device=g.device).cpu()]
    s_timesteps = draw_end_timesteps(timesteps, k, g)
    eps = torch.randn(z0.shape, generator=g, device=g.device).to(z0)
    w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(B, generator=g, device=g.device)).to(z0.device)
    return tcd_sd_loss(ctx.nets["student"], ctx.nets["target"], ctx.nets["teacher"], z0, eps,
                       timesteps.to(z0.device), k, s_timesteps.to(z0.device), cond, w, process, cfg.distance)


def distill_tcd_sd(sd: Any, data: Callable, cfg: lcm.LCMConfig, *, run: TrainConfig,
                   ckpt_dir: str | os.PathLike | None = None, accelerator=None, progress: bool = True
                   ) -> tuple[TCDModel, Trained]:
    """TCD of sd (sd.SD: model, text, vae; its latent space; the teacher is sd.model) into a student with a
    w-embedding trained on [cfg.w_min, cfg.w_max], with LCM's settings (lcm.LCMConfig), on data as
    lcm.distill_lcm's; run: e.g. lcm.train_config(cfg, "TCD: mini SD student"). Resumes from ckpt_dir. Returns
    (the student, eval, no grad; the engine's Trained)."""
    require_codec(sd)
    teacher = sd.model
    student = tcd_student(teacher, cfg.w_dim, (cfg.w_min, cfg.w_max), cfg.seed)
    net = Network(student, lr=cfg.lr, grad_clip=cfg.grad_clip, warmup=cfg.warmup, weight_decay=0.0)
    done = train_networks({"student": net}, lambda ctx, b: tcd_sd_step(ctx, b, teacher.process, cfg), data, run,
                          targets={"target": Target("student", cfg.target_decay)}, frozen={"teacher": teacher},
                          ckpt_dir=ckpt_dir, accelerator=accelerator, extra_config={"tcd": asdict(cfg)},
                          progress=progress)
    return student.eval().requires_grad_(False), done


# ----------------------------------------------------------------------------------------------------------------
# Strategic stochastic sampling on diffusers' integer timesteps (TCDScheduler)
# ----------------------------------------------------------------------------------------------------------------

def check_gamma(gamma: float) -> float:
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"TCD's gamma (diffusers' eta) must be in [0, 1] (0: deterministic, 1: multistep consistency "
                         f"sampling); got {gamma}")
    return float(gamma)


def tcd_timesteps(n: int, original_steps: int = lcm.ORIGINAL_STEPS, T: int = 1000) -> Tensor:
    """The n timesteps TCDScheduler.set_timesteps(n) visits: LCM's (grids.lcm_timesteps), e.g. 999, 759, 499, 259."""
    return lcm_timesteps(n, original_steps, T)


@torch.no_grad()
def sss(f: Callable[..., Pred], z: Tensor, timesteps: Tensor, process: SDDiscrete,
        generator: torch.Generator | None = None, gamma: float = GAMMA, cond: Cond | None = None) -> Tensor:
    """Strategic stochastic sampling on integer timesteps (decreasing, (n,)), step for step diffusers' TCDScheduler
    with eta = gamma. f(z, t, cond) -> Pred (x0_hat, eps_hat at course time t). At each tau_i, with tau' the next timestep
    (0 after the last):

        tau_s = floor((1 - gamma) tau')
        z_s   = sqrt(abar_{tau_s}) x0_hat + sqrt(1 - abar_{tau_s}) eps_hat                TCF jump tau_i -> tau_s
        z     = sqrt(abar_{tau'} / abar_{tau_s}) z_s + sqrt(1 - abar_{tau'} / abar_{tau_s}) noise   (not last; gamma > 0)

    and the last step returns z_s (at timestep 0, abar_0 = 0.99915, as diffusers): samplers.multistep (TCD's jump)
    on the integer grid ending at timestep 0. noise = torch.randn(z.shape, generator, dtype=z.dtype) in order. The
    signature of lcm.multistep (pass functools.partial(sss, gamma=...) as lcm.sample's or recipes.lcm.evaluate's
    sampler)."""
    grid = torch.cat([timesteps.to(torch.int64), torch.tensor([0])])
    return samplers.multistep(f, z, grid, process, gamma=check_gamma(gamma), generator=generator, cond=cond)


def sampler(gamma: float = GAMMA) -> Callable[..., Tensor]:
    """sss with gamma fixed, in lcm.multistep's signature (for lcm.sample / recipes.lcm.evaluate)."""
    gamma = check_gamma(gamma)
    return lambda f, z, timesteps, process, generator=None, cond=None: sss(f, z, timesteps, process, generator, gamma,
                                                                          cond)


def sample(sd: Any, student: nn.Module, prompts: Sequence[str], steps: int = 4, w: float | None = None,
           seed: int = 0, gamma: float = GAMMA) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1]: `steps`-step SSS of a TCD student (lcm.sample's noise and batching)."""
    return lcm.sample(sd, student, prompts, steps, w, seed, sampler=sampler(gamma))
