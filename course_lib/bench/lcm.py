"""`bench lcm` (and the machinery `bench tcd` shares): latent consistency models (Luo et al. 2023) measured on the 2D
teachers and on the mini Stable Diffusion, students at 1, 2, 4 and 8 steps.

2D: LCM's recipe on an unconditional 2D teacher is consistency distillation with ONE DDIM step of the teacher per
skipping step (no guidance to fold in), sampled with multistep consistency sampling (LCM's sampler); TCD's 2D student
(bench tcd) is trained on the same teacher, grid, target EMA, updates and batch. Mini SD: the shipped students
(data/lcm, data/tcd: the same recipe and updates), measured with recipes.lcm.evaluate / recipes.tcd.evaluate
(adherence, held-out KID and FD) beside the guided teacher's 25-step DDIM and the real training digits (the floor)."""
from __future__ import annotations

import time
from typing import Sequence

import torch

from .. import minisd, sd as sdlib
from ..config import default_device, pick
from ..data2d import batches
from ..distill import consistency as cm, lcm, tcd
from ..grids import uniform
from ..minisd import digit_batches
from ..plotting import table
from ..recipes import lcm as lcm_recipes, tcd as tcd_recipes
from ..samplers import tcd as sss
from ..teachers import load_teacher
from ..train import TrainConfig
from . import register
from .core import (Evaluation, PR_N, lines_over_best, score_2d, seed_inputs, side_by_side, sweep_2d, timed,
                   train_fields)

STUDENT_STEPS = (1, 2, 4, 8)
TEACHER_NFES = (1, 2, 4, 8, 16, 32, 64)
SD = "mini-sd"                  # the dataset name of the mini Stable Diffusion rows
SD_METRICS = ("adherence", "colour_adherence", "thickness_adherence", "kid_heldout", "kid_train", "fd_heldout")


def tc_budget(mode: str) -> dict:
    """The budgets shared by `bench lcm` and `bench tcd` (identical for both methods)."""
    return dict(steps=pick(mode, smoke=20, laptop=400, full=4000), batch=pick(mode, smoke=128, laptop=1024, full=2048),
                lr=1e-3, N=pick(mode, smoke=6, laptop=10, full=18), mu=0.9,
                ema=pick(mode, smoke=0.9, laptop=0.95, full=0.999),
                n=pick(mode, smoke=250, laptop=5000, full=25_000),
                sd_n=pick(mode, smoke=16, laptop=300, full=1000), sd_train=pick(mode, smoke=2, laptop=0, full=0))


def _train_2d(method: str, ds: str, b: dict, seed: int, device, progress: bool):
    """(student, seconds): TCD or LCM-recipe CD of the shipped {ds}-vp teacher."""
    teacher = load_teacher(f"{ds}-vp", device=device)
    cfg = TrainConfig(steps=b["steps"], batch_size=b["batch"], seed=seed, desc=f"{method.upper()} {ds}")
    data = batches(ds)
    t0 = time.perf_counter()
    if method == "tcd":
        student, _ = tcd.distill_tcd(teacher, data, tcd.TCDConfig(N=b["N"], mu=b["mu"], lr=b["lr"],
                                                                  ema_decay=b["ema"]), run=cfg, progress=progress)
    else:
        student, _ = cm.distill_cd(teacher, data, cm.CMConfig(N=b["N"], solver="ddim", mu=b["mu"], lr=b["lr"],
                                                              ema_decay=b["ema"]), run=cfg, progress=progress)
    return student, time.perf_counter() - t0


