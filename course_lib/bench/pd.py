"""`bench pd`: progressive distillation (Salimans & Ho 2022) of the shipped 2D and digits teachers."""
from __future__ import annotations

import torch

from ..config import pick
from . import register
from .core import (NFES, RoundClock, digits_fd, digits_floor_row, nfe, prior, reference_2d, row, sweep_2d, timed,
                   train_fields)


@register("pd", "progressive distillation of the 2D and digits teachers, a row per halving round")
def bench_pd(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Progressive distillation of the shipped 2D diffusion teachers, n_start DDIM steps -> 1, a row per round
    (model "pd", steps = nfe = the student's steps), beside the teacher's DDIM and DPM-Solver++ rows at every NFE.
    train_seconds / train_updates: the rounds that made that student (its own and every round before it)."""
    from ..config import default_device
    from ..data2d import sample_2d
    from ..distill.pd import progressive_distillation
    from ..grids import uniform
    from ..metrics import sliced_wasserstein
    from ..samplers import ddim
    from ..teachers import load_teacher
    from ..train import TrainConfig

    device = torch.device(device) if device is not None else default_device()
    n = pick(mode, smoke=500, laptop=10_000, full=50_000)
    n_start = pick(mode, smoke=4, laptop=64, full=256)
    cfg = TrainConfig(steps=pick(mode, smoke=20, laptop=400, full=6000), batch_size=pick(mode, smoke=128, laptop=1024,
                      full=2048), lr=pick(mode, smoke=1e-4, laptop=2e-4, full=1e-4), lr_schedule="linear", ema_decay=0.0,
                      seed=seed)
    swd = lambda a, b: sliced_wasserstein(a, b, n_proj=256, seed=0)
    nfes = [k for k in NFES if k <= n_start]
    rows: list[dict] = []
    for ds in ("checkerboard", "gmm"):
        ref, floor_row = reference_2d(ds, n, seed, swd, device)
        rows.append(floor_row)
        teacher = load_teacher(f"{ds}-vp", device=device)
        rows += sweep_2d(teacher, teacher.process, ds, "teacher", "dpmpp2m", ref, NFES, seed + 3, swd, device)
        rows += sweep_2d(teacher, teacher.process, ds, "teacher-ddim", "ddim", ref, nfes, seed + 3, swd, device)
        clock = RoundClock(cfg)         # the data is sampled on the CPU; training moves each batch to the students
        students = progressive_distillation(teacher, lambda b, g: sample_2d(ds, b, g)[0], n_start, 1, clock,
                                            progress=mode != "smoke")
        clock.stop()
        x1 = prior(teacher.process, (n, 2), seed + 3, device)
        for N, student in sorted(students.items(), reverse=True):
            x, sec = timed(lambda: ddim(student, x1, uniform(N), student.process), device)
            rows.append(row(ds, "pd", "swd", swd(x.cpu(), ref), sec, nfe=nfe("ddim", N), steps=N, device=device, n=n,
                            **train_fields(clock.seconds(N), clock.updates(N))))
    digit_rows, digit_meta = digits_pd_rows(mode, seed, device)
    return rows + digit_rows, {"n_samples_2d": n, "n_start": n_start, "steps_per_round": cfg.steps,
                               "batch": cfg.batch_size, **digit_meta}


def digits_pd_rows(mode: str, seed: int, device: str | torch.device) -> tuple[list[dict], dict]:
    """PD of the shipped digits teacher from its n_start-step DDIM sampler down to 1 step (labels balanced, no
    guidance), scored with the digits Fréchet distance; teacher rows: DPM-Solver++ at 64 NFE, DDIM at every
    student's step count and at n_start."""
    from ..classifier import DIGITS_FD_N, balanced_labels
    from ..distill.pd import progressive_distillation
    from ..grids import uniform
    from ..guidance import condition
    from ..images import batch_sampler, load_digits
    from ..samplers import ddim, dpm_solver_pp_2m
    from ..teachers import load_teacher
    from ..train import TrainConfig

    n = pick(mode, smoke=64, laptop=DIGITS_FD_N, full=DIGITS_FD_N)
    n_start = pick(mode, smoke=2, laptop=16, full=64)
    cfg = TrainConfig(steps=pick(mode, smoke=2, laptop=300, full=5000), batch_size=pick(mode, smoke=8, laptop=32,
                      full=128), lr=pick(mode, smoke=5e-5, laptop=1e-4, full=5e-5), lr_schedule="linear",
                      ema_decay=0.0, seed=seed)
    teacher = load_teacher("digits", device=device)
    y = balanced_labels(n).to(device)
    x1 = prior(teacher.process, (n, 1, 16, 16), seed + 6, device)
    rows = [digits_floor_row(device)]
    x, sec = timed(lambda: dpm_solver_pp_2m(condition(teacher, y), x1, uniform(64), teacher.process), device)
    rows.append(row("digits", "teacher", "digits_fd", digits_fd(x), sec, nfe=nfe("dpmpp2m", 64), steps=64,
                    device=device, sampler="dpmpp2m", n=n))
    for k in sorted({n_start, *[2**j for j in range(n_start.bit_length()) if 2**j < n_start]}):
        x, sec = timed(lambda: ddim(condition(teacher, y), x1, uniform(k), teacher.process), device)
        rows.append(row("digits", "teacher-ddim", "digits_fd", digits_fd(x), sec, nfe=nfe("ddim", k), steps=k,
                        device=device, sampler="ddim", n=n))
    x_train, y_train = load_digits(16, "train")       # CPU; training moves each batch to the students' device
    clock = RoundClock(cfg)
    students = progressive_distillation(teacher, batch_sampler(x_train, y_train), n_start, 1, clock,
                                        progress=mode != "smoke")
    clock.stop()
    for N, student in sorted(students.items(), reverse=True):
        x, sec = timed(lambda: ddim(condition(student, y), x1, uniform(N), teacher.process), device)
        rows.append(row("digits", "pd", "digits_fd", digits_fd(x), sec, nfe=nfe("ddim", N), steps=N, device=device,
                        sampler="ddim", n=n, **train_fields(clock.seconds(N), clock.updates(N))))
    return rows, {"digits_n_start": n_start, "digits_steps_per_round": cfg.steps, "digits_batch": cfg.batch_size}
