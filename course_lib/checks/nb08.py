"""Checkers of notebook 08 (adversarial diffusion distillation): the score-distillation loss (re-noise the student's
sample, the teacher's x0 under stop-gradient, the weighting c(t) = alpha_t), the discriminator's loss (hinge on
real vs a detached fake, R1 on the REAL samples) and the k-step sampler on the trailing grid. Cases run on tiny
random 2D models under several processes, in float64 and (the notebook's dtype) float32, each compared with a
tolerance that fits its dtype. Each checker runs every case before its one verdict; a placeholder that returns zeros
is told what is wrong with its value, not the recipe, which comes only with a wrong non-zero value."""
from __future__ import annotations

import copy
from typing import Callable

import torch

from ..conditioning import labels
from ..distill import add
from ..distill.add import distill_weight, sample
from ..distill.gan import hinge_d, r1_penalty
from ..processes import RectifiedFlow, VPCosine
from .core import (accept, checker, clone_tensors, close, dtype_tol, fall_back, first_look, fresh_generator, max_diff,
                   run_check, tiny_discriminator, tiny_model)


def _tiny_d(g: torch.Generator):
    """A tiny random discriminator x (B, 2) -> logits (B,) (float64), and its network."""
    net = tiny_discriminator(g)
    return lambda x: net(x).squeeze(1), net


def _float32(model):
    """A float32 case's model (the notebook's dtype): a float32 copy of a checker's float64 tiny model."""
    return copy.deepcopy(model).float()


def distillation_loss(x_hat, teacher, t, eps, process, cond=None):
    """The reference of exercise 8.1: ADD's L_distill with c(t) = alpha_t (add.distillation_loss)."""
    return add.distillation_loss(x_hat, teacher, t, eps, process, cond)


