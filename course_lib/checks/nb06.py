"""Checkers of notebook 06 (latent consistency models): the skipping-step target with guidance, the multistep LCM
sampler, LCM-LoRA's composition of LoRA adapters. Cases run on tiny random Stable Diffusion UNets
(sd.tiny_sd_pipeline) and random low-rank factors."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from .. import sd
from ..conditioning import Cond
from ..config import seeded
from ..distill import lcm
from ..distill.lcm import lcm_target, merge_lora, multistep
from ..grids import lcm_timesteps
from ..predictions import Pred
from ..processes import SDDiscrete
from .core import (accept, checker, draw_seed, explain_exception, fall_back, first_look, fresh_generator,
                   is_library, library_version, named_slip, run_check)


def _tiny_teacher_and_target(g: torch.Generator):
    """A random tiny SD teacher (SDDenoiser) and an LCM target network built from it with a random w-projection."""
    seed = draw_seed(g)
    teacher = sd.from_pipeline(sd.tiny_sd_pipeline(seed=seed)).model.requires_grad_(False)
    target = lcm.lcm_student(teacher, 32, (0.0, 8.0), seed=seed)
    with torch.no_grad(), seeded(seed):
        target.denoiser.unet.time_embedding.cond_proj.weight.normal_(0, 0.5)
        for p in target.parameters():                        # theta^- is not the teacher
            p.add_(0.02 * torch.randn_like(p))
    return teacher, target.requires_grad_(False).eval()


def _text(B: int, g: torch.Generator):
    return Cond(text=torch.randn(B, 16, 32, generator=g), null_text=torch.randn(1, 16, 32, generator=g))


@checker("6.1")
def check_lcm_target(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 6.1: student(teacher, target, z, timesteps, k, cond, w, process) -> (B, 4, h, w) the LCD target,
    without gradients. One verdict: the constant-target test runs (silently) before the value comparison."""
    g = fresh_generator(seed)
    teacher, target = _tiny_teacher_and_target(g)
    process = teacher.process

    def cases():
        for taus, k in (([19, 519, 999], 20), ([39, 79, 999], 40), ([0 + 19, 259], 20)):
            B = len(taus)
            z = torch.randn(B, 4, 8, 8, generator=g)
            w = 0.5 + 6 * torch.rand(B, generator=g)
            yield (teacher, target, z, torch.tensor(taus), k, _text(B, g), w, process), \
                f"at timesteps {taus} with skipping step k = {k}"

    hint = ("Convert the integer timesteps to course times with process.t_of_timestep: t_{n+k} from tau, t_n from "
            "(tau - k).clamp_min(0) (one step of k timesteps, not of 1). Guide the teacher with the course's w: "
            "guidance.cfg(teacher, w)(z, t_{n+k}, cond), i.e. (1 + w) cond - w uncond, on both x0 and eps (w is NOT "
            "diffusers' guidance_scale); take the DDIM step steps.ddim_step(pred, t_{n+k}, t_n, process); return "
            "target(z_n, t_n, cond.with_w(w)).x0 (the target network reads w from cond.w), all under torch.no_grad().")
    all_cases = list(cases())
    args0, where0 = all_cases[0]
    problem = first_look(student, args0, lcm_target(*args0), where0)
    if problem:
        return fall_back("6.1", lcm_target, problem)
    # the target must be a constant: no gradient may flow into the teacher or the target network
    live = _tiny_teacher_and_target(g)
    for m in live:
        m.requires_grad_(True)
    z = torch.randn(2, 4, 8, 8, generator=g)
    try:
        out = student(live[0], live[1], z, torch.tensor([99, 499]), 20, _text(2, g), torch.tensor([2.0, 3.0]), process)
    except Exception as e:  # noqa: BLE001
        return fall_back("6.1", lcm_target, explain_exception(e, "with networks that require gradients"))
    if isinstance(out, torch.Tensor) and out.requires_grad:
        return fall_back("6.1", lcm_target, "your target carries gradients (it was computed with autograd on): LCD's "
                         "target is stop-grad f_theta^-(...). Compute it under torch.no_grad().")
    return run_check("6.1", student, lcm_target, all_cases, atol=1e-5, rtol=1e-4, hint=hint)


