"""Exercise checkers. Each tests a student's function on fresh random inputs against the library's reference
and explains a failure in plain words. Every checker returns the function later cells should use: the
student's when it is right, otherwise the library's (and it says so), so a notebook always runs to the end.

    ddim_step = checks.check_ddim_step(ddim_step)
"""
from __future__ import annotations

import traceback
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .predictions import Pred, to_pred
from .processes import RectifiedFlow, SDDiscrete, VPCosine, AffineProcess
from .samplers import ddim_step as _ref_ddim_step


def _as_tensor_tuple(out: Any) -> tuple[Tensor, ...]:
    if isinstance(out, Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and all(isinstance(o, Tensor) for o in out):
        return tuple(out)
    if isinstance(out, (float, int)):
        return (torch.tensor(float(out)),)
    raise TypeError(f"expected a tensor (or a tuple of tensors), got {type(out).__name__}")


def run_check(exercise: str, student: Callable, reference: Callable, cases: Iterable[tuple[tuple, str]],
              atol: float = 1e-5, rtol: float = 1e-4, hint: str = "") -> Callable:
    """Compare student(*args) with reference(*args) on each (args, description) case.

    Prints one line of verdict (and, on failure, what differed where) and returns the function to use next.
    """
    fallback = f"Later cells use course_lib's reference implementation instead."
    n = 0
    for args, where in cases:
        n += 1
        try:
            got = student(*args)
        except NotImplementedError:
            print(f"Exercise {exercise}: not solved yet (it raises NotImplementedError). {fallback}")
            return reference
        except Exception as e:  # the student's code crashed: show where, keep the notebook running
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            print(f"Exercise {exercise}: your function raised {tb} {where}. {fallback}")
            return reference
        want = reference(*args)
        try:
            got_t, want_t = _as_tensor_tuple(got), _as_tensor_tuple(want)
        except TypeError as e:
            print(f"Exercise {exercise}: {e} {where}. {fallback}")
            return reference
        if len(got_t) != len(want_t):
            print(f"Exercise {exercise}: returned {len(got_t)} values, expected {len(want_t)} {where}. {fallback}")
            return reference
        for k, (g, w) in enumerate(zip(got_t, want_t)):
            what = f"output {k}" if len(want_t) > 1 else "the output"
            if tuple(g.shape) != tuple(w.shape):
                print(f"Exercise {exercise}: {what} has shape {tuple(g.shape)}, expected {tuple(w.shape)} {where}. "
                      f"{fallback}")
                return reference
            g = g.detach().to(w.dtype)
            if not torch.isfinite(g).all():
                print(f"Exercise {exercise}: {what} contains inf or nan {where}. {hint} {fallback}".replace("  ", " "))
                return reference
            if not torch.allclose(g, w, atol=atol, rtol=rtol):
                err = (g - w).abs().max().item()
                print(f"Exercise {exercise}: {what} differs from the reference by up to {err:.3g} {where}. "
                      f"{hint} {fallback}".replace("  ", " "))
                return reference
    print(f"Exercise {exercise}: correct on {n} random cases. Later cells use your function.")
    return student


def _processes() -> list[AffineProcess]:
    return [VPCosine(), RectifiedFlow(), SDDiscrete()]


def check_v_to_pred(student: Callable[[Tensor, Tensor, Tensor, AffineProcess], Pred], seed: int | None = None
                    ) -> Callable:
    """Exercise 0.1: student(v, x, t, process) -> Pred(x0, eps) for a v-prediction network."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def reference(v, x, t, process):
        return to_pred(v, x, t, process, "v")

    def cases():
        for process in _processes():
            for _ in range(3):
                B = 5
                t = 0.05 + 0.9 * torch.rand(B, generator=g, dtype=torch.float64)
                x = torch.randn(B, 2, generator=g, dtype=torch.float64)
                v = torch.randn(B, 2, generator=g, dtype=torch.float64)
                yield (v, x, t, process), f"for the {process.name} process at t = {t[0].item():.2f}"

    return run_check("0.1", student, reference, cases(), atol=1e-8, rtol=1e-6,
                     hint="Check: x = alpha x0 + sigma eps and v = alpha eps - sigma x0; solve these two for x0 and eps.")


def check_ddim_step(student: Callable[[Pred, Tensor, Tensor, AffineProcess], Tensor], seed: int | None = None
                    ) -> Callable:
    """Exercise 0.2: student(pred, t, s, process) -> x_s, one deterministic DDIM step from t to s < t."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def cases():
        for process in _processes():
            for s_zero in (False, True):
                B = 6
                t = 0.2 + 0.8 * torch.rand(B, generator=g, dtype=torch.float64)
                s = torch.zeros(B, dtype=torch.float64) if s_zero else t * torch.rand(B, generator=g, dtype=torch.float64)
                pred = Pred(torch.randn(B, 2, generator=g, dtype=torch.float64),
                            torch.randn(B, 2, generator=g, dtype=torch.float64))
                yield (pred, t, s, process), (f"for the {process.name} process stepping from t = {t[0].item():.2f} "
                                              f"to s = {s[0].item():.2f}")

    return run_check("0.2", student, _ref_ddim_step, cases(), atol=1e-8, rtol=1e-6,
                     hint="DDIM re-noises the predicted x0 with the predicted eps at the new time: "
                          "x_s = alpha(s) x0 + sigma(s) eps. Mind the shapes: t and s are (B,), x0 is (B, D).")


def check_sliced_wasserstein(student: Callable[[Tensor, Tensor, Tensor], Tensor | float], seed: int | None = None
                             ) -> Callable:
    """Exercise 0.3: student(x, y, directions) -> SW_2 between point sets x, y (N, D) along unit directions (K, D)."""
    from .metrics import sliced_wasserstein

    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def reference(x, y, directions):
        return torch.tensor(sliced_wasserstein(x, y, directions=directions), dtype=torch.float64)

    def student_scalar(x, y, directions):
        out = student(x, y, directions)
        return torch.as_tensor(out, dtype=torch.float64).reshape(())

    def cases():
        for n, k, shift in ((50, 8, 0.0), (200, 32, 1.0), (500, 64, 2.5)):
            x = torch.randn(n, 2, generator=g, dtype=torch.float64)
            y = torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.7 + shift
            d = torch.randn(k, 2, generator=g, dtype=torch.float64)
            d = d / d.norm(dim=1, keepdim=True)
            yield (x, y, d), f"for {n} points and {k} directions (shift {shift})"

    use = run_check("0.3", student_scalar, reference, cases(), atol=1e-6, rtol=1e-5,
                    hint="Project both sets on each direction, sort each projection, average the squared "
                         "differences over points and directions, then take the square root.")
    return student if use is student_scalar else (lambda x, y, directions: float(reference(x, y, directions)))


def _pd_cases(g: torch.Generator, with_student: bool = False):
    from .data2d import exact_denoiser, sample_2d
    from .models import Denoiser, MLP2D

    proc = VPCosine()
    teacher = exact_denoiser("gmm", proc)
    for N in (1, 2, 4, 8):
        B = 4 * N
        i = torch.arange(N).repeat(4)                         # every grid position, the last step (i = 0) included
        t = ((i + 1) / N).double()
        x0 = sample_2d("gmm", B, g)[0].double()
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        if with_student:
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
            student = Denoiser(MLP2D(hidden=16, depth=2), proc, "v").double()
            yield (student, teacher, x0, t, eps, N, proc), f"for N = {N} student steps"
        else:
            yield (teacher, proc.marginal(x0, t, eps), t, N, proc), f"for N = {N} student steps"


def check_pd_target(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 1.1: student(teacher, z_t, t, N, process) -> x_tilde (B, D), the progressive-distillation target."""
    from .distill.pd import pd_target

    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return run_check("1.1", student, pd_target, _pd_cases(g), atol=1e-6, rtol=1e-5,
                     hint="Take two teacher DDIM steps t -> t - 1/(2N) -> t - 1/N, then solve the one-step DDIM "
                          "equation for the x-prediction that lands on the same point; where t - 1/N = 0 the target "
                          "is the teacher's x-prediction at t - 1/(2N).")


def check_pd_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 1.2: student(student_model, teacher, x0, t, eps, N, process) -> per-sample loss (B,)."""
    from .distill.pd import pd_loss_at

    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return run_check("1.2", student, pd_loss_at, _pd_cases(g, with_student=True), atol=1e-6, rtol=1e-5,
                     hint="Noise x0 to z_t, compute the target with pd_target, compare with the student's x0 "
                          "prediction, weight each sample by max(alpha^2/sigma^2, 1) and average over dimensions.")
