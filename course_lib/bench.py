"""Benchmarks: quality and speed measured the same way for every method, printed as a table and saved as JSON.

    python -m course_lib.bench teacher --mode laptop --out runs/bench_teacher.json

Output format (shared by every method's benchmark):
    {"name": ..., "mode": ..., "meta": {...},
     "rows": [{"dataset", "model", "nfe", "metric", "value", "seconds", ...extra fields}, ...]}
`seconds` is the wall time of producing that row's samples (not the metric). Model "data" rows give the
metric between two independent data batches of the same size: for the 2D data (exact samplers, SWD) the metric's
own sampling noise at that n. A model near it is as good as the metric can tell; a model slightly smoother than
the data can even score below it (the checkerboard teachers do, 0.7-0.8x: SWD's sampling noise is largest where
the projected density has gaps, and a model that blurs the squares' edges fills them). For digits it is real-vs-real, two halves of the 1797 digits, and not a floor: the digits
teacher partly memorises its 1500 training digits and scores below it; compare digits models with each other.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from .config import MODES, course_mode, pick
from .plotting import table

BENCHMARKS: dict[str, Callable[[str, int], tuple[list[dict], dict]]] = {}
NFES = (1, 2, 4, 8, 16, 32, 64, 128)


def register(name: str):
    def wrap(fn):
        BENCHMARKS[name] = fn
        return fn
    return wrap


def row(dataset: str, model: str, nfe: int | None, metric: str, value: float, seconds: float, **extra) -> dict:
    return {"dataset": dataset, "model": model, "nfe": nfe, "metric": metric, "value": float(value),
            "seconds": round(float(seconds), 4), **extra}


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def digits_floor_row() -> dict:
    """The digits "data" row: the held-out real half (898 digits) against the reference half, digits FD."""
    from .classifier import digits_fd_floor, digits_halves

    return row("digits", "data", None, "digits_fd", digits_fd_floor(), 0.0, n=len(digits_halves()[0]))


def sweep_2d(model, process, dataset: str, model_name: str, sampler: str, ref: torch.Tensor, nfes, seed: int,
             metric: Callable[[torch.Tensor, torch.Tensor], float]) -> list[dict]:
    """Sample `model` at every NFE budget (same noise for all) and score each against `ref` (N, 2)."""
    from .samplers import generate, nfe as count, steps_for_nfe

    rows, seen = [], set()
    for budget in nfes:
        steps = steps_for_nfe(sampler, budget)
        used = count(sampler, steps)
        if used in seen:
            continue
        seen.add(used)
        x, sec = timed(lambda: generate(model, process, tuple(ref.shape), sampler, steps,
                                        generator=torch.Generator().manual_seed(seed)))
        rows.append(row(dataset, model_name, used, "swd", metric(x, ref), sec, sampler=sampler, n=len(ref)))
    return rows


def reference_2d(dataset: str, n: int, seed: int, metric: Callable[[torch.Tensor, torch.Tensor], float]
                 ) -> tuple[torch.Tensor, dict]:
    """n reference samples of a 2D dataset, and the "data" row: the metric against n independent ones."""
    from .data2d import sample_2d

    ref, _ = sample_2d(dataset, n, torch.Generator().manual_seed(seed + 1))
    other, sec = timed(lambda: sample_2d(dataset, n, torch.Generator().manual_seed(seed + 2))[0])
    return ref, row(dataset, "data", None, "swd", metric(other, ref), sec, n=n)


def conditional_reference(dataset: str, n: int, seed: int):
    """For a class-conditional 2D mixture: balanced labels y (n,), the SWD against exact samples of those classes,
    the Bayes class accuracy, and the two "data" rows (an independent exact batch scored by both).
    Returns (mixture, y, swd(x) -> float, acc(x) -> float, rows)."""
    from .data2d import get_mixture, sample_conditional
    from .metrics import gmm_class_accuracy, sliced_wasserstein

    mix = get_mixture(dataset)
    y = torch.arange(n) % mix.num_classes                                       # balanced labels
    ref = sample_conditional(mix, y, torch.Generator().manual_seed(seed + 1))
    swd = lambda a: sliced_wasserstein(a, ref, n_proj=256, seed=0)
    acc = lambda a: gmm_class_accuracy(a, y, mix)
    other, sec = timed(lambda: sample_conditional(mix, y, torch.Generator().manual_seed(seed + 2)))
    rows = [row(dataset, "data", None, "swd", swd(other), sec, n=n),
            row(dataset, "data", None, "class_acc", acc(other), sec, n=n)]
    return mix, y, swd, acc, rows


@register("teacher")
def bench_teacher(mode: str, seed: int = 0) -> tuple[list[dict], dict]:
    """Shipped teachers (diffusion: vp-cosine + v-prediction; flow matching: rf + velocity) and, for the
    Gaussian mixture, the exact denoiser, sampled with each training-free solver at NFE 1..128."""
    from .data2d import exact_denoiser
    from .metrics import sliced_wasserstein
    from .processes import VPCosine
    from .teachers import load_teacher

    n = pick(mode, smoke=500, laptop=10_000, full=50_000)
    nfes = pick(mode, smoke=(1, 2, 4), laptop=NFES, full=NFES + (256,))
    swd = lambda a, b: sliced_wasserstein(a, b, n_proj=256, seed=0)
    rows: list[dict] = []
    for ds in ("checkerboard", "gmm"):
        ref, floor_row = reference_2d(ds, n, seed, swd)
        rows.append(floor_row)
        vp = load_teacher(f"{ds}-vp")
        for sampler, name in (("dpmpp2m", "teacher"), ("ddim", "teacher-ddim"), ("heun", "teacher-heun"),
                              ("euler", "teacher-euler")):
            rows += sweep_2d(vp, vp.process, ds, name, sampler, ref, nfes, seed + 3, swd)
        fm = load_teacher(f"{ds}-rf")
        for sampler in ("euler", "heun"):
            rows += sweep_2d(fm, fm.process, ds, f"fm-teacher-{sampler}", sampler, ref, nfes, seed + 3, swd)
        if ds == "gmm":
            proc = VPCosine()
            exact = exact_denoiser("gmm", proc)
            for sampler in ("dpmpp2m", "ddim", "heun"):
                rows += sweep_2d(exact, proc, ds, f"exact-{sampler}", sampler, ref, nfes, seed + 3, swd)
    rows += _digits_rows(mode, seed)
    return rows, {"n_samples_2d": n, "swd_projections": 256}


@register("pd")
def bench_pd(mode: str, seed: int = 0) -> tuple[list[dict], dict]:
    """Progressive distillation of the shipped 2D diffusion teachers, n_start DDIM steps -> 1, a row per round
    (model "pd", nfe = the student's steps), beside the teacher's DDIM and DPM-Solver++ rows at every NFE."""
    from .data2d import sample_2d
    from .distill.pd import progressive_distillation
    from .metrics import sliced_wasserstein
    from .teachers import load_teacher
    from .train import TrainConfig
    from .grids import uniform
    from .samplers import ddim

    n = pick(mode, smoke=500, laptop=10_000, full=50_000)
    n_start = pick(mode, smoke=4, laptop=64, full=256)
    cfg = TrainConfig(steps=pick(mode, smoke=20, laptop=400, full=6000), batch_size=pick(mode, smoke=128, laptop=1024,
                      full=2048), lr=pick(mode, smoke=1e-4, laptop=2e-4, full=1e-4), lr_schedule="linear", ema_decay=0.0,
                      seed=seed)
    swd = lambda a, b: sliced_wasserstein(a, b, n_proj=256, seed=0)
    nfes = [k for k in NFES if k <= n_start]
    rows: list[dict] = []
    for ds in ("checkerboard", "gmm"):
        ref, floor_row = reference_2d(ds, n, seed, swd)
        rows.append(floor_row)
        teacher = load_teacher(f"{ds}-vp")
        rows += sweep_2d(teacher, teacher.process, ds, "teacher", "dpmpp2m", ref, NFES, seed + 3, swd)
        rows += sweep_2d(teacher, teacher.process, ds, "teacher-ddim", "ddim", ref, nfes, seed + 3, swd)
        t0 = time.perf_counter()
        students = progressive_distillation(teacher, lambda b, g: sample_2d(ds, b, g)[0], n_start, 1, cfg,
                                            progress=mode != "smoke")
        train_sec = time.perf_counter() - t0
        x1 = teacher.process.prior((n, 2), torch.Generator().manual_seed(seed + 3))
        for N, student in sorted(students.items(), reverse=True):
            x, sec = timed(lambda: ddim(student, x1, uniform(N), student.process))
            rows.append(row(ds, "pd", N, "swd", swd(x, ref), sec, n=n, train_seconds=round(train_sec, 1)))
    digit_rows, digit_meta = _digits_pd_rows(mode, seed)
    return rows + digit_rows, {"n_samples_2d": n, "n_start": n_start, "steps_per_round": cfg.steps,
                               "batch": cfg.batch_size, **digit_meta}


def _digits_pd_rows(mode: str, seed: int) -> tuple[list[dict], dict]:
    """PD of the shipped digits teacher from its n_start-step DDIM sampler down to 1 step (labels balanced, no
    guidance), scored with the digits Fréchet distance; teacher rows: DPM-Solver++ at 64 NFE, DDIM at every
    student's step count and at n_start."""
    from .classifier import DIGITS_FD_N, balanced_labels, digits_frechet_distance
    from .distill.pd import progressive_distillation
    from .grids import uniform
    from .guidance import condition
    from .images import batch_sampler, load_digits
    from .samplers import ddim, dpm_solver_pp_2m
    from .teachers import load_teacher
    from .train import TrainConfig

    n = pick(mode, smoke=64, laptop=DIGITS_FD_N, full=DIGITS_FD_N)
    n_start = pick(mode, smoke=2, laptop=16, full=64)
    cfg = TrainConfig(steps=pick(mode, smoke=2, laptop=300, full=5000), batch_size=pick(mode, smoke=8, laptop=32,
                      full=128), lr=pick(mode, smoke=5e-5, laptop=1e-4, full=5e-5), lr_schedule="linear",
                      ema_decay=0.0, seed=seed)
    teacher = load_teacher("digits")
    y = balanced_labels(n)
    x1 = teacher.process.prior((n, 1, 16, 16), torch.Generator().manual_seed(seed + 6))
    fd = digits_frechet_distance
    rows = [digits_floor_row()]
    x, sec = timed(lambda: dpm_solver_pp_2m(condition(teacher, y), x1, uniform(64), teacher.process))
    rows.append(row("digits", "teacher", 64, "digits_fd", fd(x), sec, sampler="dpmpp2m", n=n))
    for k in sorted({n_start, *[2**j for j in range(n_start.bit_length()) if 2**j < n_start]}):
        x, sec = timed(lambda: ddim(condition(teacher, y), x1, uniform(k), teacher.process))
        rows.append(row("digits", "teacher-ddim", k, "digits_fd", fd(x), sec, sampler="ddim", n=n))
    x_train, y_train = load_digits(16, "train")
    t0 = time.perf_counter()
    students = progressive_distillation(teacher, batch_sampler(x_train, y_train), n_start, 1, cfg,
                                        progress=mode != "smoke")
    train_sec = time.perf_counter() - t0
    for N, student in sorted(students.items(), reverse=True):
        x, sec = timed(lambda: ddim(condition(student, y), x1, uniform(N), teacher.process))
        rows.append(row("digits", "pd", N, "digits_fd", fd(x), sec, sampler="ddim", n=n,
                        train_seconds=round(train_sec, 1)))
    return rows, {"digits_n_start": n_start, "digits_steps_per_round": cfg.steps, "digits_batch": cfg.batch_size}


def _digits_rows(mode: str, seed: int) -> list[dict]:
    """The digits teacher (class-conditional, balanced labels, no guidance) at NFE 1..32, scored with the
    digits Fréchet distance: DIGITS_FD_N samples against the reference half of the real digits."""
    from .classifier import DIGITS_FD_N, balanced_labels, digits_frechet_distance
    from .samplers import generate
    from .teachers import load_teacher

    n = pick(mode, smoke=64, laptop=DIGITS_FD_N, full=DIGITS_FD_N)
    nfes = pick(mode, smoke=(1, 2), laptop=(1, 2, 4, 8, 16, 32), full=(1, 2, 4, 8, 16, 32, 64, 128))
    teacher = load_teacher("digits")
    rows = [digits_floor_row()]
    y = balanced_labels(n)
    for sampler, name in (("dpmpp2m", "teacher"), ("ddim", "teacher-ddim")):
        for steps in nfes:
            x, sec = timed(lambda: generate(teacher, teacher.process, (n, 1, 16, 16), sampler, steps,
                                            generator=torch.Generator().manual_seed(seed + 6), y=y))
            rows.append(row("digits", name, steps, "digits_fd", digits_frechet_distance(x), sec, sampler=sampler, n=n))
    return rows


GUIDANCE_WEIGHTS = (0.0, 1.0, 2.0, 4.0)


P_W_MIN = 0.25   # guided distillation: probability of training exactly at w = w_min (course_lib.distill.guided)


def _guided_2d_budget(mode: str) -> dict:
    """Budgets of the 2D guided distillation (shared by the benchmark and notebook 02).

    p_w_min: the probability that a training w is exactly w_min (course choice beside Meng et al.'s plain
    U[w_min, w_max]; see course_lib.distill.guided), in stage 1 and in every PD round."""
    return pick(mode,
                smoke=dict(n=400, teacher_steps=8, stage1_steps=20, stage1_lr=1e-3, n_start=8, pd_steps=10,
                           pd_lr=3e-4, batch=128, p_w_min=P_W_MIN),
                laptop=dict(n=8000, teacher_steps=64, stage1_steps=2000, stage1_lr=1e-3, n_start=64, pd_steps=300,
                            pd_lr=3e-4, batch=1024, p_w_min=P_W_MIN),
                full=dict(n=50_000, teacher_steps=64, stage1_steps=10_000, stage1_lr=1e-3, n_start=64, pd_steps=4000,
                          pd_lr=1e-4, batch=2048, p_w_min=P_W_MIN))


def guided_2d_students(teacher, budget: dict, w_range=(0.0, 4.0), seed: int = 0, progress: bool = True):
    """Meng et al.'s two stages on the gmm-overlap teacher: stage 1 (w-conditioned student), then PD from
    budget["n_start"] DDIM steps to 1 with w as an input; w = w_min with probability budget["p_w_min"] (default 0,
    the paper's plain uniform). Returns (stage-1 student, {steps: student}, seconds)."""
    from .data2d import sample_2d
    from .distill import guided
    from .train import TrainConfig

    sample = lambda n, g: sample_2d("gmm-overlap", n, g)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    cfg1 = TrainConfig(steps=budget["stage1_steps"], batch_size=budget["batch"], lr=budget["stage1_lr"],
                       lr_schedule="linear",
                       ema_decay=0.0, seed=seed, desc="guided stage 1")
    p_w_min = budget.get("p_w_min", 0.0)
    stage1 = guided.distill_guidance(teacher, sample, w_range, cfg1, progress=progress,
                                     p_w_min=p_w_min).best.eval().requires_grad_(False)
    cfg2 = TrainConfig(steps=budget["pd_steps"], batch_size=budget["batch"], lr=budget["pd_lr"], lr_schedule="linear",
                       ema_decay=0.0, seed=seed + 1)
    students = guided.distill_steps(stage1, sample, budget["n_start"], 1, cfg2, progress=progress, p_w_min=p_w_min)
    return stage1, students, time.perf_counter() - t0


@register("guided")
def bench_guided(mode: str, seed: int = 0) -> tuple[list[dict], dict]:
    """Guided distillation (Meng et al. 2023) of the shipped gmm-overlap teacher, w in {0, 1, 2, 4}.

    Rows per (model, nfe, w), extra fields "w" and "sampler": "swd" against exact samples of the requested
    classes (labels balanced over the 8 classes) and "class_acc", the fraction of samples the exact mixture's
    Bayes classifier assigns to the requested class. Models: "data" (exact class-conditional samples: the SWD
    floor and the Bayes accuracy of the data itself), "teacher" (classifier-free guidance, DPM-Solver++(2M);
    nfe counts solver steps, each costs TWO network evaluations, cond + uncond, batched), "guided-student-stage1"
    (stage 1 sampled with n_start DDIM steps, one evaluation per step) and "guided-student" at 4 and 1 steps.
    Digits: the shipped digits teacher with guidance (class_acc from the digits classifier)."""
    from .grids import uniform
    from .guidance import cfg as guide
    from .samplers import ddim, dpm_solver_pp_2m
    from .teachers import load_teacher

    b = _guided_2d_budget(mode)
    n, ds = b["n"], "gmm-overlap"
    mix, y, swd, acc, rows = conditional_reference(ds, n, seed)

    teacher = load_teacher(f"{ds}-vp")
    stage1, students, train_sec = guided_2d_students(teacher, b, seed=seed, progress=mode != "smoke")
    x1 = teacher.process.prior((n, 2), torch.Generator().manual_seed(seed + 3))
    for w in GUIDANCE_WEIGHTS:
        runs = [("teacher", b["teacher_steps"], "dpmpp2m",
                 lambda: dpm_solver_pp_2m(lambda x, t: guide(teacher, w, mix.num_classes)(x, t, y), x1,
                                          uniform(b["teacher_steps"]), teacher.process)),
                ("guided-student-stage1", b["n_start"], "ddim",
                 lambda: ddim(lambda x, t: stage1(x, t, y, w), x1, uniform(b["n_start"]), teacher.process))]
        for N in (4, 1):
            if N in students:
                runs.append(("guided-student", N, "ddim", lambda N=N: ddim(lambda x, t: students[N](x, t, y, w), x1,
                                                                        uniform(N), teacher.process)))
        for name, steps, sampler, fn in runs:
            x, sec = timed(fn)
            for metric, value in (("swd", swd(x)), ("class_acc", acc(x))):
                rows.append(row(ds, name, steps, metric, value, sec, w=w, sampler=sampler, n=n,
                                **({"train_seconds": round(train_sec, 1)} if name != "teacher" else {})))
    rows += _guided_digits_rows(mode, seed)
    print(guided_summary(rows))
    return rows, {**b, "w_range": [0.0, 4.0], "swd_projections": 256}


def guided_summary(rows: list[dict]) -> str:
    """One line per (dataset, model, nfe, w) with both metrics side by side, and the student-to-teacher ratios."""
    lines: dict[tuple, dict] = {}
    for r in rows:
        key = (r["dataset"], r["model"], r["nfe"], r.get("w"))
        lines.setdefault(key, {"dataset": r["dataset"], "model": r["model"], "nfe": r["nfe"], "w": r.get("w")})
        lines[key][r["metric"]] = r["value"]
    out = list(lines.values())
    teach = {(d["dataset"], d["w"]): d for d in out if d["model"] == "teacher"}
    for d in out:
        t = teach.get((d["dataset"], d["w"]))
        if t is not None and d["model"].startswith("guided-student"):
            d["swd / teacher"] = d["swd"] / t["swd"]
            d["acc - teacher (points)"] = 100 * (d["class_acc"] - t["class_acc"])
    return table(out, ["dataset", "model", "nfe", "w", "class_acc", "swd", "digits_fd", "swd / teacher",
                       "acc - teacher (points)"])


def _guided_digits_rows(mode: str, seed: int) -> list[dict]:
    """The shipped digits teacher with classifier-free guidance at each w (DPM-Solver++(2M)), balanced labels:
    class accuracy under the digits classifier and the digits Fréchet distance."""
    from .classifier import DIGITS_FD_N, balanced_labels, class_accuracy, digits_frechet_distance
    from .guidance import cfg as guide
    from .samplers import generate
    from .teachers import load_teacher

    n = pick(mode, smoke=40, laptop=DIGITS_FD_N, full=DIGITS_FD_N)
    steps = pick(mode, smoke=2, laptop=16, full=64)
    teacher = load_teacher("digits")
    y = balanced_labels(n)
    rows = []
    for w in GUIDANCE_WEIGHTS:
        x, sec = timed(lambda: generate(guide(teacher, w, 10), teacher.process, (n, 1, 16, 16), "dpmpp2m", steps,
                                        generator=torch.Generator().manual_seed(seed + 6), y=y))
        rows.append(row("digits", "teacher", steps, "class_acc", class_accuracy(x, y), sec, w=w, sampler="dpmpp2m", n=n))
        rows.append(row("digits", "teacher", steps, "digits_fd", digits_frechet_distance(x), sec, w=w,
                        sampler="dpmpp2m", n=n))
    return rows


REFLOW_NFES = (1, 2, 4, 64)


def reflow_2d_budget(mode: str) -> dict:
    """Budgets of the 2D reflow experiments (shared by the benchmark and notebook 03).

    n: evaluation samples; n_pairs: pairs per round; pair_steps: Heun steps solving the 1-RF's ODE for its pairs
    (later rounds are nearly straight: pair_steps_later); steps/batch/lr: every reflow and distillation run."""
    return pick(mode,
                smoke=dict(n=500, n_pairs=1000, pair_steps=4, pair_steps_later=2, steps=20, batch=128, lr=5e-4),
                laptop=dict(n=10_000, n_pairs=10_000, pair_steps=16, pair_steps_later=8, steps=300, batch=512, lr=1e-3),
                full=dict(n=50_000, n_pairs=100_000, pair_steps=64, pair_steps_later=32, steps=4000, batch=2048,
                          lr=3e-4))


def reflow_2d_models(dataset: str, budget: dict, seed: int = 0, cache_dir: str | None = None,
                     progress: bool = True) -> tuple[dict, dict]:
    """1-RF (the shipped flow-matching teacher) -> 2-RF -> 3-RF, and the 1-step distillations of 1-RF and 2-RF
    (Liu et al. 2022, Algorithm 1). Pairs are cached (data/cache/reflow). Returns ({name: model}, {name: seconds})."""
    from dataclasses import replace

    from .distill import reflow
    from .teachers import load_teacher
    from .train import TrainConfig

    cfg = TrainConfig(steps=budget["steps"], batch_size=budget["batch"], lr=budget["lr"], lr_schedule="linear",
                      ema_decay=0.0, seed=seed)
    models = {"1-rf": load_teacher(f"{dataset}-rf")}
    seconds: dict[str, float] = {}
    pairs = {}
    for k in (1, 2):
        steps = budget["pair_steps"] if k == 1 else budget["pair_steps_later"]
        t0 = time.perf_counter()
        pairs[k] = reflow.cached_pairs(models[f"{k}-rf"], f"{dataset}-{k}rf-{seed}", budget["n_pairs"], steps, "heun",
                                       seed=seed + k, cache_dir=cache_dir or reflow.CACHE_DIR, on_mismatch="regenerate",
                                       progress=progress, verbose=progress)
        seconds[f"pairs-{k}-rf"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        models[f"{k + 1}-rf"] = reflow.reflow(models[f"{k}-rf"], pairs[k], replace(cfg, desc=f"{dataset} {k + 1}-RF"),
                                              progress=progress).best.eval().requires_grad_(False)
        seconds[f"{k + 1}-rf"] = time.perf_counter() - t0
    for k in (1, 2):
        t0 = time.perf_counter()
        models[f"{k}-rf-distill"] = reflow.distill(models[f"{k}-rf"], pairs[k], 1,
                                                   replace(cfg, desc=f"{dataset} {k}-RF -> 1 step"),
                                                   progress=progress).best.eval().requires_grad_(False)
        seconds[f"{k}-rf-distill"] = time.perf_counter() - t0
    return models, seconds


@register("reflow")
def bench_reflow(mode: str, seed: int = 0) -> tuple[list[dict], dict]:
    """Rectified flow and reflow (Liu et al. 2022) on the shipped 2D flow-matching teachers: "1-rf" (the teacher),
    "2-rf", "3-rf" sampled with Euler at NFE 1, 2, 4, 64 ("swd"), their straightness S(Z) measured on 64-step Euler
    paths ("straightness", nfe = 64), and the 1-step distillations "1-rf-distill", "2-rf-distill" (nfe 1). Teacher
    rows: the data floor and the teacher with Euler and Heun at NFE 1..128 (its best SWD is the target). Digits:
    the shipped digits 2-RF and its 1-step distillation (data/reflow), when present."""
    from .distill import reflow
    from .grids import uniform
    from .metrics import sliced_wasserstein
    from .samplers import euler

    b = reflow_2d_budget(mode)
    n = b["n"]
    swd = lambda a, r: sliced_wasserstein(a, r, n_proj=256, seed=0)
    rows: list[dict] = []
    for ds in ("checkerboard", "gmm"):
        ref, floor_row = reference_2d(ds, n, seed, swd)
        rows.append(floor_row)
        models, secs = reflow_2d_models(ds, b, seed, progress=mode != "smoke")
        teacher = models["1-rf"]
        for sampler in ("euler", "heun"):
            rows += sweep_2d(teacher, teacher.process, ds, f"fm-teacher-{sampler}", sampler, ref,
                             pick(mode, smoke=(1, 2, 4), laptop=NFES, full=NFES), seed + 3, swd)
        x1 = teacher.process.prior((n, 2), torch.Generator().manual_seed(seed + 3))
        for name in ("1-rf", "2-rf", "3-rf"):
            m = models[name]
            extra = {} if name == "1-rf" else {"train_seconds": round(secs[name], 1)}
            for k in REFLOW_NFES:
                x, sec = timed(lambda: euler(m, x1, uniform(k), m.process))
                rows.append(row(ds, name, k, "swd", swd(x, ref), sec, sampler="euler", n=n, **extra))
            s, sec = timed(lambda: reflow.straightness(m, x1[:2000], 64))
            rows.append(row(ds, name, 64, "straightness", s, sec, sampler="euler", n=2000, **extra))
        for name in ("1-rf-distill", "2-rf-distill"):
            m = models[name]
            x, sec = timed(lambda: euler(m, x1, uniform(1), m.process))
            rows.append(row(ds, name, 1, "swd", swd(x, ref), sec, sampler="euler", n=n,
                            train_seconds=round(secs[name], 1)))
    rows += _reflow_digits_rows(mode, seed)
    print(reflow_summary(rows))
    return rows, {**b, "swd_projections": 256, "pair_solver": "heun"}


def reflow_summary(rows: list[dict]) -> str:
    """Per dataset: each model's SWD at its NFE over the teacher's best SWD, and straightness over 1-RF's."""
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in rows if r["metric"] == "swd"):
        mine = [r for r in rows if r["dataset"] == ds]
        best = min((r["value"] for r in mine if r["model"].startswith("fm-teacher") and r["metric"] == "swd"),
                   default=None)
        s1 = next((r["value"] for r in mine if r["model"] == "1-rf" and r["metric"] == "straightness"), None)
        for r in mine:
            if r["model"] in ("1-rf", "2-rf", "3-rf", "1-rf-distill", "2-rf-distill"):
                d = {"dataset": ds, "model": r["model"], "nfe": r["nfe"], "metric": r["metric"], "value": r["value"]}
                if r["metric"] == "swd" and best:
                    d["/ teacher best"] = r["value"] / best
                if r["metric"] == "straightness" and s1:
                    d["/ 1-rf"] = r["value"] / s1
                out.append(d)
    return table(out, ["dataset", "model", "nfe", "metric", "value", "/ teacher best", "/ 1-rf"])


def _reflow_digits_rows(mode: str, seed: int) -> list[dict]:
    """Digits: the diffusion teacher (DPM-Solver++ 16 steps: the solver that made the pairs; and read as a flow,
    "1-rf", with Euler), the shipped 2-RF (Euler 1, 4) and its 1-step distillation, digits Fréchet distance."""
    from .classifier import DIGITS_FD_N, balanced_labels, digits_frechet_distance
    from .distill import reflow
    from .grids import uniform
    from .guidance import condition
    from .samplers import dpm_solver_pp_2m, euler
    from .teachers import load_teacher

    if not (reflow.DIGITS_DIR / "digits-2rf").is_dir():
        return []
    n = pick(mode, smoke=64, laptop=DIGITS_FD_N, full=DIGITS_FD_N)
    teacher = load_teacher("digits")
    y = balanced_labels(n)
    x1 = torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed + 6))
    fd = digits_frechet_distance
    rows = [digits_floor_row()]
    x, sec = timed(lambda: dpm_solver_pp_2m(condition(teacher, y), x1, uniform(16), teacher.process))
    rows.append(row("digits", "teacher", 16, "digits_fd", fd(x), sec, sampler="dpmpp2m", n=n))
    models = [("1-rf", reflow.RFView(teacher), (1, 4)), ("2-rf", reflow.load_digits_flow("digits-2rf"), (1, 4))]
    if (reflow.DIGITS_DIR / "digits-2rf-distill1").is_dir():
        models.append(("2-rf-distill", reflow.load_digits_flow("digits-2rf-distill1"), (1,)))
    for name, m, ks in models:
        for k in ks:
            x, sec = timed(lambda: euler(condition(m, y), x1, uniform(k), m.process))
            rows.append(row("digits", name, k, "digits_fd", fd(x), sec, sampler="euler", n=n))
    return rows


