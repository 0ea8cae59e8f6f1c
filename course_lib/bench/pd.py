"""`bench pd`: progressive distillation (Salimans & Ho 2022) of the shipped 2D and digits teachers."""
from __future__ import annotations

import torch

from ..conditioning import labelled
from ..config import default_device, pick
from ..data2d import batches
from ..distill.pd import PDConfig, distill_pd
from ..grids import uniform
from ..images import batch_sampler, load_digits
from ..samplers import ddim, dpm_solver_pp_2m
from ..teachers import load_teacher
from ..train import TrainConfig
from . import register
from .core import (Evaluation, NFES, PR_N, RoundClock, digit_labels, digits_floor, digits_n, nfe, prior, score_2d,
                   score_digits, seed_inputs, sweep_2d, timed, train_fields)


@register("pd", "progressive distillation of the 2D and digits teachers, a row per halving round")
def bench_pd(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Progressive distillation of the shipped 2D diffusion teachers, n_start DDIM steps -> 1, a row per round
    (model "pd", steps = nfe = the student's steps), beside the teacher's DDIM and DPM-Solver++ rows at every NFE.
    Students are trained once; every row is evaluated over the evaluation seeds. On gmm, "flow_map_err_exact" is
    each student's (and teacher row's) distance to the exact mixture teacher's ODE solution (vp-cosine, same
    noise): how well PD kept the teacher's trajectory map.
    train_seconds / train_updates: the rounds that made that student (its own and every round before it)."""
    device = torch.device(device) if device is not None else default_device()
    n = pick(mode, smoke=250, laptop=5000, full=25_000)          # per evaluation seed
    n_start = pick(mode, smoke=4, laptop=64, full=256)
    cfg = TrainConfig(steps=pick(mode, smoke=20, laptop=400, full=6000), batch_size=pick(mode, smoke=128, laptop=1024,
                      full=2048), lr=pick(mode, smoke=1e-4, laptop=2e-4, full=1e-4), lr_schedule="linear", ema_decay=0.0,
                      seed=seed)
    nfes = [k for k in NFES if k <= n_start]
    ev = Evaluation(seed, device)
    for ds in ("checkerboard", "gmm"):
        teacher = load_teacher(f"{ds}-vp", device=device)
        clock = RoundClock(cfg)         # the data is sampled on the CPU; training moves each batch to the students
        students: dict = {}
        distill_pd(teacher, batches(ds), PDConfig(n_start, 1), run=clock,
                   progress=mode != "smoke", rounds=students)
        clock.stop()
        for s in ev.seeds:
            ref, x1, exact = seed_inputs(ev, ds, teacher.process, n, s, device)
            sweep_2d(ev, teacher, teacher.process, ds, "teacher", "dpmpp2m", ref, NFES, s + 3, device, exact)
            sweep_2d(ev, teacher, teacher.process, ds, "teacher-ddim", "ddim", ref, nfes, s + 3, device, exact)
            for N, student in sorted(students.items(), reverse=True):
                x, sec = timed(lambda: ddim(student, x1, uniform(N), student.process), device)
                score_2d(ev, ds, "pd", x, ref, sec, nfe=nfe("ddim", N), steps=N, exact=exact,
                         compare=N <= 4 or N == max(students), n=n, **train_fields(clock.seconds(N), clock.updates(N)))
    digits_meta = digits_pd_rows(ev, mode, seed, device)
    return ev.rows(), {"n_samples_2d": n, "n_start": n_start, "steps_per_round": cfg.steps, "batch": cfg.batch_size,
                       "eval_seeds": ev.seeds, "pr_n": PR_N, **digits_meta}


def digits_pd_rows(ev: Evaluation, mode: str, seed: int, device: str | torch.device, references: bool = True) -> dict:
    """PD of the shipped digits teacher from its n_start-step DDIM sampler down to 1 step (labels balanced, no
    guidance), scored with classifier.digits_scores (kid_heldout, kid_train, fd_heldout); teacher rows:
    DPM-Solver++ at 64 NFE, DDIM at every student's step count and at n_start. Students of 1-4 steps are scored on
    thousands of samples per seed, the many-step rows on a few hundred (the first of the same noise).
    references=False: the students' rows only, without the teacher's and the data floor's."""
    n_start = pick(mode, smoke=2, laptop=16, full=64)
    cfg = TrainConfig(steps=pick(mode, smoke=2, laptop=300, full=5000), batch_size=pick(mode, smoke=8, laptop=32,
                      full=128), lr=pick(mode, smoke=5e-5, laptop=1e-4, full=5e-5), lr_schedule="linear",
                      ema_decay=0.0, seed=seed)
    teacher = load_teacher("digits", device=device)
    x_train, y_train = load_digits(16, "train")       # CPU; training moves each batch to the students' device
    clock = RoundClock(cfg)
    students: dict = {}
    distill_pd(teacher, labelled(batch_sampler(x_train, y_train), 10), PDConfig(n_start, 1), run=clock,
               progress=mode != "smoke", rounds=students)
    clock.stop()
    big, small = digits_n(mode, cheap=True), digits_n(mode, cheap=False)
    for s in ev.seeds:
        x1 = prior(teacher.process, (max(big, small), 1, 16, 16), s + 6, device)
        run = lambda m, k, sampler, steps: timed(lambda: sampler(m, x1[:k], uniform(steps), teacher.process,
                                                                 cond=digit_labels(k, device)),
                                                 device)
        if references:
            digits_floor(ev, s)
            x, sec = run(teacher, small, dpm_solver_pp_2m, 64)
            score_digits(ev, "teacher", x, sec, nfe=nfe("dpmpp2m", 64), steps=64, sampler="dpmpp2m")
            for steps in sorted({n_start, *[2**j for j in range(n_start.bit_length()) if 2**j < n_start]}):
                x, sec = run(teacher, small, ddim, steps)
                score_digits(ev, "teacher-ddim", x, sec, nfe=nfe("ddim", steps), steps=steps, sampler="ddim")
        for steps, student in sorted(students.items(), reverse=True):
            x, sec = run(student, big if steps <= 4 else small, ddim, steps)
            score_digits(ev, "pd", x, sec, nfe=nfe("ddim", steps), steps=steps, sampler="ddim",
                         **train_fields(clock.seconds(steps), clock.updates(steps)))
    return {"digits_n_start": n_start, "digits_steps_per_round": cfg.steps, "digits_batch": cfg.batch_size,
            "digits_n_students_1_4_steps": big, "digits_n_other": small}
