"""`bench teacher`: the shipped teachers sampled with every training-free solver."""
from __future__ import annotations

import torch

from ..config import pick
from . import register
from .core import NFES, digits_fd, digits_floor_row, nfe, reference_2d, row, sweep_2d, timed


@register("teacher", "the shipped teachers (2D and digits) with every training-free solver, NFE 1 to 128")
def bench_teacher(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Shipped teachers (diffusion: vp-cosine + v-prediction; flow matching: rf + velocity) and, for the
    Gaussian mixture, the exact denoiser, sampled with each training-free solver at NFE 1..128."""
    from ..config import default_device
    from ..data2d import exact_denoiser
    from ..metrics import sliced_wasserstein
    from ..processes import VPCosine
    from ..teachers import load_teacher

    device = torch.device(device) if device is not None else default_device()
    n = pick(mode, smoke=500, laptop=10_000, full=50_000)
    nfes = pick(mode, smoke=(1, 2, 4), laptop=NFES, full=NFES + (256,))
    swd = lambda a, b: sliced_wasserstein(a, b, n_proj=256, seed=0)
    rows: list[dict] = []
    for ds in ("checkerboard", "gmm"):
        ref, floor_row = reference_2d(ds, n, seed, swd, device)
        rows.append(floor_row)
        vp = load_teacher(f"{ds}-vp", device=device)
        for sampler, name in (("dpmpp2m", "teacher"), ("ddim", "teacher-ddim"), ("heun", "teacher-heun"),
                              ("euler", "teacher-euler")):
            rows += sweep_2d(vp, vp.process, ds, name, sampler, ref, nfes, seed + 3, swd, device)
        fm = load_teacher(f"{ds}-rf", device=device)
        for sampler in ("euler", "heun"):
            rows += sweep_2d(fm, fm.process, ds, f"fm-teacher-{sampler}", sampler, ref, nfes, seed + 3, swd, device)
        if ds == "gmm":
            proc = VPCosine()
            exact = exact_denoiser("gmm", proc)
            for sampler in ("dpmpp2m", "ddim", "heun"):   # the exact denoiser is a function of x: it runs on the CPU
                rows += sweep_2d(exact, proc, ds, f"exact-{sampler}", sampler, ref, nfes, seed + 3, swd, "cpu")
    rows += digits_teacher_rows(mode, seed, device)
    return rows, {"n_samples_2d": n, "swd_projections": 256}


def digits_teacher_rows(mode: str, seed: int, device: str | torch.device) -> list[dict]:
    """The digits teacher (class-conditional, balanced labels, no guidance) at NFE 1..32, scored with the
    digits Fréchet distance: DIGITS_FD_N samples against the reference half of the real digits."""
    from ..classifier import DIGITS_FD_N, balanced_labels
    from ..samplers import generate
    from ..teachers import load_teacher

    n = pick(mode, smoke=64, laptop=DIGITS_FD_N, full=DIGITS_FD_N)
    nfes = pick(mode, smoke=(1, 2), laptop=(1, 2, 4, 8, 16, 32), full=(1, 2, 4, 8, 16, 32, 64, 128))
    teacher = load_teacher("digits", device=device)
    rows = [digits_floor_row(device)]
    y = balanced_labels(n).to(device)
    for sampler, name in (("dpmpp2m", "teacher"), ("ddim", "teacher-ddim")):
        for steps in nfes:
            x, sec = timed(lambda: generate(teacher, teacher.process, (n, 1, 16, 16), sampler, steps, device=device,
                                            generator=torch.Generator().manual_seed(seed + 6), y=y), device)
            rows.append(row("digits", name, "digits_fd", digits_fd(x), sec, nfe=nfe(sampler, steps), steps=steps,
                            device=device, sampler=sampler, n=n))
    return rows