@checker("8.1")
def check_distillation_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 8.1: student(x_hat, teacher, t, eps, process, cond) -> per-sample L_distill (B,): x_hat_t = alpha_t
    x_hat + sigma_t eps, the teacher's x0 of it (teacher(x_hat_t, t, cond), cond the batch's labels or None) as a
    constant target, c(t) ||x_hat - target||^2 with c(t) = alpha_t (mean over the data dimensions). Values are
    compared with the reference, then the gradient with respect to x_hat (which must not flow through the
    teacher)."""
    g = fresh_generator(seed)
    ref = distillation_loss

    def draw(dtype=torch.float64):                     # x_hat (8, 2), t (8,) in [0.05, 0.95], eps (8, 2)
        x_hat = 1.5 * torch.randn(8, 2, generator=g, dtype=torch.float64)
        t = 0.05 + 0.9 * torch.rand(8, generator=g, dtype=torch.float64)
        return x_hat.to(dtype), t.to(dtype), torch.randn(8, 2, generator=g, dtype=torch.float64).to(dtype)

    def cases():
        for proc in (VPCosine(), RectifiedFlow()):
            teacher = tiny_model(proc, g)
            x_hat, t, eps = draw()
            yield (x_hat, teacher, t, eps, proc, None), f"for the {proc.name} process"
        proc = VPCosine()                               # a class-conditional teacher: the labels reach it
        teacher = tiny_model(proc, g, num_classes=3)
        x_hat, t, eps = draw()
        cond = labels(torch.randint(3, (8,), generator=g), 3)
        yield (x_hat, teacher, t, eps, proc, cond), f"for the {proc.name} process and a class-conditional teacher"
        teacher = _float32(tiny_model(proc, g))         # the notebook's dtype: float32 samples, times and teacher
        x_hat, t, eps = draw(torch.float32)
        yield (x_hat, teacher, t, eps, proc, None), f"in float32 for the {proc.name} process"

    def weighted(kind):
        def loss(x_hat, teacher, t, eps, process, cond=None):
            with torch.no_grad():
                target = teacher(process.marginal(x_hat, t, eps), t, cond).x0
            return distill_weight(t, process, kind) * (x_hat - target).pow(2).mean(1)
        return loss

    def reversed_c(x_hat, teacher, t, eps, process, cond=None):
        return weighted("none")(x_hat, teacher, t, eps, process, cond) * (1 - process.alpha(t))

    diagnoses = [
        (weighted("none"), "your loss has no weighting c(t): ADD weights each sample by c(t) = alpha_t (the "
                           "'exponential' weighting), so the teacher's target counts less at high noise, where it is "
                           "little more than the data mean."),
        (weighted("sds"), "your loss weights by sigma_t^2 (SDS's weighting), which is largest at high noise: ADD's "
                          "c(t) = alpha_t does the opposite."),
        (reversed_c, "your weighting is reversed (1 - alpha_t): c(t) = alpha_t is large at low noise and small at high "
                     "noise."),
    ]
    problem = None                                      # every case runs before the one verdict
    for args, where in cases():
        x_hat = args[0].clone().requires_grad_(True)
        want = ref(x_hat, *args[1:])
        problem = first_look(student, (x_hat, *args[1:]), want, where,
                             zeros="The loss is a weighted squared distance between x_hat and the teacher's denoised "
                                   "version of it, positive wherever the two differ.")
        if problem:
            break
        got = student(x_hat, *args[1:])
        if not close(got, want):
            problem = next((f"{why} ({where})" for wrong, why in diagnoses if close(got, wrong(*args))), None)
            if problem is None:
                problem = (f"the loss differs from the reference by up to {max_diff(got, want):.3g} {where}. "
                           "Re-noise x_hat to t "
                           "(process.marginal(x_hat, t, eps)), take the teacher's .x0 of it, teacher(x_hat_t, t, "
                           "cond).x0 with the labels cond it is given, as the target, and return "
                           "alpha_t * ||x_hat - target||^2 averaged over the data dimensions (bcast or [:, None]).")
            break
        if not got.requires_grad:
            problem = (f"the loss has no gradient {where}: only the teacher's target is a constant; x_hat itself must "
                       "keep its graph (compute the target alone under no_grad).")
            break
        (want_g,) = torch.autograd.grad(want.sum(), x_hat)
        (got_g,) = torch.autograd.grad(got.sum(), x_hat)
        if not torch.allclose(got_g.to(want_g.dtype), want_g, **dtype_tol(got, want)):
            problem = (f"the values are right but the gradient with respect to x_hat is not {where}: it flows "
                       "through the teacher's target (x_hat_t depends on x_hat). The target is a constant "
                       "(stop-gradient, ADD Sec. 3.3): compute x_hat_t from x_hat.detach() and the teacher's x0 "
                       "under torch.no_grad().")
            break
    if problem:
        return fall_back("8.1", ref, problem)
    return accept("8.1", student, "correct: the values (re-noised student sample, teacher's x0, c(t) = alpha_t) and "
                                  "the gradient (a stop-gradient target) match the reference, in float64 and "
                                  "float32.")


def discriminator_loss(D, x_real, x_fake, r1_gamma):
    """The reference of exercise 8.2: hinge + gamma / 2 R1 at the real samples (add.discriminator_loss)."""
    return add.discriminator_loss(D, x_real, x_fake, r1_gamma, "hinge")


@checker("8.2")
def check_discriminator_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 8.2: student(D, x_real, x_fake, r1_gamma) -> per-sample L_adv^D (B,): relu(1 - D(x_real)) +
    relu(1 + D(x_fake)) + r1_gamma / 2 ||grad_x D(x_real)||^2; the fake samples are a constant (no gradient reaches
    them); the loss must stay differentiable in D's parameters (R1 included: create_graph)."""
    g = fresh_generator(seed)
    ref = discriminator_loss

    def cases():
        for gamma in (0.0, 0.5, 3.0):
            D, net = _tiny_d(g)
            x_real = 2 * torch.randn(8, 2, generator=g, dtype=torch.float64)
            x_fake = 2 * torch.randn(8, 2, generator=g, dtype=torch.float64)
            yield (D, x_real, x_fake, gamma), net, f"with r1_gamma = {gamma}"
        D, net = _tiny_d(g)                             # the notebook's dtype: float32 discriminator and samples
        net.float()
        x_real, x_fake = (2 * torch.randn(8, 2, generator=g, dtype=torch.float64).float() for _ in range(2))
        yield (D, x_real, x_fake, 0.5), net, "in float32 with r1_gamma = 0.5"

    diagnoses = [
        (lambda D, r, f, gm: hinge_d(D(r), D(f)) + 0.5 * gm * r1_penalty(D, f),
         "your R1 penalty is taken at the FAKE samples: R1 (Mescheder et al. 2018) penalises the discriminator's "
         "gradient at the REAL data, so that at equilibrium it is flat on the data manifold. Use x_real."),
        (lambda D, r, f, gm: hinge_d(D(f), D(r)) + 0.5 * gm * r1_penalty(D, r),
         "your hinge signs are flipped (real and fake swapped): real samples should get HIGH logits, "
         "relu(1 - D(x_real)), and fake ones low, relu(1 + D(x_fake)) (Lim & Ye 2017)."),
        (lambda D, r, f, gm: hinge_d(D(r), D(f)) + gm * r1_penalty(D, r),
         "your R1 term is missing its factor 1/2: the penalty is gamma / 2 ||grad_x D(x_real)||^2."),
        (lambda D, r, f, gm: hinge_d(D(r), D(f)),
         "your loss has no R1 penalty: add r1_gamma / 2 ||grad_x D(x_real)||^2 (gan.r1_penalty gives the squared "
         "norm per sample)."),
    ]
    problem = None                                      # every case runs before the one verdict
    for args, net, where in cases():
        D, x_real, x_fake, gamma = args
        fake = x_fake.clone().requires_grad_(True)
        want = ref(D, x_real, x_fake, gamma)
        problem = first_look(student, (D, x_real.clone(), fake, gamma), want, where,
                             zeros="The hinge terms are at least 0 and, for a discriminator that cannot yet tell real "
                                   "from fake (logits near 0), about 2 per sample.")
        if problem:
            break
        got = student(D, x_real.clone(), fake, gamma)
        if not close(got, want):
            problem = next((f"{why} ({where})" for wrong, why in diagnoses
                            if not (gamma == 0 and "R1" in why) and close(got, wrong(D, x_real, x_fake, gamma))),
                           None)
            if problem is None:
                problem = (f"the loss differs from the reference by up to {max_diff(got, want):.3g} {where}. "
                           "relu(1 - D(x_real)) + relu(1 + D(x_fake)) + r1_gamma / 2 * R1(x_real).")
            break
        params = list(net.parameters())
        want_g = torch.autograd.grad(want.sum(), params)
        try:
            got_g = torch.autograd.grad(got.sum(), params + [fake], allow_unused=True)
        except RuntimeError as e:
            problem = (f"the loss cannot be differentiated in the discriminator's parameters {where} ({e}). Keep the "
                       "R1 gradient's graph (create_graph=True).")
            break
        if got_g[-1] is not None and got_g[-1].abs().max() > 0:
            problem = (f"gradients reach the fake samples {where}: the discriminator's loss must not train the "
                       "student. Use x_fake.detach().")
            break
        if not all(b is not None and torch.allclose(b.to(a.dtype), a, **dtype_tol(got, want))
                   for a, b in zip(want_g, got_g[:-1])):
            problem = (f"the values are right but the gradient in D's parameters is not {where}: the R1 term must "
                       "stay differentiable (torch.autograd.grad(..., create_graph=True)), as gan.r1_penalty does.")
            break
    if problem:
        return fall_back("8.2", ref, problem)
    return accept("8.2", student, "correct: hinge on real and (detached) fake samples, R1 at the real samples with "
                                  "weight gamma / 2, differentiable in D's parameters, in float64 and float32.")


