"""Hyper-SD (Ren, Xia, Lu, Zhang, Wu, Xie, Xiao, Wang & Xiao (ByteDance), NeurIPS 2024, arXiv 2404.13686):
trajectory segmented consistency distillation (TSCD), reward feedback, score distillation, one model sampled at
1, 2, 4 and 8 steps by TCD's gamma sampler. No training code was released; the pieces below are the paper's
Sec. 3.1-3.3 built from the course's consistency, TCD, DMD and GAN code (named where reused).

TSCD (Sec. 3.1, Fig. 2). Split the time range [t_min, T] into k equal segments with edges
e_0 = t_min < e_1 < ... < e_k = T. For t in the segment (e_{m}, e_{m+1}] its SEGMENT START is s(t) = e_m
(`segment_start`; the course time t_min itself is its own start). Inside a segment the student maps x_t to the
segment start by the DDIM jump (the first-order trajectory consistency function of TCD, `tcd.tcf`; PCM's
parameterisation, c_skip = 0 / c_out = 1 on the jump):

    f_theta(x_t, t, s) = (sigma_s / sigma_t) x_t + (alpha_s - alpha_t sigma_s / sigma_t) x0_hat_theta(x_t, t)

so f_theta(x, s, s) = x exactly: the boundary condition holds at every segment start by construction. The loss
(the paper's L_TSCD, consistency distillation restricted to a segment; grid t_1 = t_min < ... < t_N = T whose
points include every edge, n on the grid, t_n and t_{n+1} in the same segment):

    s = s(t_{n+1}),   x_{t_{n+1}} = alpha x0 + sigma eps
    x_hat_{t_n} = Phi_teacher(x_{t_{n+1}}, t_{n+1} -> t_n)                   the teacher's ODE step (steps.STEPS)
    L = d( f_theta(x_{t_{n+1}}, t_{n+1}, s),  stopgrad f_{theta^-}(x_hat_{t_n}, t_n, s) )     (`tscd_loss_at`)
        + lambda_adv L_adv                                                   (optional, on re-noised samples)
    theta^- <- mu theta^- + (1 - mu) theta                                   (the engine's train.Target)

When t_n is the segment start itself the target is the teacher's point x_hat_{t_n} (f(x, s, s) = x). With k = 1
the only segment start is t_min and TSCD is consistency distillation (notebook 05) with the DDIM-jump consistency
function. d is the course's distance registry ("l2", "pseudo-huber", "huber"). The adversarial term (Hyper-SD's
"MSE + adversarial", as in PCM and LADD) compares the student's segment-start point with the target's, both
re-noised from s to a time t' ~ U(s, s_end] INSIDE the segment with the process's kernel (`samplers.renoise`) and
read by the frozen teacher's own layers (`gan.tapped`) under trainable heads (`gan.Head`): `SegmentDiscriminator`,
non-saturating losses (`gan.adversarial`).

Stages (Sec. 3.1): k = 8 -> 4 -> 2 -> 1, each initialised from the previous stage's student, whose model is also the
next stage's TEACHER (progressive, as in progressive distillation). `distill_tscd` runs them, each stage a resumable
engine run in its own checkpoint folder (ckpt_dir/k8, k4, ...).

Reward feedback (Sec. 3.2, ReFL: Xu et al. 2023, ImageReward): from a late time t (a little noise left) the
student's one-step prediction x0_hat = x0_theta(x_t, t) is scored by a reward model, its gradient flowing through
the prediction (and, on the mini SD, through the VAE decoder inside reward_fn) into the student:

    L_reward = - r(x0_hat, c)      or ReFL's  relu(margin - r(x0_hat, c))                       (`refl_loss`)

x_t comes from the student's own rollout without gradient (ReFL runs the sampler to t, then takes one step with
gradient): here one step from noise to x0, re-noised to t. A TSCD term (k = 1, the frozen TSCD student as teacher)
keeps the student on its trajectories (ReFL's pre-training loss beside the reward).

Score distillation (Sec. 3.3): the one-step end is refined by DMD's distribution-matching gradient (notebook 09,
`dmd.distill_dmd` with the student as the generator, the ORIGINAL teacher as the real score).

The unified sampler: TCD's strategic stochastic sampling (`samplers.tcd`, diffusers' TCDScheduler with eta = gamma)
on the trailing grid 1, (n-1)/n, ..., 1/n, 0 at n = 1, 2, 4, 8 steps (`sample`).
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import distances, grids, samplers, steps
from ..conditioning import Cond, unpack
from ..config import seeded
from ..processes import AffineProcess
from ..train import Network, StepContext, Target, Trained, TrainConfig, train_networks
from . import dmd
from .consistency import T_MIN, cm_grid, draw_times
from .gan import Head, adversarial, default_taps, guard, tapped
from .tcd import tcf

SEGMENTS = (8, 4, 2, 1)     # the paper's stages
TOL = 1e-9                  # a time within TOL of an edge IS that edge (float64 edges computed two ways)


# ----------------------------------------------------------------------------------------------------------------
# Segments
# ----------------------------------------------------------------------------------------------------------------

def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of segments k must be an int >= 1; got {k!r}")
    return k


def segment_edges(k: int, t_min: float = 0.0, T: float = 1.0, grid: Tensor | None = None) -> Tensor:
    """The k + 1 increasing edges e_0 = t_min < ... < e_k = T of k equal segments (float64 (k + 1,)).
    With `grid` (an increasing 1D tensor of N points, course times or integer timesteps) the edges are grid points:
    grid[round(m (N - 1) / k)] (equal segments of (N - 1) / k intervals when k divides N - 1; PCM's phase edges on
    its DDIM grid), returned in the grid's dtype; t_min and T are then the grid's ends."""
    _check_k(k)
    if grid is None:
        if not T > t_min:
            raise ValueError(f"segments need T > t_min; got t_min = {t_min}, T = {T}")
        return t_min + (T - t_min) * torch.arange(k + 1, dtype=torch.float64) / k
    if grid.ndim != 1 or len(grid) < 2 or not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"grid must be an increasing 1D tensor of at least 2 points; got shape {tuple(grid.shape)}")
    if k > len(grid) - 1:
        raise ValueError(f"k = {k} segments need at least k intervals; the grid has {len(grid) - 1}")
    idx = [round(m * (len(grid) - 1) / k) for m in range(k + 1)]
    return grid[torch.tensor(idx)]


def _tol(t: Tensor, hi: float) -> float:
    """How close to an edge a time of t's dtype counts as ON it: float32 course times carry ~1e-7 of rounding."""
    eps = torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0
    return max(TOL, 8 * eps) * max(1.0, abs(hi))


