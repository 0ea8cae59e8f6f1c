"""`bench flowmap`: the flow-map students of notebook 14 (MeanFlow, shortcut models, sCM; distill.flowmap) on the 2D
datasets, at 1, 2 and 4 steps from one network, beside the shipped teacher's DPM-Solver++ sweep and, on gmm, every
student's error against the EXACT flow map of the mixture over a grid of (t, s) pairs, with consistency distillation
(bench cd's student and recipe) and progressive distillation (bench cd's same-cost one-step PD student) measured the
same way.

Rows (schema 3, core.Evaluation over the evaluation seeds): "swd"; "recall" and "precision" on gmm; "in_squares" on
the checkerboard; every student row carries train_updates, train_seconds and teacher_evals (teacher evaluations per
sample summed over the training batches; 0 from scratch). "flow_map_err_grid" (gmm): the mean over the grid's cells
s < t of E||jump(x_t, t -> s) - X*(x_t, t -> s)|| (distill.flowmap.flow_map_error), its cells (the mean over seeds)
in the row's "grid" ([i][j]: from grid_ts[i] to grid_ts[j], null where s >= t), "err_s_min" the mean of the last
column (s = 0, where a consistency model is trained: its t_min) and "err_off_s_min" the mean of the rest. Times are
rf times; a vp-cosine model (sCM, CD, PD) is measured at the vp times of the same log-SNR (reflow.RFView's map) and
its error in rf units (divided by the vp state's scale 1 / sqrt((1 - s)^2 + s^2)), so every cell compares the
same noise levels and the same units.

Digits rows (bench.flowmap_digits.digits_rows, its meta under "digits"): every student at 1 and 2 steps against the
held-out digits, beside bench cd's CD and bench pd's PD students and the 16-step teacher.

Mini-SD rows (bench.flowmap_minisd.minisd_rows, its meta under "minisd"): the MeanFlow flow-map LoRA of the guided
mini SD at 1, 2, 4 steps beside the guided teacher's 25-step DDIM (smoke: a few recipe updates on the tiny SD).
"""
from __future__ import annotations

import torch

from ..config import default_device, pick
from ..distill.flowmap import flow_map_error
from ..grids import uniform
from ..plotting import table
from ..processes import RectifiedFlow, VPCosine
from ..recipes import flowmap as recipes
from ..samplers import ddim
from ..teachers import load_teacher
from . import register
from .cd import _pd_same_teacher_evals, _sample_cm, _train_2d, cm_budget, student_grid
from .flowmap_digits import digits_rows, verdict as digits_verdict
from .flowmap_minisd import minisd_rows
from .core import (Evaluation, PR_N, lines_over_best, pm, prior, score_2d, seed_inputs, spread_row, sweep_2d, timed,
                   train_fields)

TEACHER_NFES = (1, 2, 4, 8, 16, 32, 64)
GRID_METRIC = "flow_map_err_grid"


def grid_times(k: int) -> torch.Tensor:
    """The error grid's rf times: k evenly spaced from 1 (noise) to 0 (data), float64."""
    return torch.linspace(1.0, 0.0, k, dtype=torch.float64)


def vp_times(ts_rf: torch.Tensor, vp: VPCosine) -> torch.Tensor:
    """The vp-cosine times of the same log-SNR as rf times ts_rf (reflow.RFView's map; 1 -> 1, 0 -> 0)."""
    tt = ts_rf.clamp(1e-12, 1 - 1e-12)
    return vp.t_from_log_snr(2.0 * torch.log((1 - tt) / tt)).clamp(0.0, 1.0)


def grid_error(model, dataset: str, ts_rf: torch.Tensor, n: int, seed: int, exact_steps: int) -> torch.Tensor:
    """(K, K) errors of `model`'s one-call jumps against the exact flow map (flow_map_error) at rf times ts_rf, in rf
    units: a vp-cosine model at the matching vp times, its error times sqrt((1 - s)^2 + s^2) (the vp state is the rf
    state times 1 / sqrt((1 - s)^2 + s^2)). Same x0 and eps (from `seed`) for every model."""
    process = model.process
    g = torch.Generator().manual_seed(seed)
    if isinstance(process, RectifiedFlow):
        return flow_map_error(model, dataset, process, ts_rf, n, g, exact_steps)
    err = flow_map_error(model, dataset, process, vp_times(ts_rf, process), n, g, exact_steps)
    return err * ((1 - ts_rf) ** 2 + ts_rf ** 2).sqrt()[None, :]