def instaflow_2d_budget(mode: str) -> dict:
    """Budgets of the 2D InstaFlow recipe and its ablation on gmm-overlap (shared by the benchmark and notebook 04).

    w: guidance of the teacher's triplets; pair_steps: DPM-Solver++ steps of the guided teacher; flow_pair_steps:
    Euler steps of the 2-RF for the distillation pairs; reflow_steps / distill_steps: updates of each stage (direct
    distillation gets their sum: the same budget); sweep: fresh one-step students of each width, trained on each
    coupling with n_pairs of its pairs for `steps` updates (the capacity sweep)."""
    return pick(mode,
                smoke=dict(n=400, n_pairs=800, w=0.5, pair_steps=4, flow_pair_steps=2, reflow_steps=20,
                           distill_steps=20, batch=128, lr=5e-4, p_uncond=0.1,
                           sweep=dict(widths=(8, 32), n_pairs=(200, 800), steps=(10,))),
                laptop=dict(n=10_000, n_pairs=10_000, w=0.5, pair_steps=16, flow_pair_steps=8, reflow_steps=300,
                            distill_steps=300, batch=512, lr=5e-4, p_uncond=0.1,
                            sweep=dict(widths=(8, 32, 256), n_pairs=(1000, 10_000), steps=(300, 2000))),
                full=dict(n=50_000, n_pairs=100_000, w=0.5, pair_steps=64, flow_pair_steps=32, reflow_steps=4000,
                          distill_steps=4000, batch=2048, lr=3e-4, p_uncond=0.1,
                          sweep=dict(widths=(8, 16, 32, 64, 256), n_pairs=(10_000, 100_000), steps=(2000,))))