def segment_start(t: Tensor, k: int, t_min: float = 0.0, T: float = 1.0, grid: Tensor | None = None) -> Tensor:
    """s(t), the start of t's segment when [t_min, T] is split into k equal segments (t (B,) or any shape; the
    result has t's shape and dtype). Segments are (e_m, e_{m+1}]: an edge belongs to the segment BELOW it (its
    start is the previous edge: a point at an edge is mapped one segment down, the boundary condition holds at
    the start), and t_min is its own start. With `grid` the edges are grid points (`segment_edges`) and t may be
    any time in the grid's range (usually a grid point). Times outside [t_min, T] raise ValueError."""
    edges = segment_edges(k, t_min, T, grid)
    lo, hi = float(edges[0]), float(edges[-1])
    tt = t.detach().to(torch.float64).cpu()
    tol = _tol(t, hi)
    if bool((tt < lo - tol).any()) or bool((tt > hi + tol).any()):
        raise ValueError(f"times must lie in [{lo:g}, {hi:g}] (the segmented range); got values in "
                         f"[{float(tt.min()):g}, {float(tt.max()):g}]")
    e = edges.to(torch.float64)
    m = (torch.searchsorted(e, (tt - tol).reshape(-1).contiguous()) - 1).clamp(0, k - 1)   # edges strictly below t
    return edges[m].reshape(t.shape).to(device=t.device, dtype=t.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The TSCD target and loss
# ----------------------------------------------------------------------------------------------------------------

def _check_same_segment(t_cur: Tensor, s: Tensor) -> None:
    if bool((t_cur.detach().double() < s.detach().double() - 1e-6).any()):
        raise ValueError("t_cur lies below the segment start s for some samples: the teacher's step t_{n+1} -> t_n "
                         "crossed a segment edge. Put every edge on the training grid (segment_edges(k, grid=grid)) "
                         "or draw t_n, t_{n+1} inside one segment.")


def tscd_target(teacher: Callable, target: Callable, x_next: Tensor, t_next: Tensor, t_cur: Tensor, s: Tensor,
                process: AffineProcess, solver: str = "ddim", cond: Cond | None = None) -> Tensor:
    """The TSCD target (B, ...) without gradients: the teacher's ONE `solver` step from x_next = x_{t_{n+1}} (B, ...)
    at t_next (B,) to t_cur = t_n (B,), then the TARGET network theta^- mapped to the segment start s (B,) <= t_cur
    by the DDIM jump (tcd.tcf; at t_cur = s it returns the teacher's point itself: the boundary condition)."""
    _check_same_segment(t_cur, s)
    with torch.no_grad():
        x_cur = steps.STEPS[solver](teacher, x_next, t_next, t_cur, process, cond)    # x_hat_{t_n}
        return tcf(target, x_cur, t_cur, s, process, cond)                            # f_{theta^-}(x_hat, t_n, s)


def tscd_loss_at(student: Callable, target: Callable, teacher: Callable, x0: Tensor, eps: Tensor, t_next: Tensor,
                 t_cur: Tensor, s: Tensor, process: AffineProcess, solver: str = "ddim", distance: str = "l2",
                 cond: Cond | None = None, return_points: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """L_TSCD per sample (B,): d(f_theta(x_{t_next}, t_next, s), tscd_target(...)) with x_{t_next} = alpha x0 +
    sigma eps (x0, eps (B, ...); t_next, t_cur, s (B,), s = segment_start(t_next)). With return_points also the
    student's segment-start point (with grad) and the target (the adversarial term's fake and real)."""
    x_next = process.marginal(x0, t_next, eps)                                       # x_{t_{n+1}}
    want = tscd_target(teacher, target, x_next, t_next, t_cur, s, process, solver, cond)
    got = tcf(student, x_next, t_next, s, process, cond)                             # f_theta(x_{t_{n+1}}, t_{n+1}, s)
    loss = distances.get(distance)(got, want)
    return (loss, got, want) if return_points else loss


class SegmentDiscriminator(nn.Module):
    """The adversarial term's discriminator (LADD / PCM): samples x (B, ...) at their segment start s (B,) are
    re-noised inside the segment, t' = s + u (s_end - s) with u ~ U(0, 1], x_t' = renoise(x, s -> t') (the process's
    kernel), and read by the FROZEN teacher's layers `taps` at (x_t', t'); one trainable gan.Head per layer, summed
    into a logit (B,). The teacher is shared (not a registered submodule): checkpoints hold the heads only."""

    def __init__(self, teacher: nn.Module, x_example: Tensor, taps: Sequence[str] | None = None, hidden: int = 64):
        super().__init__()
        self._teacher = (teacher,)
        self.taps = list(taps) if taps is not None else default_taps(teacher)
        t = torch.full((len(x_example),), 0.5, device=x_example.device)
        with torch.no_grad(), tapped(teacher, self.taps) as out:
            teacher(x_example, t)
        self.heads = nn.ModuleList(Head(out[n].shape[1:], hidden).to(x_example.device) for n in self.taps)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, x: Tensor, s: Tensor, s_end: Tensor, generator: torch.Generator,
                cond: Cond | None = None) -> Tensor:
        dev = generator.device
        u = 1.0 - torch.rand(len(x), generator=generator, device=dev, dtype=torch.float64).to(x.device)
        t = (s.double() + u * (s_end.double() - s.double())).to(x.dtype)                # t' in (s, s_end]
        z = torch.randn(x.shape, generator=generator, device=dev).to(x)
        x_t = samplers.renoise(x, s.to(x.dtype), t, self.teacher.process, z)
        with tapped(self.teacher, self.taps) as out:
            self.teacher(x_t, t, cond)
        return sum(head(out[n]) for head, n in zip(self.heads, self.taps))


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TSCDConfig:
    """One TSCD run (every stage; the engine's TrainConfig holds updates per stage, batch, seed)."""
    segments: tuple[int, ...] = SEGMENTS   # k of each stage, in order (the paper: 8, 4, 2, 1)
    N: int = 17                     # grid points t_min .. 1 (N - 1 = 16 intervals: every stage's edges on the grid)
    t_min: float = T_MIN
    solver: str = "ddim"            # the teacher's step ("ddim": 1 NFE; "heun": 2)
    mu: float = 0.9                 # target EMA (theta^-)
    distance: str = "l2"            # "l2", "pseudo-huber" or "huber" (distances.DISTANCES)
    lr: float = 1e-3
    ema_decay: float = 0.95         # the sampling EMA; each stage hands its EMA weights to the next
    lambda_adv: float = 0.0         # weight of the adversarial term (0: none)
    lr_disc: float = 1e-3
    adv_hidden: int = 64
    chain_teacher: bool = True      # True: each stage is taught by the previous stage's model (the paper's Fig. 2);
                                    # False: every stage by the original teacher (initialised from the previous).
                                    # gmm, one seed, 150 updates a stage: 1 step 3.04x the teacher's best SWD chained,
                                    # 1.33x with the original teacher (docs/results/hypersd_2d_diagnosis.json)


def _check_cfg(cfg: TSCDConfig) -> None:
    if not cfg.segments:
        raise ValueError("TSCDConfig.segments is empty: give the stages' segment counts, e.g. (8, 4, 2, 1)")
    for k in cfg.segments:
        _check_k(k)
        if k > cfg.N - 1:
            raise ValueError(f"k = {k} segments need at least {k} grid intervals; N = {cfg.N} gives {cfg.N - 1}")
    if list(cfg.segments) != sorted(cfg.segments, reverse=True):
        raise ValueError(f"stages must not increase the segment count (each starts from the previous); got "
                         f"{cfg.segments}")
    if cfg.solver not in steps.STEPS:
        raise ValueError(f"unknown solver {cfg.solver!r}; valid: {', '.join(steps.STEPS)}")
    distances.get(cfg.distance)
    if cfg.lambda_adv < 0:
        raise ValueError(f"lambda_adv must be >= 0; got {cfg.lambda_adv}")


def tscd_step(cfg: TSCDConfig, grid: Tensor, k: int) -> Callable[[StepContext, Any], Tensor]:
    """The TSCD method step for train.train_networks (one stage, k segments): nets "student" (trained), "target"
    (its train.Target), "teacher" (frozen: the previous stage's model) and, with cfg.lambda_adv > 0, "disc" (a
    SegmentDiscriminator, trained in its own phase). n ~ U{1..N-1} on the increasing grid (consistency.draw_times),
    s = segment_start(t_{n+1}, k, grid=grid)."""
    edges = segment_edges(k, grid=grid)
    d_loss, g_loss = adversarial("ns")

    def points(ctx: StepContext, batch: Any):
        x0, cond = unpack(batch)
        t_cur, t_next = draw_times(grid, len(x0), ctx.generator, None, x0.device, x0.dtype)
        s = segment_start(t_next, k, grid=grid)
        eps = torch.randn(x0.shape, generator=ctx.generator, device=ctx.generator.device).to(x0)
        return x0, cond, t_cur, t_next, s, eps

    def step(ctx: StepContext, batch: Any) -> Tensor:
        x0, cond, t_cur, t_next, s, eps = points(ctx, batch)
        student = ctx.nets["student"]
        out = tscd_loss_at(student, ctx.nets["target"], ctx.nets["teacher"], x0, eps, t_next, t_cur, s,
                           student.process, cfg.solver, cfg.distance, cond, return_points=cfg.lambda_adv > 0)
        if cfg.lambda_adv <= 0:
            return out
        loss, fake, real = out
        s_end = segment_end(s, edges)
        if ctx.phase == "disc":
            D = ctx.nets["disc"]
            return guard(d_loss(D(real, s, s_end, ctx.generator, cond), D(fake.detach(), s, s_end, ctx.generator,
                                                                          cond)), "discriminator", ctx.step)
        return guard(loss + cfg.lambda_adv * g_loss(ctx.nets["disc"](fake, s, s_end, ctx.generator, cond)),
                     "student", ctx.step)
    return step


def segment_end(s: Tensor, edges: Tensor) -> Tensor:
    """The end e_{m+1} of the segment starting at s = e_m (B,), given the edges (k + 1,)."""
    e = edges.to(torch.float64)
    m = torch.searchsorted(e, s.detach().double().cpu() - _tol(s, float(e[-1]))).clamp(max=len(e) - 2)
    return edges[m + 1].to(device=s.device, dtype=s.dtype)


@dataclass
class Stage:
    """One finished TSCD stage: k, the frozen model that taught it, its student (EMA weights, eval, no grad) and the
    engine's Trained."""
    k: int
    teacher: nn.Module
    student: nn.Module
    trained: Trained


def tscd_stage(init: nn.Module, teacher: nn.Module, data: Callable[[int, torch.Generator], Any], cfg: TSCDConfig,
               k: int, *, run: TrainConfig, ckpt_dir: str | os.PathLike | None = None, progress: bool = True,
               accelerator=None, example: Mapping[str, Any] | None = None,
               disc_features: nn.Module | None = None) -> Stage:
    """One TSCD stage with k segments: a trainable copy of `init` learns to map every point of a segment to its
    start on `teacher`'s trajectories (both course models; in `distill_tscd` both are the previous stage's model).
    Resumes from ckpt_dir. With cfg.lambda_adv > 0 the discriminator reads `disc_features` (default: the teacher),
    its heads sized on example["x"] and initialised under seeded(run.seed)."""
    grid = cm_grid(cfg.N, teacher.process, cfg.t_min)
    student = copy.deepcopy(init).requires_grad_(True).train()
    frozen = copy.deepcopy(teacher).requires_grad_(False).eval()
    nets = {"student": Network(student, lr=cfg.lr, ema_decay=cfg.ema_decay)}
    if cfg.lambda_adv > 0:
        if example is None:
            raise ValueError("the adversarial term needs example={'x': a few samples} to size its heads")
        feats = frozen if disc_features is None else disc_features
        with seeded(run.seed):
            nets["disc"] = Network(SegmentDiscriminator(feats, example["x"], hidden=cfg.adv_hidden), lr=cfg.lr_disc,
                                   betas=(0.0, 0.99))
    done = train_networks(nets, tscd_step(cfg, grid, k), data, replace(run, desc=f"{run.desc} k={k}"),
                          targets={"target": Target("student", decay=cfg.mu)}, frozen={"teacher": frozen},
                          ckpt_dir=ckpt_dir, progress=progress, accelerator=accelerator,
                          extra_config={"method": "hyper-sd-tscd", "k": k, **asdict(cfg)})
    return Stage(k, frozen, done.best("student").eval().requires_grad_(False), done)


def stage_dir(ckpt_dir: str | os.PathLike | None, k: int) -> Path | None:
    """The checkpoint folder of the k-segment stage: ckpt_dir/k{k} (None without ckpt_dir)."""
    return None if ckpt_dir is None else Path(ckpt_dir) / f"k{k}"


def distill_tscd(teacher: nn.Module, data: Callable[[int, torch.Generator], Any], cfg: TSCDConfig, *,
                 run: TrainConfig, ckpt_dir: str | os.PathLike | None = None, progress: bool = True,
                 accelerator=None, example: Mapping[str, Any] | None = None) -> tuple[nn.Module, list[Stage]]:
    """TSCD's stages k = cfg.segments[0] -> ... (the paper: 8 -> 4 -> 2 -> 1): stage i starts from stage i-1's student
    and is taught by it (the first by `teacher`), each a resumable engine run in ckpt_dir/k{k} of `run`'s updates.
    Rerunning after an interruption resumes the interrupted stage (finished stages load from their checkpoints).
    Returns (the last stage's student, every Stage)."""
    _check_cfg(cfg)
    model, stages = teacher, []
    for k in cfg.segments:
        stage = tscd_stage(model, model if cfg.chain_teacher else teacher, data, cfg, k, run=run, ckpt_dir=stage_dir(ckpt_dir, k), progress=progress,
                           accelerator=accelerator, example=example, disc_features=teacher)
        stages.append(stage)
        model = stage.student
    return model, stages


# ----------------------------------------------------------------------------------------------------------------
# Reward feedback (ReFL)
# ----------------------------------------------------------------------------------------------------------------

def refl_loss(student: Callable, x_t: Tensor, t: Tensor, process: AffineProcess,
              reward_fn: Callable[[Tensor, Cond | None], Tensor], cond: Cond | None = None,
              margin: float | None = None) -> Tensor:
    """The reward-feedback loss per sample (B,): x0_hat = student(x_t, t, cond).x0 (B, ...) WITH gradient (the one-step
    prediction from the late time t (B,)), r = reward_fn(x0_hat, cond) (B,) (on the mini SD: decode with the VAE,
    score with the reward network; gradients flow through both into the student), loss -r, or ReFL's
    relu(margin - r) with a margin. `process` (the student's) is part of the interface of the SD stage."""
    x0_hat = student(x_t, t, cond).x0                                                   # one step, with grad
    r = reward_fn(x0_hat, cond)
    if not isinstance(r, Tensor) or r.shape != (len(x_t),):
        raise ValueError(f"reward_fn must return one reward per sample, shape ({len(x_t)},); got "
                         f"{tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__}")
    return -r if margin is None else torch.relu(margin - r)


def mode_reward(means: Tensor, preferred: Sequence[int], scale: float = 1.0) -> Callable[[Tensor, Any], Tensor]:
    """A known 2D reward: r(x) = log P(preferred | x), the log posterior probability that x belongs to one of the
    `preferred` components of isotropic bumps of std `scale` at `means` (K, 2) (equal weights):
    logsumexp_{j in preferred} -|x - mu_j|^2 / (2 scale^2) - logsumexp_j (same). r <= 0, ~0 on a preferred mode,
    gradients of order |mu_i - mu_j| / scale^2 between modes. (B, 2) -> (B,)."""
    mu = torch.as_tensor(means, dtype=torch.float32)
    pref = torch.as_tensor(list(preferred), dtype=torch.long)
    if len(pref) == 0 or int(pref.min()) < 0 or int(pref.max()) >= len(mu):
        raise ValueError(f"preferred must name components among 0..{len(mu) - 1}; got {list(preferred)}")

    def reward(x: Tensor, cond: Any = None) -> Tensor:
        logits = -(x[:, None, :] - mu.to(x)[None]).pow(2).sum(-1) / (2 * scale**2)          # (B, K)
        return torch.logsumexp(logits[:, pref.to(x.device)], 1) - torch.logsumexp(logits, 1)
    return reward


def half_plane_reward(scale: float = 0.3) -> Callable[[Tensor, Any], Tensor]:
    """A known 2D reward for data without modes (the checkerboard): log sigmoid(x_1 / scale), the right half preferred.
    (B, 2) -> (B,)."""
    return lambda x, cond=None: torch.nn.functional.logsigmoid(x[:, 0] / scale)


@dataclass
class RewardConfig:
    """The reward-feedback stage."""
    t_range: tuple[float, float] = (0.05, 0.3)  # the late times of the one-step prediction (ReFL: the last steps)
    lambda_reward: float = 0.1      # weight of the reward loss
    lambda_tscd: float = 1.0        # weight of the TSCD term (k = 1) that keeps the student on its trajectories
    margin: float | None = None     # ReFL's relu(margin - r); None: -r
    lr: float = 1e-4
    ema_decay: float = 0.95
    mu: float = 0.9
    N: int = 17
    t_min: float = T_MIN
    solver: str = "ddim"
    distance: str = "l2"


def reward_step(cfg: RewardConfig, grid: Tensor, reward_fn: Callable) -> Callable[[StepContext, Any], Tensor]:
    """The ReFL method step: nets "student", "target", frozen "teacher" (the TSCD student). x_t from the student's own
    rollout without gradient (one step from noise to x0, re-noised to t ~ U(t_range)), then refl_loss, plus
    lambda_tscd times the k = 1 TSCD loss on data."""
    lo, hi = cfg.t_range

    def step(ctx: StepContext, batch: Any) -> Tensor:
        x0, cond = unpack(batch)
        g, B = ctx.generator, len(x0)
        student = ctx.nets["student"]
        proc = student.process
        z = proc.prior(tuple(x0.shape), generator=g).to(x0)
        t = (lo + (hi - lo) * torch.rand(B, generator=g, device=g.device)).to(x0)
        eps = torch.randn(x0.shape, generator=g, device=g.device).to(x0)
        with torch.no_grad():
            x_gen = student(z, torch.ones(B, device=x0.device, dtype=x0.dtype), cond).x0
            x_t = proc.marginal(x_gen, t, eps)
        loss = cfg.lambda_reward * refl_loss(student, x_t, t, proc, reward_fn, cond, cfg.margin)
        if cfg.lambda_tscd > 0:
            t_cur, t_next = draw_times(grid, B, g, None, x0.device, x0.dtype)
            eps2 = torch.randn(x0.shape, generator=g, device=g.device).to(x0)
            s = torch.full_like(t_next, float(grid[0]))
            loss = loss + cfg.lambda_tscd * tscd_loss_at(student, ctx.nets["target"], ctx.nets["teacher"], x0, eps2,
                                                         t_next, t_cur, s, proc, cfg.solver, cfg.distance, cond)
        return loss
    return step


def distill_reward(student: nn.Module, data: Callable[[int, torch.Generator], Any], reward_fn: Callable,
                   cfg: RewardConfig, *, run: TrainConfig, ckpt_dir: str | os.PathLike | None = None,
                   progress: bool = True, accelerator=None) -> tuple[nn.Module, Trained]:
    """The reward-feedback stage on a (TSCD) student: a trainable copy learns reward_step's loss, the frozen student
    its TSCD teacher. Resumable. Returns (the student: EMA weights, eval, no grad; Trained)."""
    grid = cm_grid(cfg.N, student.process, cfg.t_min)
    trained = copy.deepcopy(student).requires_grad_(True).train()
    frozen = copy.deepcopy(student).requires_grad_(False).eval()
    done = train_networks({"student": Network(trained, lr=cfg.lr, ema_decay=cfg.ema_decay)},
                          reward_step(cfg, grid, reward_fn), data, run,
                          targets={"target": Target("student", decay=cfg.mu)}, frozen={"teacher": frozen},
                          ckpt_dir=ckpt_dir, progress=progress, accelerator=accelerator,
                          extra_config={"method": "hyper-sd-reward", **asdict(cfg)})
    return done.best("student").eval().requires_grad_(False), done


# ----------------------------------------------------------------------------------------------------------------
# Score distillation for the one-step end, and the whole method
# ----------------------------------------------------------------------------------------------------------------

def distill_score(student: nn.Module, teacher: nn.Module, data: Callable[[int, torch.Generator], Any],
                  cfg: dmd.DMDConfig, *, run: TrainConfig, example: Mapping[str, Any],
                  ckpt_dir: str | os.PathLike | None = None, progress: bool = True,
                  accelerator=None) -> tuple[nn.Module, Trained]:
    """Hyper-SD's last stage: DMD's distribution-matching gradient (dmd.distill_dmd) on the one-step generator
    G(z) = x0_theta(z, 1) of `student` (a trainable copy), against the ORIGINAL teacher's score; the critic is
    initialised from the teacher (dmd.make_critic, under seeded(run.seed))."""
    G = copy.deepcopy(student).requires_grad_(True).train()
    real = copy.deepcopy(teacher).requires_grad_(False).eval()
    with seeded(run.seed):
        critic = dmd.make_critic(teacher, example.get("x"), cfg.gan, example.get("cond"))
    return dmd.distill_dmd(teacher, data, cfg, run=run, networks=(G, real, critic), ckpt_dir=ckpt_dir,
                           progress=progress, accelerator=accelerator,
                           extra_config={"method": "hyper-sd-score", **asdict(cfg)})


@dataclass
class HyperSDConfig:
    """The whole method: TSCD's stages, then reward feedback (with a reward_fn), then score distillation."""
    tscd: TSCDConfig = field(default_factory=TSCDConfig)
    reward: RewardConfig | None = field(default_factory=RewardConfig)
    score: dmd.DMDConfig | None = None
    reward_steps: int = 200         # updates of the reward stage
    score_steps: int = 500          # iterations of the score stage (the generator updates every score.ttur-th)


def distill_hypersd(teacher: nn.Module, data: Callable[[int, torch.Generator], Any], cfg: HyperSDConfig, *,
                    run: TrainConfig, reward_fn: Callable | None = None, ckpt_dir: str | os.PathLike | None = None,
                    progress: bool = True, example: Mapping[str, Any] | None = None
                    ) -> tuple[nn.Module, dict[str, nn.Module]]:
    """Hyper-SD end to end: distill_tscd (run's updates per stage; ckpt_dir/k{k}), then with reward_fn and cfg.reward
    distill_reward (cfg.reward_steps; ckpt_dir/reward), then with cfg.score distill_score (cfg.score_steps;
    ckpt_dir/score). Every stage resumes from its folder. Returns (the final model, {"tscd", "tscd-reward",
    "hypersd": the model after each part that ran})."""
    out: dict[str, nn.Module] = {}
    model, _ = distill_tscd(teacher, data, cfg.tscd, run=run, ckpt_dir=ckpt_dir, progress=progress, example=example)
    out["tscd"] = model
    sub = lambda name: None if ckpt_dir is None else Path(ckpt_dir) / name
    if reward_fn is not None and cfg.reward is not None:
        model, _ = distill_reward(model, data, reward_fn, cfg.reward, run=replace(run, steps=cfg.reward_steps,
                                  desc=f"{run.desc} reward"), ckpt_dir=sub("reward"), progress=progress)
        out["tscd-reward"] = model
    if cfg.score is not None:
        if example is None:
            raise ValueError("score distillation needs example={'x': a few samples} (the critic's GAN head)")
        model, _ = distill_score(model, teacher, data, cfg.score, run=replace(run, steps=cfg.score_steps,
                                 desc=f"{run.desc} score"), example=example, ckpt_dir=sub("score"),
                                 progress=progress)
        out["hypersd"] = model
    return model, out


# ----------------------------------------------------------------------------------------------------------------
# The unified sampler
# ----------------------------------------------------------------------------------------------------------------

# default gamma per step count. The model card's unified LoRA lowers eta with more steps; on 2D bench hypersd measured
# the opposite for every k = 1 student (TSCD, CD): gamma = 1 (multistep consistency sampling) beats 0.5 and 0 at 2, 4
# and 8 steps beyond the spread over 3 training seeds (gmm 4 steps: TSCD 1.82x / 2.94x / 7.2x the teacher's best SWD
# at gamma 1 / 0.5 / 0), since a student trained to map to t_min alone has no trajectory below t to jump along.
GAMMAS = {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}


def unified_grid(n: int) -> Tensor:
    """The unified sampler's grid: trailing, 1, (n-1)/n, ..., 1/n, 0 (float64 (n + 1,); grids.trailing)."""
    return grids.trailing(n)


def sample(model: Callable, x: Tensor, n: int, process: AffineProcess, gamma: float | None = None,
           generator: torch.Generator | None = None, noises: Tensor | None = None,
           cond: Cond | None = None) -> Tensor:
    """n-step samples (B, ...) from x = x_1 (B, ...): TCD's gamma sampler (samplers.tcd; diffusers' TCDScheduler with
    eta = gamma) on unified_grid(n). gamma None: GAMMAS[n] (0.3 for step counts it does not list)."""
    gamma = GAMMAS.get(n, 0.3) if gamma is None else gamma
    return samplers.tcd(model, x, unified_grid(n), process, generator=generator, gamma=gamma, noises=noises,
                        cond=cond)