def _grid_rows(grids: dict[str, list[torch.Tensor]], ts_rf: torch.Tensor, device, extras: dict[str, dict]) -> list:
    """One "flow_map_err_grid" row per model: the mean over cells, per seed, with the per-cell mean over seeds."""
    rows = []
    for model, per_seed in grids.items():
        valid = ~torch.isnan(per_seed[0])
        last = torch.zeros_like(valid)
        last[:, -1] = True
        cells = torch.stack(per_seed).mean(0)
        rows.append(spread_row(
            "gmm", model, GRID_METRIC, [float(e[valid].mean()) for e in per_seed], 0.0, nfe=1, steps=1, device=device,
            grid_ts=[round(float(t), 4) for t in ts_rf],
            grid=[[None if torch.isnan(v) else round(float(v), 5) for v in line] for line in cells],
            err_s_min=float(cells[valid & last].mean()), err_off_s_min=float(cells[valid & ~last].mean()),
            **extras.get(model, {})))
    return rows


@register("flowmap", "MeanFlow, shortcut and sCM students (1/2/4 steps) on 2D; gmm: error vs the exact flow map")
def bench_flowmap(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """The flow-map students of recipes.flowmap (models meanflow, meanflow-distill, shortcut, scd, sct) trained once per
    dataset with the budget of `mode`, each sampled at 1, 2, 4 steps (nfe = steps), beside the {dataset}-vp teacher's
    DPM-Solver++ sweep ("teacher") and the data floor ("data"); on gmm the (t, s) error grid of every student, of
    consistency distillation ("cd", bench cd's recipe) and of a one-step PD student at CD's teacher cost ("pd")."""
    device = torch.device(device) if device is not None else default_device()
    b = recipes.budget(mode)
    n = b["n"]
    ev = Evaluation(seed, device)
    ts_rf = grid_times(b["grid_k"])
    grids: dict[str, list[torch.Tensor]] = {}
    grid_extra: dict[str, dict] = {}
    meta: dict = {}
    for ds in recipes.DATASETS:
        teacher = load_teacher(f"{ds}-vp", device=device)
        students = {m: recipes.train(m, ds, b, seed, device, progress=mode != "smoke") for m in recipes.METHODS}
        others = {}
        if ds == "gmm":
            cb = cm_budget(mode)
            cd, cd_secs = _train_2d("cd", ds, cb, seed, device, mode != "smoke")
            pd_student, pd_secs, pd_meta = _pd_same_teacher_evals(teacher, ds, cb, seed, device, mode)
            others = {"cd": (cd, train_fields(cd_secs, cb["steps"])),
                      "pd": (pd_student, train_fields(pd_secs, pd_meta["pd_updates"]))}
            meta.update({"cd_budget": cb, **pd_meta})
        for s in ev.seeds:
            ref, x1, exact = seed_inputs(ev, ds, teacher.process, n, s, device)
            sweep_2d(ev, teacher, teacher.process, ds, "teacher", "dpmpp2m", ref,
                     pick(mode, smoke=(1, 2, 4), laptop=TEACHER_NFES, full=TEACHER_NFES), s + 3, device, exact)
            for name, res in students.items():
                fields = {**train_fields(res.seconds, res.updates), "teacher_evals": res.teacher_evals}
                z1 = prior(res.student.process, (n, 2), s + 3, device)
                for k in recipes.STEPS:
                    x, sec = timed(lambda: recipes.sample(res.student, name, z1, k, s + 4), device)
                    score_2d(ev, ds, name, x, ref, sec, nfe=k, steps=k, compare=True,
                             sampler="consistency" if name in ("scd", "sct") else "flow_map", n=n, **fields)
                if ds == "gmm":
                    grids.setdefault(name, []).append(grid_error(res.student, ds, ts_rf, b["grid_n"], s + 5,
                                                                 b["grid_exact_steps"]))
                    grid_extra[name] = fields
            for name, (model, fields) in others.items():
                if name == "cd":
                    x, sec = timed(lambda: _sample_cm(model, x1, 1, s + 4, model.process, model.t_min,
                                                      grid=student_grid("cd", cb, model.process, model.t_min)), device)
                    sampler = "consistency"
                else:
                    x, sec = timed(lambda: ddim(model, x1, uniform(1), model.process), device)
                    sampler = "ddim"
                evals = cb["steps"] * cb["batch"] * 2           # CD's Heun step and PD's two DDIM steps: 2 each
                score_2d(ev, ds, name, x, ref, sec, nfe=1, steps=1, compare=True, exact=exact, sampler=sampler, n=n,
                         **fields, teacher_evals=evals)
                grids.setdefault(name, []).append(grid_error(model, ds, ts_rf, b["grid_n"], s + 5,
                                                             b["grid_exact_steps"]))
                grid_extra[name] = {**fields, "teacher_evals": evals}
    rows = ev.rows() + _grid_rows(grids, ts_rf, device, grid_extra)
    digit_rows, meta["digits"] = digits_rows(mode, seed, device)
    rows += digit_rows
    sd_rows, meta["minisd"] = minisd_rows(mode, seed, device)
    rows += sd_rows
    print(summary(rows))
    print(digits_verdict(rows))
    return rows, {**b, "eval_seeds": ev.seeds, "pr_n": PR_N, "student_steps": list(recipes.STEPS),
                  "recipes": {m: repr(r) for m, r in recipes.recipes().items()}, **meta}


def _find(rows, model, metric, steps=None):
    return next((r for r in rows if r["model"] == model and r["metric"] == metric
                 and (steps is None or r["steps"] == steps)), None)


def targets(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """Issue 26's 2D targets as (target, holds (None: not measured), the numbers): gmm at 1 step, MeanFlow and shortcut
    within 1.3x of the teacher's best SWD; sCD at 2 steps within 1.1x; recall within 10% of the teacher's (its row at
    the best SWD); every flow-map student's error below CD's in every grid cell except s = t_min (the last column)."""
    mine = [r for r in rows if r["dataset"] == "gmm"]
    best = min((r for r in mine if r["model"] == "teacher" and r["metric"] == "swd"), key=lambda r: r["value"],
               default=None)
    out = []
    t_recall = None if best is None else _find(mine, "teacher", "recall", best["steps"]) or max(
        (r for r in mine if r["model"] == "teacher" and r["metric"] == "recall"), key=lambda r: r["nfe"], default=None)
    for model, steps, limit in () if best is None else (("meanflow", 1, 1.3), ("shortcut", 1, 1.3), ("scd", 2, 1.1)):
        r = _find(mine, model, "swd", steps)
        if r is None:
            continue
        ratio = r["value"] / best["value"]
        out.append((f"gmm {model} {steps} step SWD <= {limit}x teacher best", ratio <= limit,
                     f"{pm(r['value'], r.get('std'))} / {best['value']:.4f} = {ratio:.2f}x"))
        rec = _find(mine, model, "recall", steps)
        if rec is not None and t_recall is not None:
            out.append((f"gmm {model} {steps} step recall within 10% of the teacher's",
                        rec["value"] >= 0.9 * t_recall["value"],
                        f"{pm(rec['value'], rec.get('std'))} vs teacher {t_recall['value']:.3f}"))
    cd = _find(mine, "cd", GRID_METRIC)
    if cd is not None:
        cd_cells = torch.tensor([[float("nan") if v is None else v for v in line] for line in cd["grid"]])
        for model in recipes.METHODS:
            r = _find(mine, model, GRID_METRIC)
            if r is None:
                continue
            cells = torch.tensor([[float("nan") if v is None else v for v in line] for line in r["grid"]])
            off = ~torch.isnan(cells)
            off[:, -1] = False
            below = int((cells[off] < cd_cells[off]).sum())
            out.append((f"gmm {model} flow-map error below CD's off s = t_min", below == int(off.sum()),
                        f"{below}/{int(off.sum())} cells; mean off s_min {r['err_off_s_min']:.3f} vs CD "
                        f"{cd['err_off_s_min']:.3f}; at s_min {r['err_s_min']:.3f} vs CD {cd['err_s_min']:.3f}"))
    return out


def summary(rows: list[dict]) -> str:
    """Per dataset, the students and the teacher's best side by side (mean ± std over seeds, SWD over the teacher's
    best per seed), the grid errors, and each target: holds / does NOT hold, with its numbers."""
    lines = lines_over_best(rows, recipes.DATASETS,
                            lambda r, best: r["model"] in recipes.METHODS or r["model"] in ("data", "cd", "pd")
                            or (best is not None and r["model"] == "teacher" and r["nfe"] == best["nfe"]))
    grid = [{"model": r["model"], "mean": pm(r["value"], r.get("std")), "off s_min": f"{r['err_off_s_min']:.4f}",
             "s_min": f"{r['err_s_min']:.4f}", "updates": r.get("train_updates")}
            for r in rows if r["metric"] == GRID_METRIC]
    verdicts = "\n".join(f"{'holds' if ok else 'does NOT hold'}: {name} ({numbers})" for name, ok, numbers in
                         targets(rows))
    return (table(lines, ["dataset", "model", "nfe", "swd", "swd / teacher best", "recall", "in_squares"])
            + "\n\n" + table(grid, ["model", "mean", "off s_min", "s_min", "updates"]) + "\n\n" + verdicts)
