"""Progressive distillation (Salimans & Ho, ICLR 2022, arXiv 2202.00512), Algorithm 2.

A student learns to take ONE deterministic DDIM step that lands where TWO DDIM steps of its teacher land.
Once trained, the student becomes the teacher and the number of steps is halved again: N -> N/2 -> ... -> 1.

On the student's grid of N steps, u = (i + 1)/N for i ~ U{0..N-1} (course time: t = 0 data, t = 1 noise):

    z_t   = alpha_t x + sigma_t eps                                             t = u
    z_t'  = DDIM_teacher(z_t,  t -> t'),   t'  = u - 0.5/N                      two teacher steps
    z_t'' = DDIM_teacher(z_t', t' -> t''), t'' = u - 1/N
    x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)     (Eq. 8 / Alg. 2)
    x_tilde = x_hat_teacher(z_t', t')  when t'' = 0 (the last step predicts the data directly)
    L = max(alpha_t^2 / sigma_t^2, 1) || x_hat_student(z_t, t) - x_tilde ||^2    ("truncated SNR" weighting)

x_tilde is the one x-prediction that makes a student DDIM step t -> t'' hit z_t'' exactly. The weighting
max(SNR, 1) equals max(||x - x_tilde||^2, ||eps - eps_tilde||^2) for VP processes: it keeps the loss finite
at t -> 1, where an eps-prediction would be divided by alpha -> 0. That is why the paper (and the course)
parameterizes students with v (or x0), never eps.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable

import torch
from torch import Tensor

from ..conditioning import Cond, unpack
from ..models import Denoiser
from ..processes import AffineProcess, bcast
from ..samplers import ddim_step
from ..train import Trained, TrainConfig, train


def check_halving(n_start: int, n_end: int) -> int:
    """Number of rounds from n_start to n_end steps by halving; a clear error when n_end is not reachable."""
    if n_start < 1 or n_end < 1 or n_end > n_start:
        raise ValueError(f"progressive distillation goes from more steps to fewer: got {n_start} -> {n_end}")
    rounds = math.log2(n_start / n_end)
    if abs(rounds - round(rounds)) > 1e-9 or n_start % n_end:
        reachable = [n_start // 2**k for k in range(int(math.log2(n_start)) + 1) if n_start % 2**k == 0]
        raise ValueError(f"{n_end} steps cannot be reached from {n_start} by halving; reachable: {reachable}")
    return int(round(rounds))


@torch.no_grad()
def pd_target(teacher: Callable, z_t: Tensor, t: Tensor, N: int, process: AffineProcess,
              cond: Cond | None = None) -> Tensor:
    """The student's x-target x_tilde (B, ...) at z_t (B, ...), t = (i+1)/N (B,), from two teacher DDIM steps.

    cond: the conditioning (a Cond: labels, and w for a guided student, notebook 02) or None; teacher and student
    see the same one."""
    t1, t2 = t - 0.5 / N, t - 1.0 / N
    t2 = t2.clamp_min(0.0)
    p = teacher(z_t, t, cond)
    z1 = ddim_step(p, t, t1, process)                              # first teacher step t -> t'
    p1 = teacher(z1, t1, cond)
    z2 = ddim_step(p1, t1, t2, process)                            # second teacher step t' -> t''
    a, s = bcast(process.alpha(t), z_t), bcast(process.sigma(t), z_t)
    a2, s2 = bcast(process.alpha(t2), z_t), bcast(process.sigma(t2), z_t)
    ratio = s2 / s
    x_tilde = (z2 - ratio * z_t) / (a2 - ratio * a)                # invert one student DDIM step t -> t''
    last = bcast(t2 == 0, z_t)
    return torch.where(last, p1.x0, x_tilde)                       # final step: the teacher's x-prediction


def pd_loss_at(student: Callable, teacher: Callable, x0: Tensor, t: Tensor, eps: Tensor, N: int,
               process: AffineProcess, cond: Cond | None = None) -> Tensor:
    """Per-sample PD loss (B,) at given grid times t = (i+1)/N (B,) and noise eps (B, ...)."""
    z_t = process.marginal(x0, t, eps)
    x_tilde = pd_target(teacher, z_t, t, N, process, cond)
    x_hat = student(z_t, t, cond).x0
    w = (process.alpha(t) ** 2 / process.sigma(t) ** 2).clamp_min(1.0)   # max(SNR, 1)
    return w * (x_hat - x_tilde).pow(2).flatten(1).mean(1)


def pd_loss(student: Denoiser, teacher: Callable, x0: Tensor, N: int, generator: torch.Generator,
            cond: Cond | None = None) -> Tensor:
    """Per-sample PD loss (B,) with truncated-SNR weighting; i ~ U{0..N-1}, t = (i+1)/N, eps ~ N(0, I)."""
    B = x0.shape[0]
    i = torch.randint(N, (B,), generator=generator, device=generator.device).to(x0.device)
    t = ((i + 1).to(x0.dtype)) / N
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
    return pd_loss_at(student, teacher, x0, t, eps, N, student.process, cond)


@dataclasses.dataclass(frozen=True)
class PDConfig:
    """Progressive distillation's rounds: the teacher samples with n_start DDIM steps; rounds halve the student's
    steps n_start/2, n_start/4, ..., n_end (both powers of two, n_end < n_start)."""
    n_start: int
    n_end: int = 1


def distill_round(teacher: Denoiser, N: int, data: Callable[[int, torch.Generator], Any], *, run: TrainConfig,
                  ckpt_dir=None, accelerator=None, progress: bool = True) -> tuple[Denoiser, Trained]:
    """One round: a student initialised from the teacher learns N steps from the teacher's 2N.

    data(n, g) returns a course batch {"x": x0, "cond": Cond or None} (conditioning.unpack). Returns (the student: its EMA when run.ema_decay > 0,
    eval, no grad; the engine's Trained)."""
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    frozen = copy.deepcopy(teacher).requires_grad_(False).eval()

    def loss(model, batch, g):
        x0, cond = unpack(batch)
        return pd_loss(model, frozen, x0, N, g, cond)

    done = train(student, loss, data, run, ckpt_dir=ckpt_dir, progress=progress, accelerator=accelerator,
                 extra_config={"method": "progressive-distillation", "student_steps": N})
    return done.best().eval().requires_grad_(False), done


def distill_pd(teacher: Denoiser, data: Callable[[int, torch.Generator], Any], cfg: PDConfig, *,
               run: TrainConfig | Callable[[int], TrainConfig], ckpt_dir=None, accelerator=None,
               progress: bool = True, rounds: dict[int, Denoiser] | None = None) -> tuple[Denoiser, Trained]:
    """Progressive distillation: rounds of `distill_round`, cfg.n_start/2, cfg.n_start/4, ..., cfg.n_end student steps,
    each round's student the next round's teacher.

    run is one TrainConfig for every round, or a function of the round's student step count N. Round N checkpoints
    to ckpt_dir/steps{N}. Returns (the final student, cfg.n_end steps; the last round's Trained). Every round's
    student: pass a dict as `rounds`, filled with {student steps N: student} (eval, no grad)."""
    check_halving(cfg.n_start, cfg.n_end)
    current, N, done = teacher, cfg.n_start // 2, None
    while N >= cfg.n_end:
        round_run = run(N) if callable(run) else run
        round_run = dataclasses.replace(round_run, desc=f"PD {2 * N}->{N}")
        current, done = distill_round(current, N, data, run=round_run,
                                      ckpt_dir=None if ckpt_dir is None else f"{ckpt_dir}/steps{N}",
                                      accelerator=accelerator, progress=progress)
        if rounds is not None:
            rounds[N] = current
        N //= 2
    return current, done


@torch.no_grad()
def target_geometry(teacher: Callable, z_t: Tensor, t: Tensor, N: int, process: AffineProcess,
                    cond: Cond | None = None) -> dict[str, Tensor]:
    """The points of one PD target, for drawing it (notebook 01's figure); every value (B, ...):

        z_t          the start, at t = (i+1)/N
        z_t1         after the teacher's first DDIM half step, at t' = t - 1/(2N)
        z_t2         after its second, at t'' = t - 1/N: where the student's ONE step must land
        one_step     where ONE teacher DDIM step t -> t'' lands (what the student does before training)
        x_hat        the teacher's x-prediction at (z_t, t): the x that one_step uses
        x_tilde      the PD target (pd_target): the x-prediction that makes one DDIM step t -> t'' land on z_t2
        scaled_z     (sigma_t''/sigma_t) z_t: one DDIM step lands on scaled_z + (alpha_t'' - ratio alpha_t) x, so
                     scaled_z, z_t2 and x_tilde lie on one line (as do scaled_z, one_step and x_hat)
    """
    t1, t2 = t - 0.5 / N, (t - 1.0 / N).clamp_min(0.0)
    p = teacher(z_t, t, cond)
    z1 = ddim_step(p, t, t1, process)
    z2 = ddim_step(teacher(z1, t1, cond), t1, t2, process)
    return {"z_t": z_t, "z_t1": z1, "z_t2": z2, "one_step": ddim_step(p, t, t2, process), "x_hat": p.x0,
            "x_tilde": pd_target(teacher, z_t, t, N, process, cond),
            "scaled_z": bcast(process.sigma(t2) / process.sigma(t), z_t) * z_t}
