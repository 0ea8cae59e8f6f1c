"""`bench hypersd`: Hyper-SD (Ren et al. 2024) on the shipped 2D teachers: TSCD's stages 8 -> 4 -> 2 -> 1 ("tscd"),
+ reward feedback ("tscd-reward"), + score distillation ("hypersd"), and consistency distillation with the same
teacher evaluations ("cd-same-budget"), each sampled by the unified sampler (TCD's gamma sampler) at 1, 2, 4, 8
steps, beside the teacher's DPM-Solver++ sweep and the data floor (recipes.hypersd); on the mini Stable Diffusion
(dataset "mini-sd", as bench lcm and tcd) the unified LoRA ("tscd", "tscd-reward": data/hypersd) at 1, 2, 4, 8
steps beside the guided teacher's 25-step DDIM (`rows_minisd`)."""
from __future__ import annotations

from dataclasses import replace

import torch

from .. import minisd
from ..config import default_device, pick
from ..distill import hypersd as h
from ..plotting import table
from ..recipes import hypersd as recipe
from ..teachers import load_teacher
from . import register
from .core import (Evaluation, PR_N, lines_over_best, score_2d, seed_inputs, side_by_side, sweep_2d, timed,
                   train_fields)
from .lcm import add_sd_rows, add_sd_references

STEPS = (1, 2, 4, 8)
TEACHER_NFES = (1, 2, 4, 8, 16, 32, 64)
MODELS = ("tscd", "tscd-reward", "hypersd", "cd-same-budget")
GAMMAS = (1.0, 0.5, 0.0)    # the unified sampler's gamma sweep (field "gamma"): 1 multistep consistency sampling,
                            # 0 deterministic (DDIM jumps)