def instaflow_2d_models(budget: dict, seed: int = 0, cache_dir: str | None = None, progress: bool = True
                        ) -> tuple[dict, dict, dict]:
    """InstaFlow on the shipped gmm-overlap teacher, and direct distillation with the same budget.

    Returns ({"teacher", "2-rf", "instaflow", "direct-distill": model}, {"teacher", "2-rf": triplets (eps, x0, y)},
    {name: train seconds}). The teacher's triplets use guidance w; the 2-RF's pairs its plain velocity (w = 0)."""
    from dataclasses import replace

    from .distill import instaflow, reflow
    from .teachers import load_teacher
    from .train import TrainConfig

    b = budget
    cache = cache_dir or reflow.CACHE_DIR
    teacher = load_teacher("gmm-overlap-vp")
    y = torch.arange(b["n_pairs"]) % instaflow.null_label(teacher)           # balanced labels (null = classes)
    cfg = TrainConfig(steps=b["reflow_steps"], batch_size=b["batch"], lr=b["lr"], lr_schedule="linear", ema_decay=0.0,
                      seed=seed)
    data = {"teacher": instaflow.triplets(teacher, b["w"], y, f"gmm-overlap-w{b['w']}-{seed}", b["pair_steps"],
                                          seed=seed + 10, cache_dir=cache, on_mismatch="regenerate",
                                          progress=progress, verbose=progress)}
    secs, t0 = {}, time.perf_counter()
    flow2 = instaflow.conditional_reflow(teacher, data["teacher"], replace(cfg, desc="gmm-overlap 2-RF"),
                                         b["p_uncond"], progress=progress)
    secs["2-rf"] = time.perf_counter() - t0
    data["2-rf"] = instaflow.triplets(flow2, 0.0, y, f"gmm-overlap-2rf-w{b['w']}-{seed}", b["flow_pair_steps"],
                                      "euler", seed=seed + 11, cache_dir=cache, on_mismatch="regenerate",
                                      progress=progress, verbose=progress)
    t0 = time.perf_counter()
    student = instaflow.distill_onestep(flow2, data["2-rf"], replace(cfg, steps=b["distill_steps"],
                                                                     desc="2-RF -> 1 step"), progress=progress)
    secs["instaflow"] = time.perf_counter() - t0 + secs["2-rf"]
    t0 = time.perf_counter()
    direct = instaflow.direct_distill(teacher, data["teacher"],
                                      replace(cfg, steps=b["reflow_steps"] + b["distill_steps"],
                                              desc="teacher -> 1 step (direct)"), progress=progress)
    secs["direct-distill"] = time.perf_counter() - t0
    return {"teacher": teacher, "2-rf": flow2, "instaflow": student, "direct-distill": direct}, data, secs


