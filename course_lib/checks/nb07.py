"""Checkers of notebook 07 (trajectory consistency distillation): the trajectory consistency function, the TCD loss
(teacher step, stop-gradient target network, an end point at or below t_n), the gamma sampler (strategic stochastic
sampling). Cases run on tiny random 2D models under several processes."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from ..data2d import exact_denoiser
from ..distill.consistency import cm_grid
from ..distill.tcd import tcd_loss_at, tcf
from ..processes import EDM, RectifiedFlow, VPCosine
from ..samplers import tcd
from .core import (accept, checker, close, explain_exception, fall_back, first_look, fresh_generator, is_library,
                   max_diff, named_slip, param_grads, quiet, run_check, same_grads, tiny_model)


# Exercise 7.3's tolerance: its cases are float64, and a sampler that builds its times in float32 (a correct one)
# differs by ~1e-7; the mistakes it names differ by 1e-2 or more.
SAMPLER_ATOL, SAMPLER_RTOL = 1e-6, 1e-5


@checker("7.1")
def check_tcf(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 7.1: student(model, x_t, t, s, process) -> f_theta(x_t, t, s) (B, D), the first-order trajectory
    consistency function from t (B,) to s (B,) <= t."""
    g = fresh_generator(seed)

    def cases():
        for proc in (VPCosine(), RectifiedFlow(), EDM()):
            model = tiny_model(proc, g)
            x = 1.5 * torch.randn(6, 2, generator=g, dtype=torch.float64)
            t = 0.05 + 0.9 * torch.rand(6, generator=g, dtype=torch.float64)
            yield (model, x, t, t * torch.rand(6, generator=g, dtype=torch.float64), proc), \
                f"for the {proc.name} process at random s < t"
            yield (model, x, t, t.clone(), proc), f"for the {proc.name} process at s = t (f must return x_t)"

    args0, where0 = next(cases())
    problem = first_look(student, args0, tcf(*args0), where0)
    if problem:
        return fall_back("7.1", tcf, problem)
    # the commonest slip first, in plain words: a jump to the end (t = 0) instead of to s
    try:
        for (model, x, t, s, proc), where in cases():
            got = student(model, x.clone(), t, s, proc)
            if "random" in where and close(got, model(x, t).x0) and not close(got, tcf(model, x, t, s, proc)):
                return fall_back("7.1", tcf, f"your function returns x0_hat, the jump to t = 0, {where}: the TCF "
                                             "jumps to the given s. Use alpha_s and sigma_s of s, not of 0.")
    except Exception as e:  # noqa: BLE001
        return fall_back("7.1", tcf, explain_exception(e))
    return run_check("7.1", student, tcf, cases(), atol=1e-8, rtol=1e-6,
                     hint="f = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) x0_hat with h = lambda_s - lambda_t, "
                          "lambda = log(alpha / sigma), x0_hat = model(x_t, t).x0; equivalently alpha_s x0_hat + "
                          "sigma_s eps_hat with eps_hat = (x_t - alpha_t x0_hat) / sigma_t. bcast the (B,) scales.")


def tcd_loss_u(student, target, teacher, x0, eps, t_next, t_cur, u, process):
    """The reference of exercise 7.2: the end point s = u t_cur (u in [0, 1)), one DDIM step of the teacher, l2."""
    return tcd_loss_at(student, target, teacher, x0, eps, t_next, t_cur, u * t_cur, process, "ddim", "l2")


