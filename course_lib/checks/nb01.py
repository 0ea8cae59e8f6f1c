"""Checkers of notebook 01 (progressive distillation): the PD target, the PD loss, one PD round."""
from __future__ import annotations

import traceback
from typing import Callable

import torch

from ..config import seeded
from ..processes import VPCosine
from .core import FALLBACK, checker, draw_seed, fresh_generator, run_check


def _pd_cases(g: torch.Generator, with_student: bool = False):
    from ..data2d import exact_denoiser, sample_2d
    from ..models import Denoiser, MLP2D

    proc = VPCosine()
    teacher = exact_denoiser("gmm", proc)
    for N in (1, 2, 4, 8):
        B = 4 * N
        i = torch.arange(N).repeat(4)                         # every grid position, the last step (i = 0) included
        t = ((i + 1) / N).double()
        x0 = sample_2d("gmm", B, g)[0].double()
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        if with_student:
            with seeded(draw_seed(g)):                 # initialisation; the notebook's global RNG is left alone
                student = Denoiser(MLP2D(hidden=16, depth=2), proc, "v").double()
            yield (student, teacher, x0, t, eps, N, proc), f"for N = {N} student steps"
        else:
            yield (teacher, proc.marginal(x0, t, eps), t, N, proc), f"for N = {N} student steps"


@checker("1.1")
def check_pd_target(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 1.1: student(teacher, z_t, t, N, process) -> x_tilde (B, D), the progressive-distillation target."""
    from ..distill.pd import pd_target

    g = fresh_generator(seed)
    return run_check("1.1", student, pd_target, _pd_cases(g), atol=1e-6, rtol=1e-5,
                     hint="Take two teacher DDIM steps t -> t - 1/(2N) -> t - 1/N, then solve the one-step DDIM "
                          "equation for the x-prediction that lands on the same point; where t - 1/N = 0 the target "
                          "is the teacher's x-prediction at t - 1/(2N).")


@checker("1.2")
def check_pd_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 1.2: student(student_model, teacher, x0, t, eps, N, process) -> per-sample loss (B,)."""
    from ..distill.pd import pd_loss_at

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
    than the teacher's own N-step DDIM does, by at least a factor 2 (a correct round gets about 10x here).
    """
    import copy

    from ..data2d import sample_2d
    from ..distill.pd import distill_round
    from ..grids import uniform
    from ..metrics import flow_map_error
    from ..samplers import ddim
    from ..teachers import load_teacher
    from ..train import TrainConfig

    def reference(teacher, N, sample_data, cfg):
        return distill_round(teacher, N, sample_data, cfg, progress=False).best.eval().requires_grad_(False)

    fallback = FALLBACK
    g = fresh_generator(seed)
    with torch.random.fork_rng(devices=[]):   # building the model to load into may draw initial weights
        teacher = load_teacher("gmm-vp")
    before = copy.deepcopy(teacher.state_dict())
    N, cfg = 2, TrainConfig(steps=150, batch_size=256, lr=2e-4, lr_schedule="linear", ema_decay=0.0,
                            seed=draw_seed(g), desc="check 1.3")
    try:
        out = student(teacher, N, lambda n, gen: sample_2d("gmm", n, gen)[0], cfg)
    except NotImplementedError:
        print(f"Exercise 1.3: not solved yet (it raises NotImplementedError). {fallback}")
        return reference
    except Exception as e:
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        print(f"Exercise 1.3: your function raised {tb}. {fallback}")
        return reference
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        print(f"Exercise 1.3: the round changed the teacher's weights ({changed[0]}, ...): train a copy "
              f"(copy.deepcopy) and keep the teacher frozen. {fallback}")
        teacher.load_state_dict(before)
        return reference
    if out is teacher or not callable(out):
        print(f"Exercise 1.3: return the trained student, a new model (got {type(out).__name__}). {fallback}")
        return reference
    x1 = teacher.process.prior((2000, 2), generator=g)
    with torch.no_grad():
        target = ddim(teacher, x1, uniform(2 * N), teacher.process)
        err_teacher = flow_map_error(ddim(teacher, x1, uniform(N), teacher.process), target)
        err_student = flow_map_error(ddim(out, x1, uniform(N), teacher.process), target)
    if not err_student < 0.5 * err_teacher:
        print(f"Exercise 1.3: after the round, the student's {N}-step DDIM is {err_student:.3f} (RMS) from the "
              f"teacher's {2 * N}-step DDIM; the teacher's own {N} steps are {err_teacher:.3f} away, so the student "
              "did not learn to replace two teacher steps by one. Check that the loss draws t = (i + 1)/N with "
              "i ~ U{0..N-1}, uses the frozen teacher for the target and trains the copy. " + fallback)
        return reference
    print(f"Exercise 1.3: correct: the student's {N} steps land {err_teacher / err_student:.0f}x closer to the "
          f"teacher's {2 * N} steps than the teacher's own {N} steps do. Later cells use your function.")
    return student
