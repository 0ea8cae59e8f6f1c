"""Checkers of notebook 05 (consistency models): the boundary-condition parameterisation, the consistency-
distillation loss (teacher step, stop-gradient target), multistep consistency sampling."""
from __future__ import annotations

from typing import Callable

import torch

from ..data2d import exact_denoiser
from ..distill.consistency import (cd_loss_at, cm_grid, consistency_fn, consistency_model, default_t_min,
                                   multistep_sample)
from ..processes import EDM, RectifiedFlow, VPCosine
from .core import (accept, call_per_sample, checker, explain_exception, fall_back, fresh_generator, param_grads,
                   run_check, tiny_model)


def _tiny_cm(proc, g: torch.Generator):
    """A tiny random consistency model (float64) under `proc`, with the process's default t_min."""
    return consistency_model(tiny_model(proc, g), default_t_min(proc))


def _cm_cases(g: torch.Generator, processes=(VPCosine(), EDM(), RectifiedFlow())):
    """(tiny consistency model, process) under several processes."""
    for proc in processes:
        yield _tiny_cm(proc, g), proc


@checker("5.1")
def check_consistency_fn(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 5.1: student(model, x, t, t_min, sigma_data) -> f(x, t) (B, D), the consistency function with its
    boundary condition f(x, t_min) = x."""
    g = fresh_generator(seed)

    def cases():
        for cmodel, proc in _cm_cases(g):
            model = cmodel.model
            x = 1.5 * torch.randn(6, 2, generator=g, dtype=torch.float64)
            t_min = cmodel.t_min
            yield (model, x, torch.full((6,), t_min, dtype=torch.float64), t_min, 0.5), \
                f"at t = t_min for the {proc.name} process (the boundary condition: f(x, t_min) must be x)"
            t = t_min + (1 - t_min) * torch.rand(6, generator=g, dtype=torch.float64)
            yield (model, x, t, t_min, 0.5), f"at random t for the {proc.name} process"

    # the boundary condition first, in plain words: f(x, t_min) = x exactly, whatever the network
    try:
        for args, where in cases():
            if "boundary" in where:
                model, x, t, t_min, sd = args
                f = student(model, x.clone(), t, t_min, sd)
                if isinstance(f, torch.Tensor) and f.shape == x.shape and not torch.allclose(f, x, atol=1e-9):
                    err = (f - x).abs().max().item()
                    return fall_back("5.1", consistency_fn,
                                     f"the boundary condition does not hold: f(x, t_min) differs from x by up to "
                                     f"{err:.3g} {where.split(' (')[0]}. c_skip must be exactly 1 and c_out exactly 0 "
                                     "at t = t_min: measure the noise from sigma(t_min), i.e. use "
                                     "sigma(t) - sigma(t_min) in both (not sigma(t) alone, as EDM's denoiser does).")
    except Exception as e:
        return fall_back("5.1", consistency_fn, explain_exception(e))
    return run_check("5.1", student, consistency_fn, cases(), atol=1e-8, rtol=1e-6,
                     hint="f = c_skip x + c_out x0_hat with c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), "
                          "c_out = sd (sigma - sigma_min) / sqrt(sd^2 + sigma^2), sigma = process.sigma(t), "
                          "sigma_min = process.sigma(t_min), x0_hat = model(x, t).x0; bcast the (B,) scalings.")


@checker("5.2")
def check_cd_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 5.2: student(student_model, target_model, teacher, x0, eps, t_next, t_cur, process) -> per-sample
    consistency-distillation loss (B,): one Heun step of the teacher from t_next to t_cur, the student's f at
    (x_{t_next}, t_next), the target's f at the teacher's point, stop-gradient on the target, squared L2 (mean).

    Besides the values, the gradient with respect to the student's parameters must equal the reference's, also
    when target_model IS the student (mu = 0: theta^- = stopgrad theta): a loss that lets the gradient through the
    target is rejected."""
    g = fresh_generator(seed)

    def cases():
        for k, (cm, proc) in enumerate(_cm_cases(g, (VPCosine(), EDM()))):
            teacher = exact_denoiser("gmm", proc)
            other = _tiny_cm(proc, g)
            grid = cm_grid(8, proc, cm.t_min)
            n = torch.randint(7, (8,), generator=g)
            x0 = 2 * torch.randn(8, 2, generator=g, dtype=torch.float64)
            eps = torch.randn(8, 2, generator=g, dtype=torch.float64)
            args = (x0, eps, grid[n + 1], grid[n], proc)
            yield (cm, other, teacher) + args, f"for the {proc.name} process with a separate target network"
            yield (cm, cm, teacher) + args, (f"for the {proc.name} process with the student as its own target "
                                             "(mu = 0)")

    def reference(s, tgt, teacher, x0, eps, t_next, t_cur, proc):
        return cd_loss_at(s, tgt, teacher, x0, eps, t_next, t_cur, proc, solver="heun")

    for args, where in cases():
        s = args[0]
        params = [p for p in s.parameters()]
        for p in params:
            p.requires_grad_(True)
        want = reference(*args)
        want_g = param_grads(want, params)
        got, problem = call_per_sample(student, args, want, where)
        if problem:
            return fall_back("5.2", reference, problem)
        if not torch.allclose(got.detach(), want.detach(), atol=1e-8, rtol=1e-6):
            err = (got.detach() - want.detach()).abs().max().item()
            return fall_back("5.2", reference,
                             f"the loss differs from the reference by up to {err:.3g} {where}. Noise x0 to t_next "
                             "(process.marginal), take ONE Heun step of the teacher to t_cur (steps.heun), compare "
                             "student(x_next, t_next).x0 with target(x_teacher, t_cur).x0, squared error averaged "
                             "over the data dimensions.")
        if not got.requires_grad:
            return fall_back("5.2", reference, f"the loss has no gradient {where}: compute the student's f outside "
                                               "torch.no_grad() (only the teacher step and the target go inside).")
        got_g = param_grads(got, params)
        if not all(torch.allclose(a, b, atol=1e-8, rtol=1e-5) for a, b in zip(got_g, want_g)):
            return fall_back("5.2", reference,
                             f"the loss values are right but its gradient is not {where}: the gradient flows through "
                             "the target f_{theta^-} too. The target is a constant (stop-gradient): compute the "
                             "teacher step and target(x_teacher, t_cur) under torch.no_grad() (or .detach() them).")
    return accept("5.2", student, "correct: the values and the student's gradient (a stop-gradient target, also "
                                  "when the target is the student itself) match the reference.")


@checker("5.3")
def check_multistep(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 5.3: student(model, x, ts, process, t_min, noises) -> samples (B, D): multistep consistency sampling
    (Algorithm 1) with the fresh noises given, noises (len(ts) - 1, B, D)."""
    g = fresh_generator(seed)

    def reference(model, x, ts, process, t_min, noises):
        return multistep_sample(model, x, ts, process, t_min, noises=noises)

    def cases():
        for cm, proc in _cm_cases(g):
            for ts in ([1.0], [1.0, 0.5], [1.0, 0.7, 0.3]):
                x = proc.prior((6, 2), generator=g, dtype=torch.float64)
                noises = torch.randn(max(len(ts) - 1, 1), 6, 2, generator=g, dtype=torch.float64)[: len(ts) - 1]
                yield (cm, x, ts, proc, cm.t_min, noises), f"for the {proc.name} process and step times {ts}"

    return run_check("5.3", student, reference, cases(), atol=1e-8, rtol=1e-6,
                     hint="x0 = model(x, 1).x0; then for each later time tau: re-noise x0 from t_min to tau with "
                          "the process's own scales, x_tau = (alpha_tau / alpha_min) x0 + sqrt(sigma_tau^2 - "
                          "(alpha_tau / alpha_min)^2 sigma_min^2) z (samplers.renoise does it; a variance-preserving "
                          "process scales x0 by alpha_tau, so x0 + sigma_tau z is wrong there), and x0 = "
                          "model(x_tau, tau).x0. Return the last x0.")