@checker("7.2")
def check_tcd_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 7.2: student(student_model, target_model, teacher, x0, eps, t_next, t_cur, u, process) -> per-sample
    TCD loss (B,): the end point s = u t_cur (u (B,) in [0, 1): s in [0, t_n]), one DDIM step of the teacher from
    x_{t_next} to t_cur, both sides jumped to s with the TCF, the target network's side under stop-gradient,
    squared L2 (mean over the data dimensions).

    The values are checked with a target network distinct from the student (so using the online network for the
    target shows), and the gradient with respect to the student's parameters also when target_model IS the student
    (mu = 0): a loss that lets the gradient through the target is rejected."""
    g = fresh_generator(seed)
    ref = tcd_loss_u

    def cases():
        for proc in (VPCosine(), RectifiedFlow()):
            net, other = tiny_model(proc, g), tiny_model(proc, g)
            grid = cm_grid(8, proc, 0.002)
            n = torch.randint(1, 8, (8,), generator=g)
            x0 = 2 * torch.randn(8, 2, generator=g, dtype=torch.float64)
            eps = torch.randn(8, 2, generator=g, dtype=torch.float64)
            u = 0.1 + 0.8 * torch.rand(8, generator=g, dtype=torch.float64)
            args = (x0, eps, grid[n], grid[n - 1], u, proc)
            yield (net, other, exact_denoiser("gmm", proc)) + args, f"for the {proc.name} process"

    diagnoses = [
        (lambda a: tcd_loss_at(*a[:7], a[7] * a[5], a[8], "ddim", "l2"),
         "your end point lies between 0 and t_next: s = u t_next can land above t_n, where the target's TCF cannot "
         "go (s <= t_n). Draw s in [0, t_cur]: s = u * t_cur."),
        (lambda a: tcd_loss_at(a[0], a[0], *a[2:7], a[7] * a[6], a[8], "ddim", "l2"),
         "your target side uses the online student, not the target network theta^- (target_model): the loss "
         "compares f_theta(x_{t_next}, t_next, s) with f_{theta^-}(x_hat_{t_cur}, t_cur, s)."),
        (lambda a: tcd_loss_at(*a[:7], torch.zeros_like(a[6]), a[8], "ddim", "l2"),
         "both sides jump to t = 0 (a consistency-distillation loss): TCD jumps both to the random end point "
         "s = u t_cur."),
    ]
    for args, where in cases():
        s_model = args[0]
        params = list(s_model.parameters())
        for p in params:
            p.requires_grad_(True)
        want = ref(*args)
        problem = first_look(student, args, want, where, zeros="The student and the target jump from different "
                                                               "points, so their squared distance is positive.")
        if problem:
            return fall_back("7.2", ref, problem)
        got = student(*args)
        if not close(got, want):
            why = named_slip(got, [(partial(wrong, args), why) for wrong, why in diagnoses])
            if why:
                return fall_back("7.2", ref, f"{why} ({where})")
            return fall_back("7.2", ref,
                             f"the loss differs from the reference by up to {max_diff(got, want):.3g} {where}. s = "
                             "u t_cur; noise x0 "
                             "to t_next (process.marginal); ONE DDIM step of the teacher to t_cur (steps.ddim); compare "
                             "tcf(student, x_next, t_next, s) with tcf(target, x_teacher, t_cur, s); squared error "
                             "averaged over the data dimensions.")
        if not got.requires_grad:
            return fall_back("7.2", ref, f"the loss has no gradient {where}: compute the student's side outside "
                                         "torch.no_grad() (only the teacher step and the target's side go inside).")
        own = (s_model, s_model) + args[2:]
        want_g, got_g = param_grads(ref(*own), params), None
        try:
            got_g = param_grads(student(*own), params)
        except Exception as e:  # noqa: BLE001
            return fall_back("7.2", ref, explain_exception(e, where + " with the student as its own target"))
        if not same_grads(got_g, want_g):
            return fall_back("7.2", ref,
                             f"the values are right but the gradient is not {where} when the target is the student "
                             "itself (mu = 0): the gradient flows through the target side. It is a constant "
                             "(stop-gradient): compute the teacher step and the target's TCF under torch.no_grad().")
    return accept("7.2", student, "correct: the values (end point in [0, t_n], the target network's side) and the "
                                  "student's gradient (a stop-gradient target) match the reference.")


def gamma_sample(model, x, ts, process, gamma, noises):
    """The reference of exercise 7.3: samplers.tcd with the given fresh noises."""
    return tcd(model, x, ts, process, gamma=gamma, noises=noises)


@checker("7.3")
def check_gamma_sampler(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 7.3: student(model, x, ts, process, gamma, noises) -> samples (B, D): strategic stochastic sampling
    on the decreasing grid ts (n + 1,) ending at 0, each step t -> t' jumping with the TCF to s' = (1 - gamma) t' and
    re-noising from s' to t', noises (n - 1, B, D) the fresh z of the re-noising steps (none on the last step);
    gamma outside [0, 1] must raise ValueError. Cases are float64; times built in float32 pass (SAMPLER_ATOL).
    One verdict: every test (values, the gamma range) runs before it is printed."""
    g = fresh_generator(seed)
    ref = gamma_sample
    near = lambda a, b: close(a, b, atol=SAMPLER_ATOL, rtol=SAMPLER_RTOL)

    def cases():
        for proc in (VPCosine(), RectifiedFlow()):
            model = tiny_model(proc, g)
            for n, gamma in ((1, 0.3), (2, 0.3), (3, 0.0), (3, 0.25), (4, 0.6), (4, 1.0)):
                ts = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
                x = proc.prior((6, 2), generator=g, dtype=torch.float64)
                noises = torch.randn(max(n - 1, 1), 6, 2, generator=g, dtype=torch.float64)[: n - 1]
                yield (model, x, ts, proc, gamma, noises), f"for the {proc.name} process, {n} steps, gamma = {gamma}"

    all_cases = list(cases())
    args0, where0 = all_cases[4]
    problem = first_look(student, args0, ref(*args0), where0)
    if problem:
        return fall_back("7.3", ref, problem)
    try:
        for args, where in all_cases:
            if args[4] not in (0.0, 1.0) and len(args[2]) > 2:
                got = student(*args)
                flipped = ref(*args[:4], 1.0 - args[4], args[5])
                if near(got, flipped) and not near(got, ref(*args)):
                    return fall_back("7.3", ref, f"your sampler uses gamma the wrong way round {where}: it jumps to "
                                                 "gamma * t'. The end point is s' = (1 - gamma) t': gamma = 0 is "
                                                 "deterministic (s' = t'), gamma = 1 jumps to 0 and re-noises.")
    except Exception as e:  # noqa: BLE001
        return fall_back("7.3", ref, explain_exception(e))
    fn, verdict = quiet(run_check, "7.3", student, ref, all_cases, atol=SAMPLER_ATOL, rtol=SAMPLER_RTOL,
                        hint="at each step t -> t': s' = (1 - gamma) t'; x_s' = alpha_s' x0_hat + sigma_s' eps_hat "
                             "(the TCF jump); then, except on the last step, re-noise FROM s' TO t' with the "
                             "process's kernel, x_t' = (alpha_t' / alpha_s') x_s' + sqrt(sigma_t'^2 - (alpha_t' / "
                             "alpha_s')^2 sigma_s'^2) z (samplers.renoise); a plain sigma_t' z or alpha_t' x + ... "
                             "from 0 is wrong unless s' = 0.")
    if is_library(fn):
        print(verdict, end="")
        return fn
    proc = VPCosine()
    for bad in (-0.1, 1.5):
        try:
            student(tiny_model(proc, g), proc.prior((2, 2), generator=g, dtype=torch.float64),
                    torch.linspace(1.0, 0.0, 3, dtype=torch.float64), proc, bad,
                    torch.randn(1, 2, 2, generator=g, dtype=torch.float64))
        except ValueError:
            continue
        except Exception as e:  # noqa: BLE001
            return fall_back("7.3", ref, explain_exception(e, f"with gamma = {bad}") + " It should raise ValueError.")
        return fall_back("7.3", ref, f"gamma = {bad} ran without complaint (the values are right for gamma in "
                                     "[0, 1]): gamma outside [0, 1] has no meaning (the end point s' = (1 - gamma) t' "
                                     "would lie above t' or below 0; diffusers#8305). Raise a ValueError that says "
                                     "gamma must be in [0, 1].")
    print(verdict, end="")
    return fn
