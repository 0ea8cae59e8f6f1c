"""`bench cd` and `bench ct`: consistency distillation and consistency training (Song et al. 2023; iCT, Song &
Dhariwal 2024) on the shipped 2D and digits teachers, students sampled at 1, 2 and 4 steps (multistep consistency
sampling, evenly spaced step times moved to the nearest points of the student's training grid: a short run learns f
at those points only)."""
from __future__ import annotations

import time

import torch

from ..conditioning import labelled
from ..config import default_device, pick, seeded
from ..data2d import batches
from ..distill.consistency import (CMConfig, cm_grid, ct_schedule, distill_cd, distill_ct, multistep_sample, on_grid,
                                   step_times)
from ..distill.pd import PDConfig, distill_pd
from ..grids import uniform
from ..images import batch_sampler, load_digits
from ..plotting import table
from ..recipes.consistency import cm_budget
from ..samplers import ddim
from ..teachers import get_recipe, load_teacher
from ..train import TrainConfig
from . import register
from .core import (Evaluation, PR_N, digit_labels, digits_floor, digits_n, digits_teacher, lines_over_best, nfe, prior,
                   score_2d, score_digits, seed_inputs, side_by_side, sweep_2d, timed, train_fields)

STUDENT_STEPS = (1, 2, 4)
# CT's 2D recipe: iCT's pieces (pseudo-Huber, lambda = 1 / (s_{n+1} - s_n), lognormal n) on the paper's Karras grid in
# s = sigma / alpha up to s_max = 80, where sampling starts (cm_grid); on the course's uniform-in-t grid iCT's lambda
# leaves the top interval ~1e-5 of the median weight. p_mean: iCT's -1.1 shifted by ln(1.43 / 0.5) ~ 1 for gmm's
# per-axis data std 1.43 against the paper's 0.5. One step on gmm over 3 training seeds: 2.97 +- 0.22x the teacher's
# best SWD, against 9.3 +- 8.7x (3.4, 19, 5.1) for squared L2 on the uniform grid; checkerboard 9.5 +- 1.4x against
# 18.9 +- 7.3x (docs/results/ct_2d_diagnosis.json)
CT_2D = dict(grid="karras", s_max=80.0, distance="pseudo-huber", weighting="ict", index="lognormal", p_mean=0.0)
TEACHER_NFES = (1, 2, 4, 8, 16, 32, 64)


def _cd_cfg(b: dict, digits: bool = False):
    return CMConfig(N=b["N"], solver="heun", mu=b["mu"], lr=b["digits_lr"] if digits else b["lr"],
                    ema_decay=b["digits_ema"] if digits else b["ema"],
                    distance="pseudo-huber" if digits else "l2")


def _ct_cfg(b: dict, steps: int, digits: bool = False, long: bool = False):
    if long:  # iCT's recipe on a longer run (2D), on the course's uniform-in-t grid
        return CMConfig(schedule=ct_schedule("doubling", steps, s0=b["ct_s0"], s1=b["ct_long_s1"]),
                        distance="pseudo-huber", weighting="ict", index="lognormal", lr=b["lr"], ema_decay=b["ema"])
    if not digits:  # 2D: iCT's pieces on its own grid (CT_2D)
        return CMConfig(schedule=ct_schedule("doubling", steps, s0=b["ct_s0"], s1=b["ct_s1"]), lr=b["lr"],
                        ema_decay=b["ema"], **CT_2D)
    return CMConfig(schedule=ct_schedule("doubling", steps, s0=b["ct_s0"], s1=b["ct_s1"]), distance="pseudo-huber",
                    lr=b["digits_lr"], ema_decay=b["digits_ema"])


def student_grid(method: str, b: dict, process, t_min: float, digits: bool = False):
    """A student's (final) training grid (cm_grid): CD's N points; CT's s1 + 1 (ct-long's ct_long_s1 + 1), on
    CT_2D's Karras grid for "ct" in 2D."""
    if method == "cd":
        return cm_grid(b["N"], process, t_min)
    if method == "ct" and not digits:
        return cm_grid(b["ct_s1"] + 1, process, t_min, spacing=CT_2D["grid"], s_max=CT_2D["s_max"])
    return cm_grid((b["ct_long_s1"] if method == "ct-long" else b["ct_s1"]) + 1, process, t_min)


def _train_2d(method: str, ds: str, b: dict, seed: int, device, progress: bool):
    """(student, seconds): CD from the shipped {ds}-vp teacher, or CT ("ct", "ct-long") of a fresh network of its
    architecture."""
    steps = b["steps"] * (b["ct_long_x"] if method == "ct-long" else 1)
    cfg = TrainConfig(steps=steps, batch_size=b["batch"], seed=seed, desc=f"{method.upper()} {ds}")
    data = batches(ds)
    t0 = time.perf_counter()
    if method == "cd":
        student, _ = distill_cd(load_teacher(f"{ds}-vp", device=device), data, _cd_cfg(b), run=cfg, progress=progress)
    else:
        with seeded(seed):
            fresh = get_recipe(f"{ds}-vp").build().to(device)
        student, _ = distill_ct(fresh, data, _ct_cfg(b, steps, long=method == "ct-long"), run=cfg, progress=progress)
    return student, time.perf_counter() - t0