def instaflow_sweep(data: dict, targets: dict, x1: torch.Tensor, y: torch.Tensor | None, sweep: dict, budget: dict,
                    swd: Callable, like, dataset: str = "gmm-overlap", seed: int = 0, progress: bool = True) -> list[dict]:
    """The capacity sweep: a fresh one-step student of each width (shaped like `like`: same classes), trained (L2)
    on the first n_pairs triplets of each coupling, data["direct"] (the teacher's) and data["reflow"] (the 2-RF's),
    for `steps` updates; scored by SWD and by held-out regression error against that coupling's endpoints
    targets[coupling] from noise x1 (labels y, or None for unconditional data)."""
    from dataclasses import replace
    from itertools import product

    from .distill import instaflow
    from .train import TrainConfig

    rows = []
    grid = list(product(sweep["widths"], sweep["n_pairs"], sweep["steps"]))
    if progress:
        from tqdm.auto import tqdm
        grid = tqdm(grid, desc=f"capacity sweep ({dataset})", mininterval=0.5)
    for width, n_pairs, steps in grid:
        cfg = TrainConfig(steps=steps, batch_size=budget["batch"], lr=2e-3 if width <= 32 else 1e-3,
                          lr_schedule="linear", ema_decay=0.0, seed=seed)
        for coupling in ("direct", "reflow"):
            part = tuple(None if v is None else v[:n_pairs] for v in data[coupling])
            (student, sec) = timed(lambda: instaflow.distill_onestep(instaflow.fresh_student(like, width, seed=seed),
                                                                     part, replace(cfg, desc=f"w{width}"),
                                                                     progress=False))
            x = instaflow.one_step(student, x1, y)
            extra = dict(coupling=coupling, width=width, n_pairs=n_pairs, train_steps=steps,
                         train_seconds=round(sec, 1), n=len(x1))
            rows.append(row(dataset, f"sweep-{coupling}", 1, "swd", swd(x), 0.0, **extra))
            rows.append(row(dataset, f"sweep-{coupling}", 1, "heldout_err",
                            instaflow.regression_error(student, x1, targets[coupling], y), 0.0, **extra))
    return rows


