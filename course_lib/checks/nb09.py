"""Checkers of notebook 09 (distribution matching: DMD and DMD2): the distribution-matching loss (its gradient, the
score difference's sign, the normalisation, the stop-gradient target), the fake score's denoising loss (on a
detached generator sample), and DMD2's backward simulation (the input of a multi-step generator's step i, made by
the generator itself). Cases run on tiny random 2D models. Each checker runs its cases to the first difference and
prints one verdict; answers in float32 are cast to the reference's float64 and compared with float32 tolerances.

The distribution-matching loss 1/2 ||x - sg(x - g)||^2 has the same VALUE whatever the sign of g and whether or not
the target is detached: only its gradient with respect to the generator sample x tells them apart, so the checker
compares d loss / d x with the reference's (g / D) before the values."""
from __future__ import annotations

from typing import Callable

import torch

from ..distill.dmd import backward_simulate, dm_loss, fake_score_loss, generator_times
from ..processes import VPCosine
from .core import (accept, checker, close, dtype_tol, fall_back, first_look, fresh_generator, max_diff, param_grads,
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
        problem = first_look(student, args, want, where,
                             zeros="Its gradient is then 0 too: the generator would never move. Here the real and fake "
                                   "denoisers disagree, so the loss (half the squared step it asks for) is positive.")
        if problem:
            return fall_back("9.1", reference, problem)
        got = student(*args)
        if not got.requires_grad:
            return fall_back("9.1", reference,
                             f"the loss has no gradient with respect to x {where}: only the denoisers and the target "
                             "x - g go under torch.no_grad(); the x in 1/2 ||x - target||^2 must be the generator's "
                             "sample itself.")
        (got_dx,) = torch.autograd.grad(got.sum(), x, allow_unused=True)
        got_dx = torch.zeros_like(x) if got_dx is None else got_dx
        tol = dtype_tol(got, want)
        near = lambda a, b: torch.allclose(a.to(b.dtype), b, **tol)
        if near(got_dx, -want_dx) and not near(want_dx, torch.zeros_like(want_dx)):
            return fall_back("9.1", reference,
                             f"the gradient with respect to x has the wrong sign {where}: the score difference is "
                             "reversed. g = (x0_fake - x0_real) / norm: gradient DEscent then moves x by -g, towards "
                             "the real (teacher's) denoised estimate and away from the fake one's (s_fake - s_real in "
                             "DMD Eq. 7).")
        with torch.no_grad():
            x_t = proc.marginal(x.detach(), t, eps)
            raw = fake(x_t, t).x0 - real(x_t, t).x0                                 # g without its normaliser
            per_sample = (x.detach() - real(x_t, t).x0).abs().mean(1, keepdim=True)
        D = x[0].numel()
        if near(got_dx, raw / D) or near(got_dx, -raw / D):
            return fall_back("9.1", reference,
                             f"the gradient is the raw denoiser difference x0_fake - x0_real {where}: the "
                             "normalisation is missing. Divide by mean|x - x0_real| (DMD Eq. 8), which makes the "
                             "step size independent of the noise level.")
        other = raw / (per_sample.mean() if normalize == "sample" else per_sample) / D
        if near(got_dx, other):
            which = ("one number for the whole batch" if normalize == "sample" else "a separate number per sample")
            return fall_back("9.1", reference,
                             f"the normaliser is {which} {where}: normalize='sample' divides each sample's g by the "
                             "mean of |x - x0_real| over that sample's own D coordinates, (B, 1); normalize='batch' "
                             "by ONE number, the mean of |x - x0_real| over all B x D entries, the same for every "
                             "sample.")
        if not near(got_dx, want_dx):
            err = max_diff(got_dx, want_dx)
            if close(got, want):
                return fall_back("9.1", reference,
                                 f"the loss values are right but the gradient with respect to x is not {where} (off "
                                 f"by up to {err:.3g}): the target x - g must be a constant. Compute x_t from "
                                 "x.detach(), both denoisers and g under torch.no_grad(), and the target as "
                                 "(x.detach() - g): the missing stop-gradient lets the gradient flow through g.")
            return fall_back("9.1", reference,
                             f"the gradient with respect to x differs from the reference by up to {err:.3g} {where}. "
                             "x_t = process.marginal(x, t, eps); g = (x0_fake - x0_real) / mean|x - x0_real| "
                             "(nan_to_num); loss = 1/2 (x - sg(x - g))^2 averaged over the data dimensions.")
        if not close(got, want):
            return fall_back("9.1", reference,
                             f"the gradient is right but the loss values differ by up to {max_diff(got, want):.3g} "
                             f"{where}: return "
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
        problem = first_look(student, (fake, z @ W, t, eps), want, where,
                             zeros="A denoiser's squared error on noised generator samples is positive, and its "
                                   "gradient is what trains the fake score.")
        if problem:
            return fall_back("9.2", reference, problem)
        got = student(fake, z @ W, t, eps)
        if not close(got, want):
            return fall_back("9.2", reference,
                             f"the loss differs from the reference by up to {max_diff(got, want):.3g} {where}. Noise "
                             "sg(x) to x_t = "
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
        tol = dtype_tol(got, want)
        tol["rtol"] = max(tol["rtol"], 1e-5)
        if not all(torch.allclose(a.to(b.dtype), b, **tol) for a, b in zip(got_g, want_g)):
            return fall_back("9.2", reference, f"the values are right but the gradient with respect to the fake "
                                               f"score's parameters is not {where}: compute fake.raw(x_t, t) with "
                                               "gradients on (not under torch.no_grad()).")
    return accept("9.2", student, "correct: the values and the fake score's gradient match, and no gradient reaches "
                                  "the generator.")


def _simulate_variant(G, z, i, times, proc, generator, *, rounds=None, renoise_at=1, call_at=0, fresh=True,
                      last_x0=False, draw_dtype=None):
    """backward_simulate with one thing changed (the checker's catalogue of plausible mistakes)."""
    x, x0 = z, None
    with torch.no_grad():
        for j in range(i if rounds is None else rounds):
            t = torch.full((len(z),), times[min(j + call_at, len(times) - 1)], dtype=z.dtype)
            x0 = G(x, t).x0
            eps = (torch.randn(z.shape, generator=generator, dtype=draw_dtype or torch.float32).to(z) if fresh
                   else z)
            x = proc.marginal(x0, torch.full_like(t, times[min(j + renoise_at, len(times) - 1)]), eps)
    return x0 if (last_x0 and x0 is not None) else x


@checker("9.3")
def check_backward_simulate(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 9.3: student(G, z, i, times, process, generator) -> the input of generator step i (B, D) (DMD2's
    backward simulation, Sec. 4.4): from x = z at times[0], i rounds of x0 = G(x, times[j]).x0 and
    x = alpha(times[j+1]) x0 + sigma(times[j+1]) eps' (fresh eps' = torch.randn(z.shape, generator=generator)),
    without gradients; i = 0 returns z. Fresh noise drawn in float32 (then cast) or directly in z's dtype both pass."""
    gen = fresh_generator(seed)
    proc = VPCosine()
    mistakes = [
        (dict(renoise_at=0), "re-noises x0 to times[j], the time it was just denoised from, instead of the NEXT "
                             "time times[j+1]: the next generator call would see a noise level it is not told"),
        (dict(call_at=1), "calls the generator at times[j+1] instead of times[j]: G must be told the noise level "
                          "its input x actually has"),
        (dict(fresh=False), "re-noises with the initial noise z instead of fresh noise: backward simulation draws a "
                            "new eps' = torch.randn(z.shape, generator=generator) at every round, as the sampler "
                            "does (notebook 05's multistep sampler)"),
        (dict(last_x0=True), "returns the last denoised x0 instead of its re-noised version: step i's input is a "
                             "NOISY sample at times[i], alpha x0 + sigma eps'"),
    ]
    for dtype in (torch.float64, torch.float32):
        G = tiny_model(proc, gen)
        if dtype == torch.float32:
            G = G.float()
        G.requires_grad_(True)                                   # a generator in training: its params have grad
        times = generator_times(4)
        z = torch.randn(8, 2, generator=gen, dtype=torch.float64).to(dtype)
        s = int(torch.randint(2**31, (1,), generator=gen))
        for i in (2, 0, 3, 1):
            where = f"for step i={i} of the 4-step grid {[round(t, 3) for t in times]} (z in {dtype})"
            run = lambda fn, **kw: fn(G, z.clone(), i, times, proc, torch.Generator().manual_seed(s), **kw)
            want = run(backward_simulate)
            also = run(_simulate_variant, draw_dtype=dtype)        # fresh noise drawn directly in z's dtype
            problem = first_look(lambda: run(student), (), want, where,
                                 zeros="The input of generator step i is the noise z itself (i = 0) or a noisy sample "
                                       "at time times[i], never zero.")
            if problem:
                return fall_back("9.3", backward_simulate, problem)
            got = run(student)
            if got.requires_grad:
                return fall_back("9.3", backward_simulate,
                                 f"the result carries gradients {where}: backward simulation runs the generator "
                                 "under torch.no_grad() (DMD2 trains only the last step; backpropagating through "
                                 "the earlier calls would cost memory the paper does not spend).")
            if close(got, want) or close(got, also):
                continue
            near = lambda a: close(got, a)
            if i == 0:
                return fall_back("9.3", backward_simulate, f"{where} the first step's input is the noise z itself, "
                                                           "unchanged (zero rounds).")
            if near(z):
                return fall_back("9.3", backward_simulate,
                                 f"{where} your function returns z unchanged: that is step 0's input only; step i's "
                                 "is made by i rounds of the generator (denoise, re-noise to the next time).")
            for kw, says in [(dict(rounds=i - 1), "runs one round too few (i - 1): step i's input needs i rounds, "
                                                  "one per earlier generator step"),
                             (dict(rounds=i + 1), "runs one round too many (i + 1): step i's input needs i rounds, "
                                                  "one per earlier generator step")] + mistakes:
                if near(run(_simulate_variant, **kw)) or near(run(_simulate_variant, draw_dtype=dtype, **kw)):
                    return fall_back("9.3", backward_simulate, f"{where} your function {says}.")
            return fall_back("9.3", backward_simulate,
                             f"the result differs from the reference by up to {max_diff(got, want):.3g} {where}. "
                             "From x = z: for "
                             "j = 0, ..., i-1, x0 = G(x, t = times[j]).x0 and x = process.marginal(x0, times[j+1], "
                             "eps') with eps' = torch.randn(z.shape, generator=generator), all under torch.no_grad(); "
                             "use the generator passed in for every draw, in this order.")
    return accept("9.3", student, "correct: the generator's own samples, re-noised with fresh noise to each next time "
                                  "of the grid, without gradients, as at inference.")