def _sample_2d(method: str, student, x1, k: int, gamma: float | None, seed: int):
    """k steps of the student from x1: TCD's gamma sampler on the uniform grid, or multistep consistency sampling at
    evenly spaced times; fresh noise from a CPU generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    if method == "tcd":
        return sss(student, x1, uniform(k), student.process, generator=g, gamma=gamma)
    return cm.multistep_sample(student, x1, cm.step_times(k), student.process, student.t_min, generator=g)


def rows_2d(method: str, ev: Evaluation, mode: str, b: dict, seed: int, device, gammas: Sequence[float | None]):
    """Both 2D datasets: the teacher's DPM-Solver++ sweep, the data floor and the student at STUDENT_STEPS for each
    gamma (None: LCM's sampler), every score_2d metric; flow-map error to the exact teacher on gmm."""
    for ds in ("checkerboard", "gmm"):
        teacher = load_teacher(f"{ds}-vp", device=device)
        student, secs = _train_2d(method, ds, b, seed, device, mode != "smoke")
        for s in ev.seeds:
            ref, x1, exact = seed_inputs(ev, ds, teacher.process, b["n"], s, device)
            sweep_2d(ev, teacher, teacher.process, ds, "teacher", "dpmpp2m", ref,
                     pick(mode, smoke=(1, 2, 4), laptop=TEACHER_NFES, full=TEACHER_NFES), s + 3, device, exact)
            for k in STUDENT_STEPS:
                for gamma in gammas:
                    x, sec = timed(lambda: _sample_2d(method, student, x1, k, gamma, s + 4), device)
                    extra = {"gamma": gamma} if gamma is not None else {}
                    score_2d(ev, ds, method, x, ref, sec, nfe=k, steps=k, compare=True, exact=exact,
                             sampler="tcd" if method == "tcd" else "consistency", n=b["n"], **extra,
                             **train_fields(secs, b["steps"]))


def _sd_student(method: str, sd, b: dict, mode: str):
    """(student, meta): in smoke mode a tiny SD's student trained for b["sd_train"] updates; otherwise the shipped
    one (data/lcm or data/tcd); a missing shipped student is an error that says how to recreate it."""
    import json
    from dataclasses import asdict

    if mode == "smoke":
        cfg = lcm.LCMConfig(**{**asdict(lcm_recipes.RECIPE), "steps": b["sd_train"], "batch": 4, "w_dim": 32})
        batches = digit_batches(sd, n_images=20)
        fn = tcd.distill_tcd_sd if method == "tcd" else lcm.distill_lcm
        student, _ = fn(sd, batches, cfg, run=lcm.train_config(cfg, "TCD: mini SD student" if method == "tcd"
                                                                     else "LCD: LCM student"), progress=False)
        return student, {"sd_student": f"tiny random SD, {b['sd_train']} updates"}
    folder = (tcd_recipes.shipped_dir() / tcd_recipes.SHIPPED if method == "tcd"
              else lcm_recipes.shipped_dir() / lcm_recipes.SHIPPED["student"])
    meta_file = folder / (tcd_recipes.TCD_JSON if method == "tcd" else lcm_recipes.LCM_JSON)
    if not meta_file.is_file():
        raise FileNotFoundError(f"no shipped {method.upper()} student in {folder}: recreate it with "
                                f"`{tcd_recipes.RECREATE if method == 'tcd' else lcm_recipes.RECREATE}`")
    info = json.loads(meta_file.read_text())
    student = tcd_recipes.load_shipped(sd) if method == "tcd" else lcm_recipes.load_shipped(sd, "student")
    return student, {"sd_student": info["command"], "sd_train_updates": info["recipe"]["steps"],
                     "sd_train_seconds": info["train_seconds"]}


def add_sd_rows(ev: Evaluation, model: str, result: dict, seconds: float, *, nfe: int | None, steps: int | None,
                metrics: Sequence[str] = SD_METRICS, **extra) -> None:
    """The per-seed runs of recipes.lcm.evaluate / minisd.evaluate / reference scores as rows of `ev` (KID with its
    se), for the `metrics` a run holds."""
    for run in result["runs"]:
        for metric in metrics:
            if metric in run:
                ev.add(SD, model, metric, run[metric], seconds, nfe=nfe, steps=steps, se=run.get(f"{metric}_se"),
                       **extra)


_SHIPPED_TEACHER: dict[tuple, tuple[dict, float]] = {}   # (n, w, seeds) -> (minisd.evaluate's result, wall seconds)


def add_sd_references(ev: Evaluation, sd, n: int, w: float, seeds: Sequence[int], *, shipped: bool, data: bool = True,
                      metrics: Sequence[str] = SD_METRICS) -> None:
    """The reference rows of every mini-SD benchmark: the guided teacher's 25-step DDIM ("teacher", nfe 50; seconds
    per seed, sampling and scoring together) and, with `data`, the training digits ("data"). The shipped mini SD's
    (`shipped`) teacher is evaluated once per process and setting: the leaderboard runs several of these benchmarks
    on the same seeds."""
    key = (n, w, tuple(seeds))
    if shipped and key in _SHIPPED_TEACHER:
        r, sec = _SHIPPED_TEACHER[key]
    else:
        r, sec = timed(lambda: minisd.evaluate(sd, n, 25, w, seeds))
        if shipped:
            _SHIPPED_TEACHER[key] = r, sec
    add_sd_rows(ev, "teacher", r, sec / len(seeds), nfe=50, steps=25, w=w, sampler="ddim", n=n, metrics=metrics)
    if data:
        floor = [minisd.reference_scores(min(n, 500), seed=s) for s in seeds]
        add_sd_rows(ev, "data", {"runs": floor}, 0.0, nfe=None, steps=None, n=min(n, 500), metrics=metrics)


def rows_sd(method: str, ev: Evaluation, mode: str, b: dict, device, gammas: Sequence[float | None],
            sweep_steps: Sequence[int] = ()) -> dict:
    """The mini SD: the guided teacher's 25-step DDIM ("teacher", nfe 50), the training digits ("data"), the student
    at STUDENT_STEPS (the first gamma) and, for TCD, every gamma at `sweep_steps`. Runs on the CPU (the evaluation
    pipeline's device); returns the meta fields."""
    sd = sdlib.from_pipeline(sdlib.tiny_sd_pipeline(seed=0)) if mode == "smoke" else minisd.load_mini_sd()
    student, meta = _sd_student(method, sd, b, mode)
    w = minisd.DEFAULT_W
    n, seeds = b["sd_n"], ev.seeds
    per = lambda t: t / len(seeds)              # wall seconds of one seed's samples AND scores (evaluate does both)
    add_sd_references(ev, sd, n, w, seeds, shipped=mode != "smoke")
    todo = [(k, gammas[0]) for k in STUDENT_STEPS] + [(k, g) for k in sweep_steps for g in gammas[1:]]
    for k, gamma in todo:
        if method == "tcd":
            r, sec = timed(lambda: tcd_recipes.evaluate(sd, student, n, k, w, seeds, gamma))
        else:
            r, sec = timed(lambda: lcm_recipes.evaluate(sd, student, n, k, w, seeds))
        extra = {"gamma": gamma} if gamma is not None else {}
        add_sd_rows(ev, method, r, per(sec), nfe=k, steps=k, w=w, sampler="sss" if method == "tcd" else "lcm", n=n,
                    **extra)
    return {**meta, "sd_n": n, "sd_w": w, "sd_seconds": "per seed, sampling and scoring together"}


def tc_summary(rows: list[dict], method: str) -> str:
    """2D: the student at each step count (and gamma) with SWD, precision/recall and flow-map error (mean ± std),
    its SWD over the teacher's best; mini SD: adherence, held-out KID and FD of teacher, data and student."""
    out = lines_over_best(rows, ("checkerboard", "gmm"), lambda r, _: r["model"] in (method, "data"),
                          key=("dataset", "model", "nfe", "gamma"))
    sd_rows = side_by_side([r for r in rows if r["dataset"] == SD], ("dataset", "model", "nfe", "gamma"))
    return (table(out, ["dataset", "model", "nfe", "gamma", "swd", "swd / teacher best", "in_squares", "precision",
                        "recall", "flow_map_err_exact"])
            + "\n\n" + table(sd_rows, ["dataset", "model", "nfe", "gamma", "adherence", "colour_adherence",
                                       "kid_heldout", "fd_heldout", "kid_train"]))


def run(method: str, mode: str, seed: int, device, gammas: Sequence[float | None], sweep_steps: Sequence[int] = ()
        ) -> tuple[list[dict], dict]:
    device = torch.device(device) if device is not None else default_device()
    b = tc_budget(mode)
    ev = Evaluation(seed, device)
    rows_2d(method, ev, mode, b, seed, device, gammas)
    meta = rows_sd(method, ev, mode, b, device, gammas, sweep_steps)
    rows = ev.rows()
    print(tc_summary(rows, method))
    return rows, {**b, **meta, "eval_seeds": ev.seeds, "pr_n": PR_N, "student_steps": list(STUDENT_STEPS),
                  "gammas": [g for g in gammas if g is not None], "sweep_steps": list(sweep_steps)}


@register("lcm", "LCM: LCM-recipe consistency distillation on 2D and the shipped mini-SD LCM, 1/2/4/8 steps")
def bench_lcm(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Latent consistency models (Luo et al. 2023). 2D: consistency distillation of the shipped vp teachers with
    LCM's recipe (one DDIM step of the teacher per interval, target EMA 0.9, squared L2), students (model "lcm")
    sampled with LCM's multistep sampler at 1, 2, 4, 8 steps beside the teacher's DPM-Solver++ sweep ("teacher") and
    the data floor ("data"); on gmm the flow-map error to the exact mixture teacher. Mini SD (dataset "mini-sd"):
    the shipped LCM student (data/lcm) at 1, 2, 4, 8 steps, w = minisd.DEFAULT_W, beside the guided teacher's
    25-step DDIM and the real training digits: adherence, colour/thickness adherence, KID/FD against held-out digits
    and KID against the training digits. Mean ± std over the evaluation seeds."""
    return run("lcm", mode, seed, device, (None,))