def instaflow_unconditional(dataset: str, budget: dict, x1: torch.Tensor, seed: int = 0, progress: bool = True
                            ) -> tuple[dict, dict, object]:
    """The two couplings of an unconditional diffusion teacher (shipped "<dataset>-vp"): its own ODE pairs
    (DPM-Solver++, pair_steps) and the pairs of its 2-RF (reflow initialised from its weights, Euler
    flow_pair_steps). Returns ({"direct", "reflow": (eps, x0, None)}, {"direct", "reflow": endpoints from the
    evaluation noise x1 (N, 2)}, teacher)."""
    from .distill import reflow
    from .teachers import load_teacher
    from .train import TrainConfig

    b = budget
    teacher = load_teacher(f"{dataset}-vp")
    cfg = TrainConfig(steps=b["reflow_steps"], batch_size=b["batch"], lr=b["lr"], lr_schedule="linear", ema_decay=0.0,
                      seed=seed, desc=f"{dataset} 2-RF")
    pairs = reflow.cached_pairs(teacher, f"{dataset}-vp-{seed}", b["n_pairs"], b["pair_steps"], "dpmpp2m",
                                seed=seed + 10, on_mismatch="regenerate", progress=progress, verbose=progress)
    flow2 = reflow.reflow(teacher, pairs, cfg, progress=progress).best.eval().requires_grad_(False)
    pairs2 = reflow.cached_pairs(flow2, f"{dataset}-vp-2rf-{seed}", b["n_pairs"], b["flow_pair_steps"], "euler",
                                 seed=seed + 11, on_mismatch="regenerate", progress=progress, verbose=progress)
    targets = {"direct": reflow.generate_pairs(teacher, x1, b["pair_steps"], "dpmpp2m")[1],
               "reflow": reflow.generate_pairs(flow2, x1, b["flow_pair_steps"], "euler")[1]}
    return {"direct": (*pairs, None), "reflow": (*pairs2, None)}, targets, teacher