@register("hypersd", "Hyper-SD on 2D: TSCD 8->4->2->1, + reward, + score distillation, CD at equal cost; 1/2/4/8 steps")
def bench_hypersd(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Hyper-SD's ablations (recipes.hypersd.train_2d) of the shipped gmm and checkerboard vp teachers, trained once
    per run (seed: the training seed), each sampled with hypersd.sample (the gamma sampler on the trailing grid)
    at 1, 2, 4, 8 steps for every gamma in GAMMAS (field "gamma"; one row at one step). Metrics: every score_2d metric (recall on gmm
    shows the reward's diversity cost; flow_map_err_exact the distance to the exact mixture teacher's map), plus
    "reward" (the mean of the known reward, recipes.hypersd.reward_fn). train_updates counts updates that call
    the teacher (TSCD stages, the reward stage's TSCD term) or the critic (score stage iterations)."""
    device = torch.device(device) if device is not None else default_device()
    b = recipe.budget(mode)
    n = pick(mode, smoke=250, laptop=5000, full=25_000)
    ev = Evaluation(seed, device)
    for ds in ("checkerboard", "gmm"):
        teacher = load_teacher(f"{ds}-vp", device=device)
        students = recipe.train_2d(teacher, ds, b, seed, progress=mode != "smoke")
        reward = recipe.reward_fn(ds)
        for s in ev.seeds:
            ref, x1, exact = seed_inputs(ev, ds, teacher.process, n, s, device)
            sweep_2d(ev, teacher, teacher.process, ds, "teacher", "dpmpp2m", ref,
                     pick(mode, smoke=(1, 2, 4), laptop=TEACHER_NFES, full=TEACHER_NFES), s + 3, device, exact)
            ev.add(ds, "data", "reward", float(reward(ref.float()).mean()), nfe=None, steps=None, n=n)
            for name in MODELS:
                student, secs, updates = students[name]
                for k in STEPS:
                    for gamma in (GAMMAS if k > 1 else GAMMAS[:1]):     # one step: gamma changes nothing
                        x, sec = timed(lambda: h.sample(student, x1, k, student.process, gamma=gamma,
                                                        generator=torch.Generator().manual_seed(s + 4)), device)
                        extra = dict(sampler="tcd", gamma=gamma, n=n, **train_fields(secs, updates))
                        score_2d(ev, ds, name, x, ref, sec, nfe=k, steps=k, compare=True, exact=exact, **extra)
                        ev.add(ds, name, "reward", float(reward(x.float().cpu()).mean()), sec, nfe=k, steps=k,
                               **extra)
    sd_meta = rows_minisd(ev, mode)
    rows = ev.rows()
    print(summary(rows))
    return rows, {**recipe.describe(b), "n": n, "eval_seeds": ev.seeds, "pr_n": PR_N, "student_steps": list(STEPS),
                  **sd_meta}


SD = "mini-sd"                  # the dataset name of the mini Stable Diffusion rows (bench lcm, tcd, flowmap alike)
SD_MODELS = ("tscd", "tscd-reward")
SD_METRICS = ("adherence", "colour_adherence", "kid_heldout", "fd_heldout")


def rows_minisd(ev: Evaluation, mode: str) -> dict:
    """The mini SD rows (dataset "mini-sd", as bench lcm and tcd): the guided teacher's 25-step DDIM ("teacher",
    nfe 50) and the unified LoRA ("tscd", "tscd-reward") at 1, 2, 4, 8 steps of TCD's sampler
    (recipes.hypersd.evaluate_minisd). Laptop and full: the SHIPPED LoRAs of data/hypersd; smoke: the recipe (recipes.hypersd.train_minisd) for one update per
    stage at batch 4 on 20 training digits, so the training path runs, evaluated on the first evaluation seed only
    (seconds). CPU (the evaluation pipeline's device)."""
    n = pick(mode, smoke=16, laptop=300, full=1000)
    seeds, w = (ev.seeds[:1] if mode == "smoke" else ev.seeds), recipe.SD_RECIPE.w     # smoke: one seed, seconds
    per = lambda t: t / len(seeds)              # wall seconds of one seed's samples AND scores
    sd = minisd.load_mini_sd()
    add_sd_references(ev, sd, n, w, seeds, shipped=True, data=False, metrics=SD_METRICS)
    meta: dict = {"sd_n": n, "sd_w": w, "sd_seconds": "per seed, sampling and scoring together"}
    if mode == "smoke":
        small = replace(recipe.SD_RECIPE, stage_steps=1, reward_steps=1, batch=4)
        parts = recipe.train_minisd(sd, small, minisd.digit_batches(sd, n_images=20), progress=False,
                                    log=lambda *a: None)
        student = recipe.TCDModel(sd.model, w_fixed=w)
        students = {name: (sd, student, weights, secs, small.stage_steps * len(h.SEGMENTS) + (name == "tscd-reward"))
                    for name, (weights, secs) in parts.items()}
        meta["sd_student"] = "the mini SD, recipe for 1 update per stage at batch 4"
    else:
        students = {}
        for name in SD_MODELS:                  # each shipped LoRA on its own copy of the base
            base = minisd.load_mini_sd()
            info = recipe.shipped_info(name)
            students[name] = (base, recipe.load_shipped_minisd(base, name), None, info["train_seconds"],
                              info["updates"])
        meta["sd_student"] = recipe.SD_RECREATE
    for name, (base, student, weights, secs, updates) in students.items():
        if weights is not None:
            recipe.set_adapter_weights(base.model, weights)
        for k in STEPS:
            res, sec = timed(lambda: recipe.evaluate_minisd(base, student, n, k, seeds))
            add_sd_rows(ev, name, res, per(sec), nfe=k, steps=k, w=w, sampler="tcd", gamma=res["gamma"], n=n,
                        metrics=SD_METRICS, **train_fields(secs, updates))
    return meta


def summary(rows: list[dict]) -> str:
    """Per dataset: every model at each step count, metrics side by side (mean ± std over the evaluation seeds), with
    its SWD over the teacher's best, per seed."""
    lines = lines_over_best(rows, ("checkerboard", "gmm"), lambda r, _: r["model"] in (*MODELS, "data"),
                            key=("dataset", "model", "nfe", "gamma"))
    sd_rows = side_by_side([r for r in rows if r["dataset"] == SD], ("dataset", "model", "nfe", "gamma"))
    return (table(lines, ["dataset", "model", "nfe", "gamma", "swd", "swd / teacher best", "in_squares", "precision",
                          "recall", "reward", "flow_map_err_exact"])
            + ("\n\n" + table(sd_rows, ["dataset", "model", "nfe", "gamma", *SD_METRICS]) if sd_rows else ""))