@checker("6.2")
def check_lcm_multistep(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 6.2: student(f, z, timesteps, process, generator, cond) -> the final sample (B, ...), every call
    f(z, t, cond) with the conditioning it is given (the cases' cond carries a guidance weight w that f reads).
    The stand-in f accepts float32 or float64 times (it computes in z's dtype)."""
    g = fresh_generator(seed)
    process = SDDiscrete()
    A = torch.randn(4, 4, generator=g) / 2

    def f(z, t, cond=None):   # a smooth stand-in for a consistency function: its x0 depends on z, t and cond.w
        t = torch.as_tensor(t).to(z.dtype).reshape(-1, 1, 1, 1)
        x0 = torch.tanh(torch.einsum("ij,bj...->bi...", A.to(z.dtype), z)) * (1 + t)
        return Pred(x0 if cond is None else x0 + cond.w.to(z.dtype).reshape(-1, 1, 1, 1), z)

    with_seed = lambda fn: (lambda f_, z, taus, proc, s, cond: fn(f_, z, taus, proc, torch.Generator().manual_seed(s),
                                                                  cond=cond))
    cond = Cond(w=torch.tensor([0.5, 2.0, 4.0]))                  # an LCM's guidance weights, per sample

    def cases():
        for n in (1, 2, 4, 8):
            z = torch.randn(3, 4, 8, 8, generator=g)
            yield (f, z, lcm_timesteps(n), process, draw_seed(g), cond), f"for {n} step{'s' * (n > 1)}"

    all_cases = list(cases())
    args0, where0 = all_cases[-1]
    problem = first_look(with_seed(student), args0, with_seed(multistep)(*args0), where0)
    if problem:
        return fall_back("6.2", multistep, problem)
    out = run_check("6.2", with_seed(student), with_seed(multistep), all_cases, atol=1e-5, rtol=1e-4,
                    hint="At each timestep: z0 = f(z, t, cond).x0 with t = process.t_of_timestep(tau) as a (B,) "
                         "tensor and the cond given; if "
                         "it is the last one, return z0; otherwise re-noise to the NEXT timestep s: z = alpha(s) z0 + "
                         "sigma(s) eps with eps = torch.randn(z.shape, generator=generator, dtype=z.dtype) (no noise "
                         "after the last step, and the next time, not the current one).")
    return library_version(multistep) if is_library(out) else student


@checker("6.3")
def check_lora_merge(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 6.3: student(weight, loras) -> the merged weight (out, in): W + sum_i lambda_i s_i B_i A_i for
    loras [(lambda_i, s_i, A_i (r_i, in), B_i (out, r_i))], W unchanged. Cases in float32 and float64, ranks and
    scalings that differ between adapters, a negative weight; the mistakes it names: all zeros, the base weight left
    out, peft's scaling s = alpha / r left out, one adapter's weight applied to all, W changed in place."""
    g = fresh_generator(seed)

    def cases():
        for dtype, (out_f, in_f), ranks, lams in (
                (torch.float64, (12, 20), (4, 2), (1.0, 0.8)),
                (torch.float32, (16, 9), (3, 5), (1.0, 0.5)),
                (torch.float64, (8, 8), (2, 4, 1), (0.7, 1.0, -0.3))):
            W = torch.randn(out_f, in_f, generator=g, dtype=dtype) / in_f ** 0.5
            loras = []
            for r, lam in zip(ranks, lams):
                alpha = float(torch.randint(1, 3 * r, (1,), generator=g))
                loras.append((lam, alpha / r, torch.randn(r, in_f, generator=g, dtype=dtype) / in_f ** 0.5,
                              torch.randn(out_f, r, generator=g, dtype=dtype) / r))
            yield (W, loras), (f"for a {tuple(W.shape)} {str(dtype).replace('torch.', '')} weight and {len(loras)} "
                               f"adapters of ranks {list(ranks)}, weights {list(lams)}")

    def close(a, b):   # at the precision of the coarser of the two dtypes: a float32 answer is not a mistake
        single = torch.float32 in (a.dtype, b.dtype)
        return torch.allclose(a.detach().to(b.dtype), b, atol=1e-5 if single else 1e-10, rtol=1e-5 if single else 1e-8)

    variants = [
        (lambda W, L: merge_lora(torch.zeros_like(W), L),
         "your result is missing the base weight W: the composition is the base model's weight PLUS the adapters' "
         "changes (theta' = theta_pre + lambda_1 tau_1 + ...), not the changes alone."),
        (lambda W, L: merge_lora(W, [(lam, 1.0, A, B) for lam, _, A, B in L]),
         "you left out each adapter's scaling s = alpha / r (peft's layer.scaling): its change is s B A, not B A."),
        (lambda W, L: merge_lora(W, [(L[0][0], s, A, B) for _, s, A, B in L]),
         "every adapter gets the first adapter's weight lambda: each adapter has its own lambda_i."),
        (lambda W, L: merge_lora(W, [(lam, s, A, B) for lam, s, A, B in L]) - W + W / len(L),
         "the base weight is divided among the adapters: W appears once, whatever the number of adapters."),
    ]
    n = 0
    for args, where in cases():
        n += 1
        W, L = args
        before = W.clone()
        want = merge_lora(*args)
        problem = first_look(student, (W, L), want, where)
        if problem:
            return fall_back("6.3", merge_lora, problem)
        if not torch.equal(W, before):
            return fall_back("6.3", merge_lora, f"your function changed the base weight W in place {where}: merging "
                             "into the base weights destroys the teacher (and the adapters' base). Work out of place "
                             "(W + ..., or W.clone()).")
        got = student(W, L)
        if not close(got, want):
            why = named_slip(got, [(partial(wrong, W, L), why) for wrong, why in variants], close)
            if why:
                return fall_back("6.3", merge_lora, f"{why} ({where})")
            err = float((got.detach().to(want.dtype) - want).abs().max())
            return fall_back("6.3", merge_lora,
                             f"the merged weight differs from the reference by up to {err:.3g} {where}. Each adapter "
                             "adds lambda_i * s_i * (B_i @ A_i), an (out, in) matrix of rank r_i, to W.")
    return accept("6.3", student, f"correct on {n} random cases (float32 and float64, two and three adapters).")
