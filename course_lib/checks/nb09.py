"""Checkers of notebook 09 (distribution matching: DMD and DMD2): the distribution-matching loss (its gradient, the
score difference's sign, the normalisation, the stop-gradient target), the fake score's denoising loss (on a
detached generator sample), and DMD2's two time-scale loop (the update ratio). Cases run on tiny random 2D models.

The distribution-matching loss 1/2 ||x - sg(x - g)||^2 has the same VALUE whatever the sign of g and whether or not
the target is detached: only its gradient with respect to the generator sample x tells them apart, so the checker
compares d loss / d x with the reference's (g / D) before the values."""
from __future__ import annotations

from typing import Callable

import torch

from ..distill.dmd import dm_loss, fake_score_loss, two_time_scale
from ..processes import VPCosine
from .core import (accept, call_per_sample, checker, explain_exception, fall_back, fresh_generator, param_grads,
                   tiny_model)


def _dm_cases(g: torch.Generator):
    """(x (B, 2) leaf with grad, real, fake, process, t, eps, normalize), where."""
    proc = VPCosine()
    for normalize in ("sample", "batch"):
        real, fake = tiny_model(proc, g), tiny_model(proc, g)
        x = (1.5 * torch.randn(8, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
        t = 0.05 + 0.9 * torch.rand(8, generator=g, dtype=torch.float64)
        eps = torch.randn(8, 2, generator=g, dtype=torch.float64)
        yield (x, real, fake, proc, t, eps, normalize), f"with normalize={normalize!r}"


@checker("9.1")
def check_dm_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 9.1: student(x, real, fake, process, t, eps, normalize) -> the distribution-matching loss per sample
    (B,) (DMD Eq. 7-8): 1/2 ||x - sg(x - g)||^2 averaged over the data dimensions, g = (x0_fake - x0_real) /
    mean|x - x0_real| at x_t = alpha_t sg(x) + sigma_t eps, so that d loss / d x = g / D."""
    g = fresh_generator(seed)

    def reference(x, real, fake, proc, t, eps, normalize):
        return dm_loss(x, real, fake, proc, t, eps, normalize=normalize)

    for args, where in _dm_cases(g):
        x, real, fake, proc, t, eps, normalize = args
        want = reference(*args)
        (want_dx,) = torch.autograd.grad(want.sum(), x)
        got, problem = call_per_sample(student, args, want, where)
        if problem:
            return fall_back("9.1", reference, problem)
        if not got.requires_grad:
            return fall_back("9.1", reference,
                             f"the loss has no gradient with respect to x {where}: only the denoisers and the target "
                             "x - g go under torch.no_grad(); the x in 1/2 ||x - target||^2 must be the generator's "
                             "sample itself.")
        (got_dx,) = torch.autograd.grad(got.sum(), x, allow_unused=True)
        got_dx = torch.zeros_like(x) if got_dx is None else got_dx
        close = lambda a, b: torch.allclose(a, b, atol=1e-8, rtol=1e-6)
        if close(got_dx, -want_dx) and not close(want_dx, torch.zeros_like(want_dx)):
            return fall_back("9.1", reference,
                             f"the gradient with respect to x has the wrong sign {where}: the score difference is "
                             "reversed. g = (x0_fake - x0_real) / norm: gradient DEscent then moves x by -g, towards "
                             "the real (teacher's) denoised estimate and away from the fake one's (s_fake - s_real in "
                             "DMD Eq. 7).")
        with torch.no_grad():
            x_t = proc.marginal(x.detach(), t, eps)
            raw = fake(x_t, t).x0 - real(x_t, t).x0                                 # g without its normaliser
        D = x[0].numel()
        if close(got_dx, raw / D) or close(got_dx, -raw / D):
            return fall_back("9.1", reference,
                             f"the gradient is the raw denoiser difference x0_fake - x0_real {where}: the "
                             "normalisation is missing. Divide by mean|x - x0_real| (per sample over its data "
                             "dimensions for normalize='sample', over the whole batch for 'batch'; DMD Eq. 8), which "
                             "makes the step size independent of the noise level.")
        if not close(got_dx, want_dx):
            err = (got_dx - want_dx).abs().max().item()
            if close(got.detach(), want.detach()):
                return fall_back("9.1", reference,
                                 f"the loss values are right but the gradient with respect to x is not {where} (off "
                                 f"by up to {err:.3g}): the target x - g must be a constant. Compute x_t from "
                                 "x.detach(), both denoisers and g under torch.no_grad(), and the target as "
                                 "(x.detach() - g): the missing stop-gradient lets the gradient flow through g.")
            return fall_back("9.1", reference,
                             f"the gradient with respect to x differs from the reference by up to {err:.3g} {where}. "
                             "x_t = process.marginal(x, t, eps); g = (x0_fake - x0_real) / mean|x - x0_real| "
                             "(nan_to_num); loss = 1/2 (x - sg(x - g))^2 averaged over the data dimensions.")
        if not close(got.detach(), want.detach()):
            err = (got.detach() - want.detach()).abs().max().item()
            return fall_back("9.1", reference,
                             f"the gradient is right but the loss values differ by up to {err:.3g} {where}: return "
                             "1/2 ||x - sg(x - g)||^2 averaged (not summed) over the data dimensions, one per sample.")
    return accept("9.1", student, "correct: the values and the gradient with respect to x (the sign of the score "
                                  "difference, its normalisation and the stop-gradient target) match the reference.")


@checker("9.2")
def check_fake_score_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 9.2: student(fake, x, t, eps) -> the fake score's denoising loss per sample (B,) on the generator's
    samples x (B, D) (DMD Eq. 6): the ordinary diffusion loss in the fake model's own parameterisation, on sg(x)."""
    g = fresh_generator(seed)

    def reference(fake, x, t, eps):
        return fake_score_loss(fake, x, t, eps)

    for _ in range(2):
        proc = VPCosine()
        fake = tiny_model(proc, g)
        params = list(fake.parameters())
        W = torch.randn(2, 2, generator=g, dtype=torch.float64).requires_grad_(True)   # a "generator": x = z W
        z = torch.randn(8, 2, generator=g, dtype=torch.float64)
        t = 0.02 + 0.96 * torch.rand(8, generator=g, dtype=torch.float64)
        eps = torch.randn(8, 2, generator=g, dtype=torch.float64)
        where = "on samples x = G(z) of a small linear generator"
        want = reference(fake, z @ W, t, eps)
        want_g = param_grads(want, params)
        got, problem = call_per_sample(student, (fake, z @ W, t, eps), want, where)
        if problem:
            return fall_back("9.2", reference, problem)
        if not torch.allclose(got.detach(), want.detach(), atol=1e-8, rtol=1e-6):
            err = (got.detach() - want.detach()).abs().max().item()
            return fall_back("9.2", reference,
                             f"the loss differs from the reference by up to {err:.3g} {where}. Noise sg(x) to x_t = "
                             "fake.process.marginal(x, t, eps), and compare fake.raw(x_t, t) with the target in the "
                             "fake model's parameterisation, predictions.from_pred(Pred(x, eps), t, process, "
                             "fake.parameterization); squared error averaged over the data dimensions.")
        (gW,) = torch.autograd.grad(got.sum(), W, allow_unused=True) if got.requires_grad else (None,)
        if gW is not None and gW.abs().max() > 0:
            return fall_back("9.2", reference,
                             f"the loss sends gradients into the generator {where}: the fake score is trained on "
                             "stopgrad(x) (x.detach()). Without it, minimising the fake score's loss would also move "
                             "the generator, towards samples that are easy to denoise.")
        got_g = param_grads(got, params) if got.requires_grad else [torch.zeros_like(p) for p in params]
        if not all(torch.allclose(a, b, atol=1e-8, rtol=1e-5) for a, b in zip(got_g, want_g)):
            return fall_back("9.2", reference, f"the values are right but the gradient with respect to the fake "
                                               f"score's parameters is not {where}: compute fake.raw(x_t, t) with "
                                               "gradients on (not under torch.no_grad()).")
    return accept("9.2", student, "correct: the values and the fake score's gradient match, and no gradient reaches "
                                  "the generator.")


@checker("9.3")
def check_two_time_scale(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 9.3: student(iterations, ttur, update_generator, update_critic) calls update_generator(i) when
    i % ttur == 0 (first) and update_critic(i) on every iteration i (DMD2's two time-scale update rule)."""
    g = fresh_generator(seed)

    def run(fn, iterations, ttur):
        calls = []
        fn(iterations, ttur, lambda i: calls.append(("generator", i)), lambda i: calls.append(("critic", i)))
        return calls

    settings = [(10, 5), (7, 1), (12, 3)]
    settings.append((int(torch.randint(6, 20, (1,), generator=g)), int(torch.randint(2, 8, (1,), generator=g))))
    for iterations, ttur in settings:
        where = f"for iterations={iterations}, ttur={ttur}"
        want = run(two_time_scale, iterations, ttur)
        try:
            got = run(student, iterations, ttur)
        except Exception as e:  # noqa: BLE001
            return fall_back("9.3", two_time_scale, explain_exception(e, where))
        if got == want:
            continue
        count = lambda calls, who: sum(1 for c in calls if c[0] == who)
        ng, nc = count(got, "generator"), count(got, "critic")
        wg, wc = count(want, "generator"), count(want, "critic")
        if (ng, nc) != (wg, wc):
            ratio = f"{nc / ng:.3g}" if ng else "no generator update"
            return fall_back("9.3", two_time_scale,
                             f"{where} your loop updates the generator {ng} times and the critic {nc} times "
                             f"(critic updates per generator update: {ratio}); the rule is {wg} and {wc}: the critic "
                             "on EVERY iteration, the generator only when i % ttur == 0, so the fake score takes "
                             "ttur updates per generator update and keeps up with the moving generator.")
        return fall_back("9.3", two_time_scale,
                         f"{where} the counts are right but the order or the iteration numbers are not: your calls "
                         f"begin {got[:4]}, the reference's {want[:4]}. At iteration i: the generator first (when "
                         "i % ttur == 0), then the critic; pass i to both.")
    return accept("9.3", student, "correct: the critic on every iteration, the generator on every ttur-th, in the "
                                  "reference's order.")