def _sample_cm(model, x1, steps: int, seed: int, process, t_min: float, cond=None, grid=None):
    """Multistep consistency sampling from x1 at evenly spaced step times, moved to the nearest points of the
    student's (final) training grid when given (`on_grid`; a grid ending below t = 1 starts at its top), fresh
    noise from `seed` (CPU)."""
    ts = step_times(steps) if grid is None else on_grid(step_times(steps), grid)
    return multistep_sample(model, x1, ts, process, t_min, generator=torch.Generator().manual_seed(seed), cond=cond)


def _bench(method: str, mode: str, seed: int, device) -> tuple[list[dict], dict]:
    device = torch.device(device) if device is not None else default_device()
    b = cm_budget(mode)
    n = pick(mode, smoke=250, laptop=5000, full=25_000)
    ev = Evaluation(seed, device)
    pd_meta = {}
    for ds in ("checkerboard", "gmm"):
        teacher = load_teacher(f"{ds}-vp", device=device)
        students = {method: _train_2d(method, ds, b, seed, device, mode != "smoke")}
        if method == "ct":
            students["ct-long"] = _train_2d("ct-long", ds, b, seed, device, mode != "smoke")
        pd_student = pd_secs = None
        if method == "cd" and ds == "gmm":
            pd_student, pd_secs, pd_meta = _pd_same_teacher_evals(teacher, ds, b, seed, device, mode)
        for s in ev.seeds:
            ref, x1, exact = seed_inputs(ev, ds, teacher.process, n, s, device)
            sweep_2d(ev, teacher, teacher.process, ds, "teacher", "dpmpp2m", ref, pick(mode, smoke=(1, 2, 4),
                     laptop=TEACHER_NFES, full=TEACHER_NFES), s + 3, device, exact)
            for name, (student, secs) in students.items():
                updates = b["steps"] * (b["ct_long_x"] if name == "ct-long" else 1)
                for k in STUDENT_STEPS:
                    x, sec = timed(lambda: _sample_cm(student, x1, k, s + 4, student.process, student.t_min,
                                                      grid=student_grid(name, b, student.process, student.t_min)),
                                   device)
                    score_2d(ev, ds, name, x, ref, sec, nfe=k, steps=k, compare=True, exact=exact,
                             sampler="consistency", n=n, **train_fields(secs, updates))
            if pd_student is not None:
                x, sec = timed(lambda: ddim(pd_student, x1, uniform(1), pd_student.process), device)
                score_2d(ev, ds, "pd", x, ref, sec, nfe=nfe("ddim", 1), steps=1, compare=True, exact=exact,
                         sampler="ddim", n=n, **train_fields(pd_secs, pd_meta["pd_updates"]))
    digits_rows(method, ev, mode, b, seed, device)
    rows = ev.rows()
    print(cm_summary(rows, method))
    return rows, {**b, "n": n, "eval_seeds": ev.seeds, "pr_n": PR_N, "student_steps": list(STUDENT_STEPS),
                  "step_times": "evenly spaced: 1, (k-1)/k, ..., 1/k, moved to the student's nearest training grid points",
                  **pd_meta}


def _pd_same_teacher_evals(teacher, ds: str, b: dict, seed: int, device, mode: str):
    """A one-step progressive-distillation student of the same teacher that used as many teacher evaluations as CD:
    CD's Heun step costs 2 per sample and update, PD's two DDIM steps 2, so PD gets CD's updates (same batch),
    split over its rounds 64 -> 32 -> ... -> 1 (fewer rounds if that leaves under 10 updates a round)."""
    n_start = 64
    while n_start > 2 and b["steps"] // n_start.bit_length() < 10:
        n_start //= 2
    rounds = n_start.bit_length() - 1
    per_round = b["steps"] // rounds
    cfg = TrainConfig(steps=per_round, batch_size=b["batch"], lr=pick(mode, smoke=1e-4, laptop=2e-4, full=1e-4),
                      lr_schedule="linear", ema_decay=0.0, seed=seed)
    t0 = time.perf_counter()
    student, _ = distill_pd(teacher, batches(ds), PDConfig(n_start, 1), run=cfg,
                            progress=mode != "smoke")
    return student, time.perf_counter() - t0, {"pd_n_start": n_start, "pd_rounds": rounds,
                                                    "pd_updates": per_round * rounds,
                                                    "teacher_evals_per_sample_update": 2}