@register("instaflow")
def bench_instaflow(mode: str, seed: int = 0) -> tuple[list[dict], dict]:
    """InstaFlow (Liu et al. 2024) on the conditional gmm-overlap teacher, and the paper's ablation.

    Models: "teacher" (guided with w, DPM-Solver++ 64 steps; nfe counts solver steps, each two network
    evaluations), "2-rf" (conditional reflow from the teacher's weights, Euler 1 and 4 steps, no guidance at use),
    "instaflow" (2-RF distilled to 1 step) and "direct-distill" (the teacher's triplets distilled to 1 step with the
    same number of updates as reflow + distillation). Metrics "swd" (against exact class-conditional samples),
    "class_acc" (Bayes classifier of the mixture), "heldout_err" (one-step students: mean squared error against
    their own coupling's endpoints on noise they never saw), "straightness" (teacher read as a flow; 2-RF).
    Capacity sweep rows: "sweep-direct" / "sweep-reflow" (fields width, n_pairs, train_steps), on gmm-overlap and
    on the unconditional 8-mode "gmm" (its shipped diffusion teacher, its 2-RF; teacher and 2-RF rows give the SWD of
    each coupling's endpoints, which the students imitate). Digits: the shipped
    data/instaflow models (trained on a GPU by `python -m course_lib.distill.instaflow train-digits`)."""
    from .data2d import sample_2d
    from .distill import instaflow, reflow
    from .grids import uniform
    from .metrics import sliced_wasserstein
    from .samplers import dpm_solver_pp_2m, euler

    b = instaflow_2d_budget(mode)
    n, ds = b["n"], "gmm-overlap"
    progress = mode != "smoke"
    mix, y, swd, acc, rows = conditional_reference(ds, n, seed)
    models, data, secs = instaflow_2d_models(b, seed, progress=progress)
    teacher, flow2 = models["teacher"], models["2-rf"]
    gt = instaflow.guided(teacher, b["w"])
    x1 = teacher.process.prior((n, 2), torch.Generator().manual_seed(seed + 3))
    runs = [("teacher", 64, "dpmpp2m", lambda: dpm_solver_pp_2m(lambda x, t: gt(x, t, y), x1, uniform(64), teacher.process))]
    runs += [("2-rf", k, "euler", lambda k=k: euler(lambda x, t: flow2(x, t, y), x1, uniform(k), flow2.process))
             for k in (1, 4)]
    runs += [(name, 1, "one-step", lambda name=name: instaflow.one_step(models[name], x1, y))
             for name in ("instaflow", "direct-distill")]
    for name, k, sampler, fn in runs:
        x, sec = timed(fn)
        extra = {"w": b["w"], "sampler": sampler, "n": n, **({"train_seconds": round(secs[name], 1)} if name in secs else {})}
        rows += [row(ds, name, k, "swd", swd(x), sec, **extra), row(ds, name, k, "class_acc", acc(x), sec, **extra)]
    # held-out endpoints of each coupling from the evaluation noise (never used in training)
    _, xt = reflow.generate_pairs(gt, x1, b["pair_steps"], "dpmpp2m", cond={"y": y})
    _, x2 = reflow.generate_pairs(flow2, x1, b["flow_pair_steps"], "euler", cond={"y": y})
    targets = {"teacher": xt, "2-rf": x2}
    for name, key in (("instaflow", "2-rf"), ("direct-distill", "teacher")):
        rows.append(row(ds, name, 1, "heldout_err", instaflow.regression_error(models[name], x1, targets[key], y), 0.0,
                        w=b["w"], n=n, coupling=key))
    m = min(n, 2000)
    for name, flow in (("teacher", reflow.RFView(gt)), ("2-rf", flow2)):
        s, sec = timed(lambda: reflow.straightness(flow, x1[:m], 64, cond={"y": y[:m]}))
        rows.append(row(ds, name, 64, "straightness", s, sec, w=b["w"], sampler="euler", n=m))
    rows += instaflow_sweep({"direct": data["teacher"], "reflow": data["2-rf"]},
                            {"direct": targets["teacher"], "reflow": targets["2-rf"]}, x1, y, b["sweep"], b, swd,
                            teacher, ds, seed, progress)
    # the same sweep where the map is multimodal: the unconditional 8-mode mixture (no labels to split it)
    u_data, u_targets, u_teacher = instaflow_unconditional("gmm", b, x1, seed, progress)
    u_ref = sample_2d("gmm", n, torch.Generator().manual_seed(seed + 1))[0]
    u_swd = lambda a: sliced_wasserstein(a, u_ref, n_proj=256, seed=0)
    rows.append(row("gmm", "teacher", b["pair_steps"], "swd", u_swd(u_targets["direct"]), 0.0, sampler="dpmpp2m", n=n))
    rows.append(row("gmm", "2-rf", b["flow_pair_steps"], "swd", u_swd(u_targets["reflow"]), 0.0, sampler="euler", n=n))
    rows += instaflow_sweep(u_data, u_targets, x1, None, b["sweep"], b, u_swd, u_teacher, "gmm", seed, progress)
    rows += _instaflow_digits_rows(mode, seed)
    print(instaflow_summary(rows))
    return rows, {**b, "swd_projections": 256}