def trailing_sample(model, z, k, process, noises, cond=None):
    """The reference of exercise 8.3: add.sample with the given fresh noises."""
    return sample(model, z, k, process, noises=noises, cond=cond)


@checker("8.3")
def check_trailing_sample(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 8.3: student(model, z, k, process, noises, cond=None) -> samples (B, D): k steps at t = 1,
    (k-1)/k, ..., 1/k, each x0 = model(x, t, cond).x0 re-noised to the next time with noises[i] (k - 1 of them),
    the last x0 returned. The last case is class-conditional: a sampler that drops cond fails it."""
    g = fresh_generator(seed)
    ref = trailing_sample

    def cases():
        for proc in (VPCosine(), RectifiedFlow()):
            model = tiny_model(proc, g)
            for k in (1, 2, 4):
                z = proc.prior((6, 2), generator=g, dtype=torch.float64)
                noises = torch.randn(max(k - 1, 1), 6, 2, generator=g, dtype=torch.float64)[: k - 1]
                yield (model, z, k, proc, noises), f"for the {proc.name} process with {k} steps"
        model = tiny_model(VPCosine(), g, num_classes=3)                        # labels reach every model call
        z = VPCosine().prior((6, 2), generator=g, dtype=torch.float64)
        noises = torch.randn(1, 6, 2, generator=g, dtype=torch.float64)
        cond = labels(torch.randint(3, (6,), generator=g), 3)
        yield (model, z, 2, VPCosine(), noises, cond), "for a class-conditional model with 2 steps (labels in cond)"
        model = _float32(tiny_model(VPCosine(), g))                             # the notebook's dtype
        z = VPCosine().prior((6, 2), generator=g, dtype=torch.float64).float()
        noises = torch.randn(3, 6, 2, generator=g, dtype=torch.float64).float()
        yield (model, z, 4, VPCosine(), noises), "in float32 for the vp-cosine process with 4 steps"

    cases = list(cases())
    (args0, where0) = cases[0]
    problem = first_look(student, clone_tensors(args0), ref(*args0), where0,
                         zeros="A sample is the model's last x0 prediction, spread like the data, not the origin.")
    if problem:
        return fall_back("8.3", ref, problem)
    # atol 1e-6 fits float32 answers (float64 cases agree to ~1e-15; the mistakes below differ by ~0.1)
    return run_check("8.3", student, ref, cases, atol=1e-6, rtol=1e-5,
                     hint="the grid is t_i = 1 - i / k (i = 0..k-1: the trailing grid, never t = 0); at each t_i take "
                          "x0 = model(x, t, cond).x0 with t a (B,) tensor; before the next step re-noise the CLEAN "
                          "x0 to the next time, x = alpha_{t_{i+1}} x0 + sigma_{t_{i+1}} noises[i] "
                          "(process.marginal); return the last x0.")
