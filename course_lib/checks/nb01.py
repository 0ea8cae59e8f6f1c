"""Checkers of notebook 01 (progressive distillation): the PD target, the PD loss, one PD round."""
from __future__ import annotations

from typing import Callable

import torch

from ..data2d import batches, exact_denoiser, sample_2d
from ..distill.pd import distill_round, pd_loss_at, pd_target
from ..grids import uniform
from ..metrics import flow_map_error
from ..processes import EDM, RectifiedFlow, SDDiscrete, VPCosine
from ..samplers import ddim
from ..teachers import load_teacher
from ..train import TrainConfig
from .core import accept, checker, draw_seed, explain_exception, fall_back, fresh_generator, run_check, tiny_model

# 1.3: the student's N steps must land this many times closer to the teacher's 2N steps than the teacher's own N
# steps do. Measured on this check (8 seeds): a correct round 8.2-9.0x; continuous times instead of the student's
# grid 2.0-2.4x; targets from the live student instead of the frozen teacher 0.22-0.25x; no training 1x.
PD_ROUND_MIN_GAIN = 4.0


def _pd_cases(g: torch.Generator, with_student: bool = False, processes=(VPCosine(),)):
    """Exact Gaussian-mixture teachers under each process and, for the loss, a tiny v-prediction student."""
    for proc in processes:
        teacher = exact_denoiser("gmm", proc)
        for N in (1, 2, 4, 8):
            B = 4 * N
            i = torch.arange(N).repeat(4)                     # every grid position, the last step (i = 0) included
            t = ((i + 1) / N).double()
            x0 = sample_2d("gmm", B, g)[0].double()
            eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
            where = f"for the {proc.name} process and N = {N} student steps"
            if with_student:
                yield (tiny_model(proc, g), teacher, x0, t, eps, N, proc), where
            else:
                yield (teacher, proc.marginal(x0, t, eps), t, N, proc), where


@checker("1.1")
def check_pd_target(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 1.1: student(teacher, z_t, t, N, process) -> x_tilde (B, D), the progressive-distillation target."""
    g = fresh_generator(seed)
    processes = (VPCosine(), SDDiscrete(), RectifiedFlow(), EDM())   # VP and non-VP: alpha^2 + sigma^2 is not 1
    return run_check("1.1", student, pd_target, _pd_cases(g, processes=processes), atol=1e-6, rtol=1e-5,
                     hint="Take two teacher DDIM steps t -> t - 1/(2N) -> t - 1/N, then solve the one-step DDIM "
                          "equation for the x-prediction that lands on the same point; where t - 1/N = 0 the target "
                          "is the teacher's x-prediction at t - 1/(2N). Use process.alpha and process.sigma (never "
                          "sigma = sqrt(1 - alpha^2): rectified flow and EDM are not variance-preserving).")


@checker("1.2")
def check_pd_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 1.2: student(student_model, teacher, x0, t, eps, N, process) -> per-sample loss (B,)."""
    g = fresh_generator(seed)
    return run_check("1.2", student, pd_loss_at, _pd_cases(g, with_student=True), atol=1e-6, rtol=1e-5,
                     hint="Noise x0 to z_t, compute the target with pd_target, compare with the student's x0 "
                          "prediction, weight each sample by max(alpha^2/sigma^2, 1) and average over dimensions.")


@checker("1.3")
def check_pd_round(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 1.3: student(teacher, N, sample_data, cfg) -> a trained N-step student (one PD round).

    A round cannot be compared output by output (training is random), so this checks what a round must do, on
    the shipped Gaussian-mixture teacher with a short budget: the teacher is left untouched, the student is a
    new model, and the student's N-step DDIM lands closer to the teacher's 2N-step DDIM (from the same noise)
    than the teacher's own N-step DDIM does, by at least PD_ROUND_MIN_GAIN (4x; a correct round gets about 9x,
    one trained at continuous times about 2x, one whose targets come from the live student falls below 1x).
    """
    import copy

    def reference(teacher, N, sample_data, cfg):
        return distill_round(teacher, N, sample_data, run=cfg, progress=False)[0]

    g = fresh_generator(seed)
    with torch.random.fork_rng(devices=[]):   # building the model to load into may draw initial weights
        teacher = load_teacher("gmm-vp")
    before = copy.deepcopy(teacher.state_dict())
    N, cfg = 2, TrainConfig(steps=150, batch_size=256, lr=2e-4, lr_schedule="linear", ema_decay=0.0,
                            seed=draw_seed(g), desc="check 1.3")
    try:
        out = student(teacher, N, batches("gmm"), cfg)
    except Exception as e:
        return fall_back("1.3", reference, explain_exception(e))
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        teacher.load_state_dict(before)
        return fall_back("1.3", reference, f"the round changed the teacher's weights ({changed[0]}, ...): train a "
                                           "copy (copy.deepcopy) and keep the teacher frozen.")
    if out is teacher or not callable(out):
        return fall_back("1.3", reference, f"return the trained student, a new model (got {type(out).__name__}).")
    x1 = teacher.process.prior((2000, 2), generator=g)
    with torch.no_grad():
        target = ddim(teacher, x1, uniform(2 * N), teacher.process)
        err_teacher = flow_map_error(ddim(teacher, x1, uniform(N), teacher.process), target)
        err_student = flow_map_error(ddim(out, x1, uniform(N), teacher.process), target)
    gain = err_teacher / err_student
    if not gain >= PD_ROUND_MIN_GAIN:       # also catches a nan
        return fall_back("1.3", reference,
                         f"after the round, the student's {N}-step DDIM is {err_student:.3f} (RMS) from the teacher's "
                         f"{2 * N}-step DDIM; the teacher's own {N} steps are {err_teacher:.3f} away ({gain:.1f}x; "
                         f"a correct round gets about 9x here, this check asks for {PD_ROUND_MIN_GAIN:g}x), so the "
                         "student did not learn to replace two teacher steps by one. Check that the loss draws t "
                         "on the student's grid, t = (i + 1)/N with i ~ U{0..N-1} (not any t in (0, 1]), computes "
                         "the target with the frozen teacher (a copy made before training, not the student being "
                         "trained) and trains the other copy.")
    return accept("1.3", student, f"correct: the student's {N} steps land {gain:.1f}x closer to the teacher's "
                                  f"{2 * N} steps than the teacher's own {N} steps do.")