def instaflow_summary(rows: list[dict]) -> str:
    """The headline (student vs teacher: SWD ratio, class accuracy in points) and the ablation's sweep side by side."""
    lines: dict[tuple, dict] = {}
    for r in rows:
        if r["model"].startswith("sweep-"):
            key = (r["dataset"], "sweep", r["width"], r["n_pairs"], r["train_steps"])
            d = lines.setdefault(key, {"dataset": r["dataset"], "model": "sweep", "width": r["width"],
                                       "n_pairs": r["n_pairs"], "train_steps": r["train_steps"]})
            d[f"{r['coupling']} {r['metric']}"] = r["value"]
            continue
        key = (r["dataset"], r["model"], r["nfe"])
        lines.setdefault(key, {"dataset": r["dataset"], "model": r["model"], "nfe": r["nfe"]})[r["metric"]] = r["value"]
    out = list(lines.values())
    teach = {d["dataset"]: d for d in out if d["model"] == "teacher" and ("swd" in d or "digits_fd" in d)}
    for d in out:
        t = teach.get(d["dataset"])
        if t is None or d["model"] in ("teacher", "data", "sweep"):
            continue
        if "swd" in d and "swd" in t:
            d["swd / teacher"] = d["swd"] / t["swd"]
        if "digits_fd" in d and "digits_fd" in t:
            d["fd / teacher"] = d["digits_fd"] / t["digits_fd"]
        if "class_acc" in d and "class_acc" in t:
            d["acc - teacher (points)"] = 100 * (d["class_acc"] - t["class_acc"])
    head = [d for d in out if d["model"] != "sweep"]
    sweep = [d for d in out if d["model"] == "sweep"]
    return (table(head, ["dataset", "model", "nfe", "class_acc", "swd", "digits_fd", "heldout_err", "straightness",
                         "swd / teacher", "fd / teacher", "acc - teacher (points)"])
            + "\n\ncapacity sweep (fresh one-step students; direct = the teacher's coupling, reflow = the 2-RF's)\n"
            + table(sweep, ["dataset", "width", "n_pairs", "train_steps", "direct swd", "reflow swd",
                            "direct heldout_err", "reflow heldout_err"]))


