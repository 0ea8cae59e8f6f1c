"""Consistency models (Song, Dhariwal, Chen & Sutskever, ICML 2023, arXiv 2303.01469) and improved consistency
training (Song & Dhariwal, ICLR 2024, arXiv 2310.14189): consistency distillation (CD), consistency training (CT),
multistep consistency sampling.

A consistency function maps every point of one probability-flow ODE trajectory to the trajectory's end at t_min:
f(x_t, t) = x_{t_min} for all t, and f(x, t_min) = x (the boundary condition). `models.ConsistencyModel` builds f
from any course model so that the boundary condition holds by construction (paper Eq. 3, Appendix C), in the
paper's variance-exploding variables s = sigma(t) / alpha(t), x_ve = x / alpha(t) (precond.coefficients):

    f_theta(x, t) = alpha(t_min) (c_skip(s) x_ve + c_out(s) F_theta(x, t))     F: the EDM network output in x0_hat
    c_skip = sd^2 / ((s - s_min)^2 + sd^2),   c_out = sd (s - s_min) / sqrt(sd^2 + s^2),   s_min = s(t_min)

so a student initialised from its teacher starts as the teacher's denoiser (c_skip, c_out -> EDM's as s >> s_min).

Discretisation (course time, t_min = t_1 < t_2 < ... < t_N = 1; `cm_grid`: uniform in t, or the paper's Karras grid
in s, CMConfig.grid). Both losses draw n ~ U{1..N-1} (or
iCT's lognormal p(n), `lognormal_index_probs`), one noise z per sample, and compare the online network at the
noisier point with the target network theta^- at the cleaner point (paper Eq. 7 and 10; Algorithms 2 and 3):

    x_{t_{n+1}} = alpha_{n+1} x + sigma_{n+1} z
    CD: x_hat_{t_n} = Phi_teacher(x_{t_{n+1}}, t_{n+1} -> t_n)      one Heun (2 NFE) or DDIM (1 NFE) step of the teacher
    CT: x_hat_{t_n} = alpha_n x + sigma_n z                         the same z: the one-sample estimate of that step
    L  = lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), stopgrad f_{theta^-}(x_hat_{t_n}, t_n))
    theta^- <- stopgrad(mu theta^- + (1 - mu) theta)                  the engine's train.Target (mu = 0: a copy)

Distances (course_lib.distances, per-sample values (B,)): "l2" ||a - b||^2 as a mean over the data dimensions (the
course's convention); "pseudo-huber" (iCT, Sec. 3.3) sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(D), computed here
divided by sqrt(D), i.e. sqrt(mean (a - b)^2 + 0.00054^2) - 0.00054. The paper's LPIPS needs ImageNet-trained
weights that the course does not ship; iCT replaces it by pseudo-Huber because LPIPS leaks ImageNet features into
FID, and so does the course. lambda(t_n) is 1 ("uniform", the 2023 paper's released configs) or iCT's
1 / (s_{n+1} - s_n) ("ict"), with s = sigma / alpha the noise level in the paper's variance-exploding coordinates
(for the edm process s is the paper's sigma).

CT schedules (`ct_schedule`): the 2023 paper's progressive N(k) with adaptive target EMA mu(k) (openai/consistency_models,
`create_ema_and_scales_fn`), or iCT's doubling N(k) with mu = 0.

The method step (`cd_step`, `ct_step`) is a function for `train.train_networks`: it sees the networks by name
("student", its target "target", the frozen "teacher") and returns per-sample losses; `distill_cd` and `distill_ct`
wire it up with the engine (EMA of the student for sampling, the target network as a `train.Target`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import distances, precond, samplers, steps
from ..conditioning import Cond, unpack
from ..models import ConsistencyModel
from ..processes import AffineProcess, EDM
from ..train import Network, StepContext, Target, Trained, TrainConfig, train_networks

T_MIN = 0.002           # course time of the trajectory's end for the vp-cosine and rf processes (sigma ~ 0.003)
SIGMA_DATA = 0.5        # sd in c_skip, c_out (the paper's value)
P_MEAN, P_STD = -1.1, 2.0  # iCT's lognormal noise distribution for index sampling (Sec. 3.5)


def default_t_min(process: AffineProcess) -> float:
    """t_min of a process: the paper's sigma_min = 0.002 for edm (t = 0.002 / sigma_max), else T_MIN."""
    return 0.002 / process.sigma_max if isinstance(process, EDM) else T_MIN