def digits_rows(method: str, ev: Evaluation, mode: str, b: dict, seed: int, device, references: bool = True) -> None:
    """Digits: CD of the shipped digits teacher (or CT of a fresh UNet of its architecture), pseudo-Huber, balanced
    labels; students at 1, 2, 4 steps on thousands of samples per seed, the teacher (DPM-Solver++, 32 steps) on a
    few hundred, beside the data floor; kid_heldout, kid_train, fd_heldout (classifier.digits_scores).
    references=False: the students' rows only (a benchmark that shows them beside its own teacher)."""
    teacher = load_teacher("digits", device=device)
    x_train, y_train = load_digits(16, "train")
    data = labelled(batch_sampler(x_train, y_train), teacher.net.num_classes)
    cfg = TrainConfig(steps=b["digits_steps"], batch_size=b["digits_batch"], seed=seed, desc=f"{method.upper()} digits")
    t0 = time.perf_counter()
    if method == "cd":
        student, _ = distill_cd(teacher, data, _cd_cfg(b, digits=True), run=cfg, progress=mode != "smoke")
    else:
        with seeded(seed):
            fresh = get_recipe("digits").build().to(device)
        student, _ = distill_ct(fresh, data, _ct_cfg(b, b["digits_steps"], digits=True), run=cfg,
                                progress=mode != "smoke")
    secs = time.perf_counter() - t0
    big, small = digits_n(mode, cheap=True), digits_n(mode, cheap=False)
    for s in ev.seeds:
        if references:
            digits_floor(ev, s)
            digits_teacher(ev, teacher, s, small, 32, device)
        x1 = prior(teacher.process, (big, 1, 16, 16), s + 6, device)
        for k in STUDENT_STEPS:
            x, sec = timed(lambda: _sample_cm(student, x1, k, s + 7, student.process, student.t_min,
                                              digit_labels(big, device),
                                              student_grid(method, b, student.process, student.t_min, digits=True)),
                           device)
            score_digits(ev, method, x, sec, nfe=k, steps=k, sampler="consistency",
                         **train_fields(secs, b["digits_steps"]))


def cm_summary(rows: list[dict], method: str) -> str:
    """Per dataset: the student (and, for CD on gmm, the same-cost PD student) at each step count, metrics side by
    side (mean ± std over seeds), with its SWD over the teacher's best (the teacher row of lowest mean SWD), per seed."""
    out = lines_over_best(rows, ("checkerboard", "gmm"),
                          lambda r, _: r["model"] in (method, f"{method}-long", "pd", "data"))
    digits = side_by_side([r for r in rows if r["dataset"] == "digits"], ("dataset", "model", "nfe"))
    return (table(out, ["dataset", "model", "nfe", "swd", "swd / teacher best", "in_squares", "precision", "recall",
                        "flow_map_err_exact"])
            + "\n\n" + table(digits, ["dataset", "model", "nfe", "kid_heldout", "kid_train", "fd_heldout"]))


@register("cd", "consistency distillation of the 2D and digits teachers, 1/2/4-step students; 1-step PD at equal cost")
def bench_cd(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Consistency distillation (Song et al. 2023) of the shipped 2D diffusion teachers (Heun teacher step, target
    EMA mu (cm_budget: 0.9 on the laptop budget, the paper's ImageNet64 0.95 in full), squared L2) and of the digits teacher (pseudo-Huber), students (model "cd") sampled with multistep consistency
    sampling at 1, 2, 4 steps (nfe = steps), beside the teacher's DPM-Solver++ sweep ("teacher") and the data floor
    ("data"). Every score_2d metric; on gmm "flow_map_err_exact" (distance to the exact mixture teacher's ODE
    solution from the same noise) also for a one-step progressive-distillation student ("pd") trained with as many
    teacher evaluations as CD. Digits: kid_heldout, kid_train, fd_heldout. Models are trained once; every row is
    evaluated over the evaluation seeds."""
    return _bench("cd", mode, seed, device)


@register("ct", "consistency training (no teacher) on 2D and digits, iCT's doubling schedule, 1/2/4-step students")
def bench_ct(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Consistency training (Song et al. 2023; iCT's doubling N(k) scaled to the budget, mu = 0) of a fresh network
    of the shipped teacher's architecture on CD's budget (same updates and batch), students (model "ct") at 1, 2, 4
    steps, beside the 2D teacher's DPM-Solver++ sweep (its best SWD is the target) and the data floor. In 2D iCT's
    pieces on its Karras grid in s up to 80 (CT_2D); digits with pseudo-Huber on the uniform grid, as in bench cd.
    In 2D also "ct-long": iCT's pieces on the course's uniform-in-t grid on ct_long_x times the updates. The teacher
    is never used in training."""
    return _bench("ct", mode, seed, device)
