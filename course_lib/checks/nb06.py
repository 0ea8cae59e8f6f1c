"""Checkers of notebook 06 (latent consistency models): the skipping-step target with guidance, LCM's boundary
scalings, the multistep LCM sampler. Cases run on tiny random Stable Diffusion UNets (sd.tiny_sd_pipeline)."""
from __future__ import annotations

from typing import Callable

import torch

from .. import precond, sd
from ..conditioning import Cond
from ..config import seeded
from ..distill import lcm
from ..distill.lcm import lcm_target, multistep
from ..grids import lcm_timesteps
from ..predictions import Pred
from ..processes import SDDiscrete
from .core import (checker, draw_seed, explain_exception, fall_back, fresh_generator, is_library, library_version,
                   run_check)


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
    """Exercise 6.1: student(teacher, target, z, timesteps, k, cond, w, process) -> (B, 4, h, w) the LCD target."""
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
    fn = run_check("6.1", student, lcm_target, cases(), atol=1e-5, rtol=1e-4, hint=hint)
    if is_library(fn):
        return fn
    # the target must be a constant: no gradient may flow into the teacher or the target network
    live = _tiny_teacher_and_target(g)
    for m in live:
        m.requires_grad_(True)
    z = torch.randn(2, 4, 8, 8, generator=g)
    try:
        out = student(live[0], live[1], z, torch.tensor([99, 499]), 20, _text(2, g), torch.tensor([2.0, 3.0]), process)
    except Exception as e:  # noqa: BLE001
        return fall_back("6.1", lcm_target, explain_exception(e, "with networks that require gradients"))
    if out.requires_grad:
        return fall_back("6.1", lcm_target, "your target carries gradients (it was computed with autograd on): LCD's "
                         "target is stop-grad f_theta^-(...). Compute it under torch.no_grad().")
    return fn


@checker("6.2")
def check_lcm_scalings(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 6.2: student(timesteps, sigma_data, timestep_scaling) -> (c_skip, c_out), each (B,)."""
    g = fresh_generator(seed)

    def cases():
        for sd_, s in ((0.5, 10.0), (0.5, 10.0), (0.8, 3.0)):
            taus = torch.cat([torch.tensor([0, 1, 19]), torch.randint(0, 1000, (5,), generator=g)])
            yield (taus, sd_, s), f"at timesteps {taus.tolist()} with sigma_data {sd_} and timestep_scaling {s}"

    return run_check("6.2", student, precond.lcm, cases(), atol=1e-7, rtol=1e-5,
                     hint="With s tau the scaled timestep (timestep_scaling times the integer timestep, as float64): "
                          "c_skip = sd^2 / ((s tau)^2 + sd^2) and c_out = s tau / sqrt((s tau)^2 + sd^2) (LCM's c_out "
                          "has no sigma_data factor, unlike Consistency Models'); c_skip(0) = 1, c_out(0) = 0.")


@checker("6.3")
def check_lcm_multistep(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 6.3: student(f, z, timesteps, process, generator, cond) -> the final sample (B, ...), every call
    f(z, t, cond) with the conditioning it is given (the cases' cond carries a guidance weight w that f reads)."""
    g = fresh_generator(seed)
    process = SDDiscrete()
    A = torch.randn(4, 4, generator=g) / 2

    def f(z, t, cond=None):   # a smooth stand-in for a consistency function: its x0 depends on z, t and cond.w
        x0 = torch.tanh(torch.einsum("ij,bj...->bi...", A, z)) * (1 + t.reshape(-1, 1, 1, 1))
        return Pred(x0 if cond is None else x0 + cond.w.reshape(-1, 1, 1, 1), z)

    with_seed = lambda fn: (lambda f_, z, taus, proc, s, cond: fn(f_, z, taus, proc, torch.Generator().manual_seed(s),
                                                                  cond=cond))
    cond = Cond(w=torch.tensor([0.5, 2.0, 4.0]))                  # an LCM's guidance weights, per sample

    def cases():
        for n in (1, 2, 4, 8):
            z = torch.randn(3, 4, 8, 8, generator=g)
            yield (f, z, lcm_timesteps(n), process, draw_seed(g), cond), f"for {n} step{'s' * (n > 1)}"

    out = run_check("6.3", with_seed(student), with_seed(multistep), cases(), atol=1e-5, rtol=1e-4,
                    hint="At each timestep: z0 = f(z, t, cond).x0 with t = process.t_of_timestep(tau) as a (B,) "
                         "tensor and the cond given; if "
                         "it is the last one, return z0; otherwise re-noise to the NEXT timestep s: z = alpha(s) z0 + "
                         "sigma(s) eps with eps = torch.randn(z.shape, generator=generator, dtype=z.dtype) (no noise "
                         "after the last step, and the next time, not the current one).")
    return library_version(multistep) if is_library(out) else student
