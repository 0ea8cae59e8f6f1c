"""`bench hypersd`: Hyper-SD (Ren et al. 2024) on the shipped 2D teachers: TSCD's stages 8 -> 4 -> 2 -> 1 ("tscd"),
+ reward feedback ("tscd-reward"), + score distillation ("hypersd"), and consistency distillation with the same
teacher evaluations ("cd-same-budget"), each sampled by the unified sampler (TCD's gamma sampler) at 1, 2, 4, 8
steps, beside the teacher's DPM-Solver++ sweep and the data floor (recipes.hypersd)."""
from __future__ import annotations

import torch

from ..config import default_device, pick
from ..distill import hypersd as h
from ..plotting import table
from ..recipes import hypersd as recipe
from ..teachers import load_teacher
from . import register
from .core import (Evaluation, PR_N, lines_over_best, score_2d, seed_inputs, sweep_2d, timed, train_fields)

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
    rows = ev.rows()
    print(summary(rows))
    return rows, {**recipe.describe(b), "n": n, "eval_seeds": ev.seeds, "pr_n": PR_N, "student_steps": list(STEPS)}


def summary(rows: list[dict]) -> str:
    """Per dataset: every model at each step count, metrics side by side (mean ± std over the evaluation seeds), with
    its SWD over the teacher's best, per seed."""
    lines = lines_over_best(rows, ("checkerboard", "gmm"), lambda r, _: r["model"] in (*MODELS, "data"),
                            key=("dataset", "model", "nfe", "gamma"))
    return table(lines, ["dataset", "model", "nfe", "gamma", "swd", "swd / teacher best", "in_squares", "precision", "recall",
                         "reward", "flow_map_err_exact"])
