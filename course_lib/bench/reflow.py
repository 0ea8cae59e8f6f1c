"""`bench reflow`: rectified flow and reflow (Liu et al. 2022) on the shipped flow-matching teachers."""
from __future__ import annotations

import torch

from ..config import default_device, pick
from ..distill import reflow
from ..grids import uniform
from ..plotting import table
from ..recipes.reflow import DIGITS_DIR, load_digits_flow, reflow_2d_budget, reflow_2d_models
from ..samplers import dpm_solver_pp_2m, euler
from ..teachers import load_teacher
from . import register
from .core import (Evaluation, NFES, PR_N, digit_labels, digits_floor, digits_n, lines_over_best, nfe, noise, per_seed,
                   pm, score_2d, score_digits, seed_inputs, sweep_2d, timed, train_fields)

REFLOW_NFES = (1, 2, 4, 64)


@register("reflow", "rectified flow and reflow (1-RF, 2-RF, 3-RF, 1-step distillations), SWD and straightness")
def bench_reflow(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Rectified flow and reflow (Liu et al. 2022) on the shipped 2D flow-matching teachers: "1-rf" (the teacher),
    "2-rf", "3-rf" sampled with Euler at NFE 1, 2, 4, 64 (every score_2d metric: swd, in_squares on the
    checkerboard, precision / recall and "flow_map_err_exact" on gmm: the distance to the exact mixture teacher's
    rf ODE solution from the same noise, which reflow and its distillations are meant to keep), their straightness
    S(Z) measured on 64-step Euler paths ("straightness", nfe = 64), and the 1-step distillations "1-rf-distill",
    "2-rf-distill" (nfe 1). Teacher rows: the data floor and the teacher with Euler and Heun at NFE 1..128 (its
    best SWD is the target). Models are trained once; every row is evaluated over the evaluation seeds. Digits:
    the shipped digits 2-RF and its 1-step distillation (data/reflow), when present."""
    device = torch.device(device) if device is not None else default_device()
    b = reflow_2d_budget(mode)
    n = pick(mode, smoke=250, laptop=5000, full=25_000)          # per evaluation seed
    ev = Evaluation(seed, device)
    for ds in ("checkerboard", "gmm"):
        models, secs = reflow_2d_models(ds, b, seed, progress=mode != "smoke", device=device)
        teacher = models["1-rf"]
        for s in ev.seeds:
            ref, x1, exact = seed_inputs(ev, ds, teacher.process, n, s, device)
            for sampler in ("euler", "heun"):
                sweep_2d(ev, teacher, teacher.process, ds, f"fm-teacher-{sampler}", sampler, ref,
                         pick(mode, smoke=(1, 2, 4), laptop=NFES, full=NFES), s + 3, device, exact)
            for name in ("1-rf", "2-rf", "3-rf"):
                m = models[name]
                extra = {} if name == "1-rf" else train_fields(secs[name], b["steps"])
                for k in REFLOW_NFES:
                    x, sec = timed(lambda: euler(m, x1, uniform(k), m.process), device)
                    score_2d(ev, ds, name, x, ref, sec, nfe=nfe("euler", k), steps=k, compare=True, exact=exact,
                             sampler="euler", n=n, **extra)
                st, sec = timed(lambda: reflow.straightness(m, x1[:2000], 64), device)
                ev.add(ds, name, "straightness", st, sec, nfe=nfe("euler", 64), steps=64, sampler="euler",
                       n=min(n, 2000), **extra)
            for name in ("1-rf-distill", "2-rf-distill"):
                m = models[name]
                x, sec = timed(lambda: euler(m, x1, uniform(1), m.process), device)
                score_2d(ev, ds, name, x, ref, sec, nfe=nfe("euler", 1), steps=1, compare=True, exact=exact,
                         sampler="euler", n=n, **train_fields(secs[name], b["steps"]))
    reflow_digits_rows(ev, mode, device)
    rows = ev.rows()
    print(reflow_summary(rows))
    return rows, {**b, "n": n, "swd_projections": 256, "pair_solver": "heun", "eval_seeds": ev.seeds, "pr_n": PR_N}


def reflow_summary(rows: list[dict]) -> str:
    """Per dataset and model: the metrics side by side (mean ± std over seeds), each model's SWD over the teacher's
    best (the fm-teacher row of lowest mean SWD) and its straightness over 1-RF's, both per seed, then mean ± std."""
    out = lines_over_best(rows, dict.fromkeys(r["dataset"] for r in rows if r["metric"] == "swd"),
                          lambda r, _: r["model"] in ("1-rf", "2-rf", "3-rf", "1-rf-distill", "2-rf-distill"),
                          skip=(), teacher=lambda m: m.startswith("fm-teacher"))
    s1 = {}                                                # each dataset's first 1-RF straightness row
    for r in rows:
        if r["model"] == "1-rf" and r["metric"] == "straightness":
            s1.setdefault(r["dataset"], r)
    for d in out:
        if "straightness" in d["rows"] and d["dataset"] in s1:
            d["straightness / 1-rf"] = pm(*per_seed(d["rows"]["straightness"], s1[d["dataset"]]))
    return table(out, ["dataset", "model", "nfe", "swd", "swd / teacher best", "in_squares", "precision", "recall",
                       "flow_map_err_exact", "straightness", "straightness / 1-rf"])


def reflow_digits_rows(ev: Evaluation, mode: str, device: str | torch.device) -> None:
    """Digits: the diffusion teacher (DPM-Solver++ 16 steps: the solver that made the pairs; and read as a flow,
    "1-rf", with Euler), the shipped 2-RF (Euler 1, 4) and its 1-step distillation, scored with
    classifier.digits_scores beside the data floor (1-4 step models on thousands of samples per seed, the teacher on
    a few hundred: the first of the same noise)."""
    if not (DIGITS_DIR / "digits-2rf").is_dir():
        return
    big, small = digits_n(mode, cheap=True), digits_n(mode, cheap=False)
    teacher = load_teacher("digits", device=device)
    models = [("1-rf", reflow.RFView(teacher), (1, 4)),
              ("2-rf", load_digits_flow("digits-2rf", device=device), (1, 4))]
    if (DIGITS_DIR / "digits-2rf-distill1").is_dir():
        models.append(("2-rf-distill", load_digits_flow("digits-2rf-distill1", device=device), (1,)))
    for s in ev.seeds:
        digits_floor(ev, s)
        x1 = noise((max(big, small), 1, 16, 16), s + 6, device)
        y = lambda k: digit_labels(k, device, teacher.net.num_classes)
        x, sec = timed(lambda: dpm_solver_pp_2m(teacher, x1[:small], uniform(16), teacher.process, cond=y(small)),
                       device)
        score_digits(ev, "teacher", x, sec, nfe=nfe("dpmpp2m", 16), steps=16, sampler="dpmpp2m")
        for name, m, ks in models:
            for k in ks:
                x, sec = timed(lambda: euler(m, x1[:big], uniform(k), m.process, cond=y(big)), device)
                score_digits(ev, name, x, sec, nfe=nfe("euler", k), steps=k, sampler="euler")