# --- the consistency function ------------------------------------------------------------------------------------

def consistency_fn(model: Callable, x: Tensor, t: Tensor, t_min: float, sigma_data: float = SIGMA_DATA,
                   cond: Cond | None = None) -> Tensor:
    """f(x, t) (B, ...) of the "consistency" scalings (precond.coefficients: f = a(t) x + b(t) x0_hat) for a course
    model (x0_hat = model(x, t, cond).x0)."""
    return precond.boundary("consistency", x, t, model(x, t, cond).x0, model.process, t_min=t_min,
                            sigma_data=sigma_data).x0


def consistency_model(model: nn.Module, t_min: float | None = None, sigma_data: float = SIGMA_DATA
                      ) -> ConsistencyModel:
    """A consistency model around a (copy of a) course model: `models.ConsistencyModel`, saved and loaded with
    models.save_model / load_model. CD initialises it from the teacher's weights (the paper does)."""
    return ConsistencyModel(model, default_t_min(model.process) if t_min is None else t_min, sigma_data)


# --- discretisation, weighting, distances ------------------------------------------------------------------------

GRID_SPACINGS = ("uniform", "karras")


def cm_grid(N: int, process: AffineProcess, t_min: float, rho: float = 7.0, spacing: str | None = None,
            s_max: float | None = None) -> Tensor:
    """N increasing times t_1 = t_min < ... < t_N <= 1 (float64). spacing "karras": the paper's Karras grid in the
    variance-exploding noise level s = sigma / alpha (paper Sec. 5; iCT Sec. 3.4),

        s_i = (s_min^(1/rho) + (i - 1) / (N - 1) (s_max^(1/rho) - s_min^(1/rho)))^rho,   i = 1..N,  s_min = s(t_min)

    mapped back to course time through the process (`t_of_ve_sigma`; for edm s = sigma_max t). With s_max
    = s(1) (the default) t_N = 1; with s_max below s(1) (the paper's 80: the vp-cosine process reaches s(1) = e^10)
    the grid ends at t_N = t(s_max) < 1, where the paper's sampler starts (x ~ N(0, s_max^2) in its variables: the
    course's prior x_1 used as x_{t_N}, neglecting alpha(t_N) x0 as the prior neglects alpha(1) x0; `on_grid`).
    "uniform": uniform in t. None: the process's default, "karras" for edm and "uniform" for the vp-cosine and rf
    processes (the course's grid for CD, TCD and the notebooks). iCT's lambda = 1 / (s_{n+1} - s_n) is meant for a
    Karras grid: on the uniform-in-t vp-cosine grid s(1) / s(t_{N-1}) is about 1000 and the top interval's weight is
    ~1e-5 of the median."""
    if N < 2:
        raise ValueError(f"a consistency discretisation needs N >= 2 points (one interval); got {N}")
    if spacing is None:
        spacing = "karras" if isinstance(process, EDM) else "uniform"
    if spacing not in GRID_SPACINGS:
        raise ValueError(f"unknown grid spacing {spacing!r}; valid: {', '.join(GRID_SPACINGS)}")
    i = torch.arange(N, dtype=torch.float64) / (N - 1)
    if spacing == "uniform":
        return t_min + (1.0 - t_min) * i
    if isinstance(process, EDM) and s_max is None:
        s_min, s_max = process.sigma_max * t_min, process.sigma_max
        sig = (s_min ** (1 / rho) + i * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho
        return sig / s_max
    lo, s1 = (float(v) for v in ve_sigma(torch.tensor([t_min, 1.0], dtype=torch.float64), process))
    hi = s1 if s_max is None or s_max >= s1 else float(s_max)
    if not math.isfinite(hi):
        raise ValueError(f"a Karras grid in s = sigma / alpha needs a finite top level; the {process.name} process "
                         f"has s(1) = {s1}: pass s_max")
    if hi <= lo:
        raise ValueError(f"s_max = {hi} must be above s(t_min) = {lo}")
    t = t_of_ve_sigma((lo ** (1 / rho) + i * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho, process)
    t[0] = t_min
    if hi == s1:
        t[-1] = 1.0
    return t


def t_of_ve_sigma(s: Tensor, process: AffineProcess, iters: int = 80) -> Tensor:
    """The course time t in [0, 1] with sigma(t) / alpha(t) = s (float64, any shape), by bisection: s(t) increases
    with t for every course process (80 halvings of [0, 1] reach float64's resolution)."""
    s = s.to(torch.float64)
    lo, hi = torch.zeros_like(s), torch.ones_like(s)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = ve_sigma(mid, process) < s
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def ve_sigma(t: Tensor, process: AffineProcess) -> Tensor:
    """s = sigma(t) / alpha(t): the noise level of x_t / alpha(t), the paper's (variance-exploding) sigma."""
    return process.sigma(t) / process.alpha(t)


def ict_weight(t_cur: Tensor, t_next: Tensor, process: AffineProcess) -> Tensor:
    """iCT's lambda(t_n) = 1 / (s_{n+1} - s_n) (Song & Dhariwal 2024, Sec. 3.4), s = sigma / alpha. (B,)"""
    return 1.0 / (ve_sigma(t_next, process) - ve_sigma(t_cur, process))


def lognormal_index_probs(grid: Tensor, process: AffineProcess, p_mean: float = P_MEAN, p_std: float = P_STD
                          ) -> Tensor:
    """iCT's discretised lognormal p(n) over the N - 1 intervals of `grid` (Sec. 3.5):
    p(n) ∝ erf((ln s_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_n - P_mean) / (sqrt 2 P_std)). (N - 1,)"""
    z = (torch.log(ve_sigma(grid, process)) - p_mean) / (math.sqrt(2.0) * p_std)
    p = torch.erf(z[1:]) - torch.erf(z[:-1])
    return p / p.sum()


# --- the losses --------------------------------------------------------------------------------------------------

def cd_loss_at(student: Callable, target: Callable, teacher: Callable, x0: Tensor, eps: Tensor, t_next: Tensor,
               t_cur: Tensor, process: AffineProcess, solver: str = "heun", distance: str = "l2",
               weighting: str = "uniform", cond: Cond | None = None) -> Tensor:
    """Consistency-distillation loss (paper Eq. 7, Algorithm 2) per sample (B,) at given adjacent times
    t_cur = t_n < t_next = t_{n+1} (B,) and noise eps (B, ...). student and target are consistency models
    (their .x0 is f); teacher a course model; solver "heun" or "ddim" (course_lib.steps); cond: the conditioning (a Cond,
    e.g. labels) or None, the same for all three."""
    x_next = process.marginal(x0, t_next, eps)                                   # x_{t_{n+1}}
    with torch.no_grad():                                                        # the target is a constant
        x_cur = steps.STEPS[solver](teacher, x_next, t_next, t_cur, process, cond)     # teacher's ODE step
        f_target = target(x_cur, t_cur, cond).x0                                 # f_{theta^-}(x_hat_{t_n}, t_n)
    f_online = student(x_next, t_next, cond).x0                                  # f_theta(x_{t_{n+1}}, t_{n+1})
    loss = distances.get(distance)(f_online, f_target)
    return loss * ict_weight(t_cur, t_next, process) if weighting == "ict" else _check_weighting(weighting, loss)


def ct_loss_at(student: Callable, target: Callable, x0: Tensor, eps: Tensor, t_next: Tensor, t_cur: Tensor,
               process: AffineProcess, distance: str = "l2", weighting: str = "uniform",
               cond: Cond | None = None) -> Tensor:
    """Consistency-training loss (paper Eq. 10, Algorithm 3) per sample (B,): no teacher; the cleaner point is
    x0 noised with the SAME eps to t_cur (the one-sample estimate of the ODE step, exact as N -> infinity)."""
    with torch.no_grad():
        f_target = target(process.marginal(x0, t_cur, eps), t_cur, cond).x0
    f_online = student(process.marginal(x0, t_next, eps), t_next, cond).x0
    loss = distances.get(distance)(f_online, f_target)
    return loss * ict_weight(t_cur, t_next, process) if weighting == "ict" else _check_weighting(weighting, loss)


def _check_weighting(weighting: str, loss: Tensor) -> Tensor:
    if weighting != "uniform":
        raise ValueError(f"unknown weighting {weighting!r}; valid: uniform, ict")
    return loss


def draw_times(grid: Tensor, B: int, generator: torch.Generator, probs: Tensor | None = None, device=None,
               dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """(t_cur, t_next) (B,) each: n ~ U{1..N-1} (or ~ probs over the N - 1 intervals), t_n and t_{n+1}."""
    if probs is None:
        n = torch.randint(len(grid) - 1, (B,), generator=generator, device=generator.device)
    else:
        n = torch.multinomial(probs.to(generator.device), B, replacement=True, generator=generator)
    n = n.cpu()
    return grid[n].to(device=device, dtype=dtype), grid[n + 1].to(device=device, dtype=dtype)


# --- CT schedules ------------------------------------------------------------------------------------------------

def n_progressive(k: int, K: int, s0: int = 2, s1: int = 150) -> int:
    """The 2023 paper's N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 (points of the grid at update k
    of K; openai/consistency_models `create_ema_and_scales_fn`, scale_mode "progressive")."""
    scales = math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)
    return max(scales, 1) + 1


def mu_adaptive(k: int, K: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> float:
    """The 2023 paper's target EMA mu(k) = exp(s0 ln mu0 / (N(k) - 1)) (target_ema_mode "adaptive"): close to mu0
    while N is small, towards 1 as N grows."""
    return math.exp(s0 * math.log(mu0) / (n_progressive(k, K, s0, s1) - 1))


def n_doubling(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)) (Sec. 3.4):
    the number of intervals doubles in equal stages, from s0 to s1."""
    stages = int(math.log2(s1 // s0)) + 1
    Kp = max(1, K // stages)
    return min(s0 * 2 ** (k // Kp), s1) + 1


@dataclass
class CTSchedule:
    """N(k) and mu(k) over K updates. kind "progressive" (2023: s0 = 2, s1 = 150, mu0 = 0.9 on CIFAR-10) or
    "doubling" (iCT: s0 = 10, s1 = 1280, mu = 0)."""
    kind: str = "doubling"
    K: int = 1000
    s0: int = 10
    s1: int = 1280
    mu0: float = 0.9

    def N(self, k: int) -> int:
        if self.kind == "progressive":
            return n_progressive(k, self.K, self.s0, self.s1)
        if self.kind == "doubling":
            return n_doubling(k, self.K, self.s0, self.s1)
        raise ValueError(f"unknown CT schedule {self.kind!r}; valid: progressive, doubling")

    def mu(self, k: int) -> float:
        return mu_adaptive(k, self.K, self.s0, self.s1, self.mu0) if self.kind == "progressive" else 0.0


def ct_schedule(kind: str, K: int, **kw: Any) -> CTSchedule:
    """The CT schedule of `kind` over K updates with the paper's constants unless overridden (s0, s1, mu0)."""
    defaults = {"progressive": dict(s0=2, s1=150, mu0=0.9), "doubling": dict(s0=10, s1=1280)}
    if kind not in defaults:
        raise ValueError(f"unknown CT schedule {kind!r}; valid: {', '.join(defaults)}")
    return CTSchedule(kind, K, **{**defaults[kind], **kw})


# --- method steps for train.train_networks ------------------------------------------------------------------------

@dataclass
class CMConfig:
    """Settings of one CD or CT run (the engine's TrainConfig holds steps, batch, seed)."""
    N: int = 18                     # CD: grid points (paper: 18 on CIFAR-10, 40 on ImageNet64)
    solver: str = "heun"            # CD: the teacher's ODE step ("heun": 2 NFE, "ddim": 1)
    mu: float = 0.95                # CD: target EMA (paper: 0 on CIFAR-10, 0.95 on ImageNet64; iCT: 0)
    distance: str = "l2"            # "l2" or "pseudo-huber"
    weighting: str = "uniform"      # "uniform" or "ict" (lambda = 1 / (s_{n+1} - s_n))
    index: str = "uniform"          # n ~ "uniform" or iCT's "lognormal"
    p_mean: float = P_MEAN          # the lognormal's mean and std in ln s (iCT: -1.1, 2.0 for data of std 0.5)
    p_std: float = P_STD
    grid: str | None = None         # cm_grid's spacing: "uniform" in t, "karras" in s; None: the process's default
    s_max: float | None = None      # the Karras grid's top level (None: s(1)); below s(1) sampling starts there
    t_min: float | None = None      # None: default_t_min(process)
    sigma_data: float = SIGMA_DATA
    lr: float = 1e-4
    lr_schedule: str = "constant"   # the engine's schedules: constant, linear, cosine
    warmup: int = 0                 # linear learning-rate warm-up updates
    ema_decay: float = 0.999        # the sampling EMA (paper 0.9999 at 800k updates), separate from the target
    schedule: CTSchedule | None = field(default=None)   # CT only: N(k), mu(k)


def cd_step(cfg: CMConfig, grid: Tensor, probs: Tensor | None = None) -> Callable[[StepContext, Any], Tensor]:
    """The CD method step: nets "student" (trained), "target" (train.Target of the student) and "teacher" (frozen).
    Batches are {"x": x0, "cond": Cond or None} (conditioning.unpack)."""
    def step(ctx: StepContext, batch: Any) -> Tensor:
        x0, cond = unpack(batch)
        student, target, teacher = ctx.nets["student"], ctx.nets["target"], ctx.nets["teacher"]
        t_cur, t_next = draw_times(grid, len(x0), ctx.generator, probs, x0.device, x0.dtype)
        eps = torch.randn(x0.shape, generator=ctx.generator, device=ctx.generator.device).to(x0)
        return cd_loss_at(student, target, teacher, x0, eps, t_next, t_cur, student.process, cfg.solver,
                          cfg.distance, cfg.weighting, cond)
    return step


def ct_step(cfg: CMConfig, process: AffineProcess, t_min: float) -> Callable[[StepContext, Any], Tensor]:
    """The CT method step: nets "student" and "target"; the grid follows the schedule's N(ctx.step)."""
    sched = cfg.schedule

    def step(ctx: StepContext, batch: Any) -> Tensor:
        x0, cond = unpack(batch)
        grid = cm_grid(sched.N(ctx.step), process, t_min, spacing=cfg.grid, s_max=cfg.s_max)
        probs = (lognormal_index_probs(grid, process, cfg.p_mean, cfg.p_std) if cfg.index == "lognormal"
                 else None)
        t_cur, t_next = draw_times(grid, len(x0), ctx.generator, probs, x0.device, x0.dtype)
        if len(grid) > 1 and ctx.step % 50 == 0:
            ctx.log("N", float(len(grid)))
        eps = torch.randn(x0.shape, generator=ctx.generator, device=ctx.generator.device).to(x0)
        return ct_loss_at(ctx.nets["student"], ctx.nets["target"], x0, eps, t_next, t_cur, process, cfg.distance,
                          cfg.weighting, cond)
    return step


def distill_cd(teacher: nn.Module, data: Callable[[int, torch.Generator], Any], cfg: CMConfig, *, run: TrainConfig,
               ckpt_dir=None, accelerator=None, progress: bool = True) -> tuple[ConsistencyModel, Trained]:
    """Consistency distillation: a ConsistencyModel initialised from the teacher's weights learns f on the teacher's
    ODE (cfg.N grid points, cfg.solver steps). Returns (the student to sample from: its EMA when ema_decay > 0,
    eval mode, no grad; the engine's Trained)."""
    process = teacher.process
    t_min = default_t_min(process) if cfg.t_min is None else cfg.t_min
    student = consistency_model(copy.deepcopy(teacher), t_min, cfg.sigma_data).requires_grad_(True).train()
    frozen = copy.deepcopy(teacher).requires_grad_(False).eval()
    grid = cm_grid(cfg.N, process, t_min, spacing=cfg.grid, s_max=cfg.s_max)
    probs = (lognormal_index_probs(grid, process, cfg.p_mean, cfg.p_std) if cfg.index == "lognormal"
             else None)
    done = train_networks({"student": _network(student, cfg)}, cd_step(cfg, grid, probs),
                          data, run, targets={"target": Target("student", decay=cfg.mu)},
                          frozen={"teacher": frozen}, ckpt_dir=ckpt_dir, progress=progress, accelerator=accelerator,
                          extra_config={"method": "consistency-distillation", **_describe(cfg)})
    return done.best("student").eval().requires_grad_(False), done


def distill_ct(model: nn.Module, data: Callable[[int, torch.Generator], Any], cfg: CMConfig, *, run: TrainConfig,
               ckpt_dir=None, accelerator=None, progress: bool = True) -> tuple[ConsistencyModel, Trained]:
    """Consistency training (the driver shaped like every method's, though no teacher distils) of `model` (a course model, usually freshly initialised: no teacher anywhere) wrapped
    as a ConsistencyModel, with cfg.schedule's N(k) and mu(k) (default: iCT's doubling schedule over the run)."""
    process = model.process
    t_min = default_t_min(process) if cfg.t_min is None else cfg.t_min
    if cfg.schedule is None:
        cfg = CMConfig(**{**cfg.__dict__, "schedule": ct_schedule("doubling", run.steps)})
    student = consistency_model(model, t_min, cfg.sigma_data).requires_grad_(True).train()
    sched = cfg.schedule
    done = train_networks({"student": _network(student, cfg)},
                          ct_step(cfg, process, t_min), data, run,
                          targets={"target": Target("student", decay=sched.mu)}, ckpt_dir=ckpt_dir,
                          progress=progress, accelerator=accelerator,
                          extra_config={"method": "consistency-training", **_describe(cfg)})
    return done.best("student").eval().requires_grad_(False), done


def _network(student: nn.Module, cfg: CMConfig) -> Network:
    return Network(student, lr=cfg.lr, lr_schedule=cfg.lr_schedule, warmup=cfg.warmup, ema_decay=cfg.ema_decay)


def _describe(cfg: CMConfig) -> dict:
    d = {k: v for k, v in cfg.__dict__.items() if k != "schedule"}
    if cfg.schedule is not None:
        d["schedule"] = dict(cfg.schedule.__dict__)
    return d


# --- sampling ----------------------------------------------------------------------------------------------------

def multistep_sample(model: Callable, x: Tensor, ts: Tensor | list[float], process: AffineProcess, t_min: float,
                     noises: Tensor | None = None, generator: torch.Generator | None = None,
                     return_path: bool = False, cond: Cond | None = None) -> Tensor:
    """Multistep consistency sampling (paper Algorithm 1) from x = x_{ts[0]} (B, ...), ts decreasing (ts[0] = 1):

        x0 = f(x, ts[0])
        for tau in ts[1:]:  x_tau = alpha_tau / alpha_min x0 + sqrt(sigma_tau^2 - (alpha_tau / alpha_min)^2 sigma_min^2) z
                            x0 = f(x_tau, tau)

    (x0 is a point at t_min, so it is re-noised from t_min to tau with the process's own kernel; for edm this is the
    paper's x0 + sqrt(tau^2 - sigma_min^2) z.) One evaluation per entry of ts: samplers.multistep with the denoised
    point at t_min on the grid [*ts, t_min]. noises (len(ts) - 1, B, ...) fixes the fresh z; otherwise they are
    drawn from `generator` (on its device, then moved). With return_path the states x_tau and the result,
    (len(ts) + 1, B, ...)."""
    grid = torch.tensor([*(float(v) for v in ts), float(t_min)], dtype=torch.float64)
    return samplers.multistep(model, x, grid, process, cond=cond, denoised=float(t_min), noises=noises, generator=generator,
                              return_path=return_path)


def step_times(n: int, intermediate: list[float] | None = None) -> list[float]:
    """The sampling times for n steps: [1] for one step; [1, *intermediate] when given (decreasing, in (t_min, 1));
    otherwise n times evenly spaced from 1 down (1, (n-1)/n, ..., 1/n). The paper picks the intermediate times by
    a ternary search on FID (scripts/ternary_search.py); notebook 05 lets the reader tune them."""
    if n < 1:
        raise ValueError(f"need at least one step; got {n}")
    if intermediate is not None:
        if len(intermediate) != n - 1:
            raise ValueError(f"{n} steps need {n - 1} intermediate times after t = 1; got {intermediate}")
        ts = [1.0, *map(float, intermediate)]
        if any(b >= a for a, b in zip(ts, ts[1:])) or ts[-1] <= 0:
            raise ValueError(f"step times must decrease from 1 and stay above 0; got {ts}")
        return ts
    return [1.0 - k / n for k in range(n)]


def on_grid(ts: list[float], grid: Tensor) -> list[float]:
    """Step times moved to the nearest points of a training grid (increasing, float64), ts[0] = 1 kept (or lowered
    to the grid's top t_N where a Karras grid stops below s(1): sampling starts there, `cm_grid`): CD and CT
    train f only at the grid's points, and a short run's f between them can be far worse (bench cd measured a
    two-step checkerboard student at 2.2x the teacher's best SWD at tau = 0.5, 1.45x at the grid point 0.446)."""
    out = [min(float(ts[0]), float(grid[-1]))] + [float(grid[int(torch.argmin((grid - float(t)).abs()))]) for t in ts[1:]]
    if any(b >= a for a, b in zip(out, out[1:])):
        raise ValueError(f"step times {list(ts)} do not stay distinct on a grid of {len(grid)} points: {out}")
    return out

