"""Benchmarks: quality and speed measured the same way for every method, printed as a table and saved as JSON.

    python -m course_lib.bench teacher --mode laptop --out runs/bench_teacher.json

Output format (shared by every method's benchmark):
    {"name": ..., "mode": ..., "meta": {...},
     "rows": [{"dataset", "model", "nfe", "metric", "value", "seconds", ...extra fields}, ...]}
`seconds` is the wall time of producing that row's samples (not the metric). Model "data" rows give the
metric between two independent data batches of the same size: for the 2D data (exact samplers, SWD) the floor
no model can beat. For digits it is real-vs-real, two halves of the 1797 digits, and not a floor: the digits
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
    return rows, {"n_samples_2d": n, "n_start": n_start, "steps_per_round": cfg.steps, "batch": cfg.batch_size}


def _digits_rows(mode: str, seed: int) -> list[dict]:
    """The digits teacher (class-conditional, balanced labels, no guidance) at NFE 1..32, scored with the
    digits Fréchet distance: DIGITS_FD_N samples against the reference half of the real digits."""
    from .classifier import DIGITS_FD_N, balanced_labels, digits_fd_floor, digits_frechet_distance
    from .samplers import generate
    from .teachers import load_teacher

    n = pick(mode, smoke=64, laptop=DIGITS_FD_N, full=DIGITS_FD_N)
    nfes = pick(mode, smoke=(1, 2), laptop=(1, 2, 4, 8, 16, 32), full=(1, 2, 4, 8, 16, 32, 64, 128))
    teacher = load_teacher("digits")
    rows = [row("digits", "data", None, "digits_fd", digits_fd_floor(), 0.0, n=898)]
    y = balanced_labels(n)
    for sampler, name in (("dpmpp2m", "teacher"), ("ddim", "teacher-ddim")):
        for steps in nfes:
            x, sec = timed(lambda: generate(teacher, teacher.process, (n, 1, 16, 16), sampler, steps,
                                            generator=torch.Generator().manual_seed(seed + 6), y=y))
            rows.append(row("digits", name, steps, "digits_fd", digits_frechet_distance(x), sec, sampler=sampler, n=n))
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