def _instaflow_digits_rows(mode: str, seed: int) -> list[dict]:
    """Digits: the guided teacher (w of the recipe, DPM-Solver++ 16 steps, the solver of the triplets), the shipped
    conditional 2-RF (Euler 1, 4, 16), InstaFlow (L2, then Lap1) and direct distillation (L2, then Lap1) at one
    step: class accuracy, digits Fréchet distance, and the one-step students' held-out regression error."""
    from .classifier import DIGITS_FD_N, balanced_labels, class_accuracy, digits_frechet_distance
    from .distill import instaflow, reflow
    from .grids import uniform
    from .samplers import dpm_solver_pp_2m, euler
    from .teachers import load_teacher

    if not all((instaflow.DIGITS_DIR / m).is_dir() for m in instaflow.DIGITS_MODELS):
        return []
    w = instaflow.DIGITS_RECIPE["w"]
    n = pick(mode, smoke=64, laptop=DIGITS_FD_N, full=DIGITS_FD_N)
    y = balanced_labels(n)
    x1 = torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed + 6))
    gt = instaflow.guided(load_teacher("digits"), w)
    flow2 = instaflow.load_digits_model("digits-if-2rf")
    rows = [digits_floor_row()]

    def score(name, k, sampler, x, sec, **extra):
        rows.extend([row("digits", name, k, "class_acc", class_accuracy(x, y), sec, w=w, sampler=sampler, n=n, **extra),
                     row("digits", name, k, "digits_fd", digits_frechet_distance(x), sec, w=w, sampler=sampler, n=n,
                         **extra)])

    xt, sec = timed(lambda: dpm_solver_pp_2m(lambda x, t: gt(x, t, y), x1, uniform(16), gt.process))
    score("teacher", 16, "dpmpp2m", xt, sec)
    x2 = None
    for k in (1, 4, 16):
        x, sec = timed(lambda: euler(lambda x, t: flow2(x, t, y), x1, uniform(k), flow2.process))
        score("2-rf", k, "euler", x, sec)
        x2 = x if k == instaflow.DIGITS_RECIPE["distill_pairs_steps"] else x2
    m = min(n, 300)
    for name, flow in (("teacher", reflow.RFView(gt)), ("2-rf", flow2)):
        s, sec = timed(lambda: reflow.straightness(flow, x1[:m], 32, cond={"y": y[:m]}))
        rows.append(row("digits", name, 32, "straightness", s, sec, w=w, sampler="euler", n=m))
    for name, shipped, target in (("instaflow-l2", "digits-instaflow-l2", x2), ("instaflow", "digits-instaflow", x2),
                                  ("direct-distill-l2", "digits-direct-l2", xt), ("direct-distill", "digits-direct", xt)):
        model = instaflow.load_digits_model(shipped)
        x, sec = timed(lambda: instaflow.one_step(model, x1, y))
        score(name, 1, "one-step", x, sec)
        rows.append(row("digits", name, 1, "heldout_err", instaflow.regression_error(model, x1, target, y), 0.0, w=w,
                        n=n, coupling="2-rf" if "instaflow" in name else "teacher"))
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m course_lib.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help=f"benchmark to run: {', '.join(BENCHMARKS)}")
    ap.add_argument("--mode", default=None, help=f"one of {', '.join(MODES)} (default: $COURSE_MODE or by hardware)")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.name not in BENCHMARKS:
        ap.error(f"unknown benchmark {args.name!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    mode = course_mode(args.mode)
    t0 = time.perf_counter()
    rows, meta = BENCHMARKS[args.name](mode, args.seed)
    meta.update({"seed": args.seed, "total_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
                 "device": "cpu", "threads": torch.get_num_threads(), "machine": platform.machine()})
    result = {"name": args.name, "mode": mode, "meta": meta, "rows": rows}
    print(table(rows, ["dataset", "model", "nfe", "metric", "value", "seconds"]))
    print(f"\n{args.name} benchmark, mode {mode}: {len(rows)} rows in {meta['total_seconds']} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
