"""`bench teacher`: the shipped teachers sampled with every training-free solver."""
from __future__ import annotations

import torch

from ..config import default_device, pick
from ..data2d import exact_denoiser
from ..processes import VPCosine
from ..samplers import generate
from ..teachers import load_teacher
from . import register
from .core import (NFES, PR_N, Evaluation, digit_labels, digits_floor, digits_n, exact_map, nfe, prior, reference_2d,
                   score_digits, sweep_2d, timed)


@register("teacher", "the shipped teachers (2D and digits) with every training-free solver, NFE 1 to 128")
def bench_teacher(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Shipped teachers (diffusion: vp-cosine + v-prediction; flow matching: rf + velocity) and, for the
    Gaussian mixture, the exact denoiser, sampled with each training-free solver at NFE 1..128, every row over
    the evaluation seeds. On gmm, every sweep row also gives "flow_map_err_exact": the distance to the exact
    teacher's ODE solution (same process, same noise), i.e. the model's and the solver's error together."""
    device = torch.device(device) if device is not None else default_device()
    n = pick(mode, smoke=250, laptop=5000, full=25_000)          # per evaluation seed
    nfes = pick(mode, smoke=(1, 2, 4), laptop=NFES, full=NFES + (256,))
    ev = Evaluation(seed, device)
    for ds in ("checkerboard", "gmm"):
        vp, fm = load_teacher(f"{ds}-vp", device=device), load_teacher(f"{ds}-rf", device=device)
        for s in ev.seeds:
            ref = reference_2d(ev, ds, n, s)
            ex = {p.name: exact_map(ds, p, prior(p, (n, 2), s + 3, "cpu")[:PR_N]) if ds == "gmm" else None
                  for p in (vp.process, fm.process)}
            for sampler, name in (("dpmpp2m", "teacher"), ("ddim", "teacher-ddim"), ("heun", "teacher-heun"),
                                  ("euler", "teacher-euler")):
                sweep_2d(ev, vp, vp.process, ds, name, sampler, ref, nfes, s + 3, device, exact=ex[vp.process.name])
            for sampler in ("euler", "heun"):
                sweep_2d(ev, fm, fm.process, ds, f"fm-teacher-{sampler}", sampler, ref, nfes, s + 3, device,
                         exact=ex[fm.process.name])
            if ds == "gmm":
                proc = VPCosine()
                exact = exact_denoiser("gmm", proc)
                for sampler in ("dpmpp2m", "ddim", "heun"):   # the exact denoiser is a function of x: it runs on the CPU
                    sweep_2d(ev, exact, proc, ds, f"exact-{sampler}", sampler, ref, nfes, s + 3, "cpu",
                             exact=ex[proc.name])
    digits_teacher_rows(ev, mode, device)
    return ev.rows(), {"n_samples_2d": n, "swd_projections": 256, "eval_seeds": ev.seeds, "pr_n": PR_N}


def digits_teacher_rows(ev: Evaluation, mode: str, device: str | torch.device) -> None:
    """The digits teacher (class-conditional, balanced labels, no guidance) at NFE 1..32 with DPM-Solver++ and
    DDIM, scored with classifier.digits_scores (KID against the held-out and the training digits, FD against the
    held-out digits), beside the data floor (training digits against the held-out digits)."""
    n = digits_n(mode, cheap=False)
    nfes = pick(mode, smoke=(1, 2), laptop=(1, 2, 4, 8, 16, 32), full=(1, 2, 4, 8, 16, 32, 64, 128))
    teacher = load_teacher("digits", device=device)
    y = digit_labels(n, device, teacher.net.num_classes)
    for s in ev.seeds:
        digits_floor(ev, s)
        for sampler, name in (("dpmpp2m", "teacher"), ("ddim", "teacher-ddim")):
            for steps in nfes:
                x, sec = timed(lambda: generate(teacher, teacher.process, (n, 1, 16, 16), sampler, steps,
                                                device=device, generator=torch.Generator().manual_seed(s + 6), cond=y),
                               device)
                score_digits(ev, name, x, sec, nfe=nfe(sampler, steps), steps=steps, sampler=sampler)
