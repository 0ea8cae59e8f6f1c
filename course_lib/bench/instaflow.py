"""`bench instaflow`: InstaFlow (Liu et al. 2024) and the paper's ablation, direct distillation."""
from __future__ import annotations

import time

import torch

from ..config import pick
from ..plotting import table
from . import register
from .core import (conditional_reference, digits_acc, digits_fd, digits_floor_row, nfe, noise, prior, row,
                   side_by_side, timed, train_fields)


def sweep_rows(records: list[dict], dataset: str, n: int, device: str | torch.device) -> list[dict]:
    """Rows of the capacity sweep (distill.instaflow.instaflow_sweep's records): "sweep-<coupling>" at one step,
    "swd" and "heldout_err", fields coupling, width, n_pairs, train_steps, train_seconds, train_updates."""
    rows = []
    for r in records:
        extra = dict(coupling=r["coupling"], width=r["width"], n_pairs=r["n_pairs"], train_steps=r["train_steps"],
                     train_seconds=r["train_seconds"], train_updates=r["train_steps"], n=n)
        for metric in ("swd", "heldout_err"):
            rows.append(row(dataset, f"sweep-{r['coupling']}", metric, r[metric], 0.0, nfe=1, steps=1, device=device,
                            **extra))
    return rows


@register("instaflow", "InstaFlow against direct distillation (gmm-overlap, digits) and the capacity sweep")
def bench_instaflow(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """InstaFlow (Liu et al. 2024) on the conditional gmm-overlap teacher, and the paper's ablation.

    Models: "teacher" (guided with w, DPM-Solver++ 64 steps, each two network evaluations: nfe 128),
    "2-rf" (conditional reflow from the teacher's weights, Euler 1 and 4 steps, no guidance at use),
    "instaflow" (2-RF distilled to 1 step) and "direct-distill" (the teacher's triplets distilled to 1 step with the
    same number of updates as reflow + distillation). Metrics "swd" (against exact class-conditional samples),
    "class_acc" (Bayes classifier of the mixture), "heldout_err" (one-step students: mean squared error against
    their own coupling's endpoints on noise they never saw), "straightness" (teacher read as a flow; 2-RF).
    Capacity sweep rows: "sweep-direct" / "sweep-reflow" (fields width, n_pairs, train_steps), on gmm-overlap and
    on the unconditional 8-mode "gmm" (its shipped diffusion teacher, its 2-RF; teacher and 2-RF rows give the SWD of
    each coupling's endpoints, which the students imitate). Digits: the shipped
    data/instaflow models (trained on a GPU by `python -m course_lib.distill.instaflow train-digits`)."""
    from ..config import default_device
    from ..data2d import sample_2d
    from ..distill import instaflow, reflow
    from ..distill.instaflow import instaflow_2d_budget, instaflow_2d_models, instaflow_sweep, instaflow_unconditional
    from ..grids import uniform
    from ..metrics import sliced_wasserstein
    from ..samplers import dpm_solver_pp_2m, euler

    device = torch.device(device) if device is not None else default_device()
    b = instaflow_2d_budget(mode)
    n, ds = b["n"], "gmm-overlap"
    progress = mode != "smoke"
    mix, y_cpu, swd, acc, rows = conditional_reference(ds, n, seed, device)
    y = y_cpu.to(device)
    models, data, secs = instaflow_2d_models(b, seed, progress=progress, device=device)
    updates = {"2-rf": b["reflow_steps"], "instaflow": b["reflow_steps"] + b["distill_steps"],
               "direct-distill": b["reflow_steps"] + b["distill_steps"]}
    teacher, flow2 = models["teacher"], models["2-rf"]
    gt = instaflow.guided(teacher, b["w"])
    x1 = prior(teacher.process, (n, 2), seed + 3, device)
    runs = [("teacher", 64, "dpmpp2m", True,
             lambda: dpm_solver_pp_2m(lambda x, t: gt(x, t, y), x1, uniform(64), teacher.process))]
    runs += [("2-rf", k, "euler", False, lambda k=k: euler(lambda x, t: flow2(x, t, y), x1, uniform(k), flow2.process))
             for k in (1, 4)]
    runs += [(name, 1, "one-step", False, lambda name=name: instaflow.one_step(models[name], x1, y))
             for name in ("instaflow", "direct-distill")]
    for name, k, sampler, guided, fn in runs:
        x, sec = timed(fn, device)
        extra = {"w": b["w"], "sampler": sampler, "n": n,
                 **(train_fields(secs[name], updates[name]) if name in secs else {})}
        common = dict(nfe=nfe(sampler, k, guided), steps=k, device=device, **extra)
        rows += [row(ds, name, "swd", swd(x), sec, **common), row(ds, name, "class_acc", acc(x), sec, **common)]
    # held-out endpoints of each coupling from the evaluation noise (never used in training)
    _, xt = reflow.generate_pairs(gt, x1, b["pair_steps"], "dpmpp2m", cond={"y": y})
    _, x2 = reflow.generate_pairs(flow2, x1, b["flow_pair_steps"], "euler", cond={"y": y})
    targets = {"teacher": xt, "2-rf": x2}
    for name, key in (("instaflow", "2-rf"), ("direct-distill", "teacher")):
        rows.append(row(ds, name, "heldout_err", instaflow.regression_error(models[name], x1, targets[key], y), 0.0,
                        nfe=1, steps=1, device=device, w=b["w"], n=n, coupling=key,
                        **train_fields(secs[name], updates[name])))
    m = min(n, 2000)
    for name, flow, guided in (("teacher", reflow.RFView(gt), True), ("2-rf", flow2, False)):
        s, sec = timed(lambda: reflow.straightness(flow, x1[:m], 64, cond={"y": y[:m]}), device)
        rows.append(row(ds, name, "straightness", s, sec, nfe=nfe("euler", 64, guided), steps=64, device=device,
                        w=b["w"], sampler="euler", n=m))
    rows += sweep_rows(instaflow_sweep({"direct": data["teacher"], "reflow": data["2-rf"]},
                                       {"direct": targets["teacher"], "reflow": targets["2-rf"]}, x1, y, b["sweep"], b,
                                       swd, teacher, ds, seed, progress), ds, n, device)
    # the same sweep where the map is multimodal: the unconditional 8-mode mixture (no labels to split it)
    t0 = time.perf_counter()
    u_data, u_targets, u_teacher = instaflow_unconditional("gmm", b, x1, seed, progress)
    u_sec = time.perf_counter() - t0            # the 2-RF's training and both couplings' pairs
    u_ref = sample_2d("gmm", n, torch.Generator().manual_seed(seed + 1))[0]
    u_swd = lambda a: sliced_wasserstein(a.cpu(), u_ref, n_proj=256, seed=0)
    rows.append(row("gmm", "teacher", "swd", u_swd(u_targets["direct"]), 0.0, nfe=nfe("dpmpp2m", b["pair_steps"]),
                    steps=b["pair_steps"], device=device, sampler="dpmpp2m", n=n))
    rows.append(row("gmm", "2-rf", "swd", u_swd(u_targets["reflow"]), 0.0, nfe=nfe("euler", b["flow_pair_steps"]),
                    steps=b["flow_pair_steps"], device=device, sampler="euler", n=n,
                    **train_fields(u_sec, b["reflow_steps"])))
    rows += sweep_rows(instaflow_sweep(u_data, u_targets, x1, None, b["sweep"], b, u_swd, u_teacher, "gmm", seed,
                                       progress), "gmm", n, device)
    rows += instaflow_digits_rows(mode, seed, device)
    print(instaflow_summary(rows))
    return rows, {**b, "swd_projections": 256}


def instaflow_summary(rows: list[dict]) -> str:
    """The headline (student vs teacher: SWD ratio, class accuracy in points) and the ablation's sweep side by side."""
    head = side_by_side([r for r in rows if not r["model"].startswith("sweep-")], ("dataset", "model", "steps", "nfe"))
    sweep = side_by_side([{**r, "metric": f"{r['coupling']} {r['metric']}"} for r in rows
                          if r["model"].startswith("sweep-")], ("dataset", "width", "n_pairs", "train_steps"))
    teach = {d["dataset"]: d for d in head if d["model"] == "teacher" and ("swd" in d or "digits_fd" in d)}
    for d in head:
        t = teach.get(d["dataset"])
        if t is None or d["model"] in ("teacher", "data"):
            continue
        if "swd" in d and "swd" in t:
            d["swd / teacher"] = d["swd"] / t["swd"]
        if "digits_fd" in d and "digits_fd" in t:
            d["fd / teacher"] = d["digits_fd"] / t["digits_fd"]
        if "class_acc" in d and "class_acc" in t:
            d["acc - teacher (points)"] = 100 * (d["class_acc"] - t["class_acc"])
    return (table(head, ["dataset", "model", "steps", "nfe", "class_acc", "swd", "digits_fd", "heldout_err",
                         "straightness", "swd / teacher", "fd / teacher", "acc - teacher (points)"])
            + "\n\ncapacity sweep (fresh one-step students; direct = the teacher's coupling, reflow = the 2-RF's)\n"
            + table(sweep, ["dataset", "width", "n_pairs", "train_steps", "direct swd", "reflow swd",
                            "direct heldout_err", "reflow heldout_err"]))


def instaflow_digits_rows(mode: str, seed: int, device: str | torch.device) -> list[dict]:
    """Digits: the guided teacher (w of the recipe, DPM-Solver++ 16 steps, the solver of the triplets), the shipped
    conditional 2-RF (Euler 1, 4, 16), InstaFlow (L2, then Lap1) and direct distillation (L2, then Lap1) at one
    step: class accuracy, digits Fréchet distance, and the one-step students' held-out regression error."""
    from ..classifier import DIGITS_FD_N, balanced_labels
    from ..distill import instaflow, reflow
    from ..grids import uniform
    from ..samplers import dpm_solver_pp_2m, euler
    from ..teachers import load_teacher

    if not all((instaflow.DIGITS_DIR / m).is_dir() for m in instaflow.DIGITS_MODELS):
        return []
    w = instaflow.DIGITS_RECIPE["w"]
    n = pick(mode, smoke=64, laptop=DIGITS_FD_N, full=DIGITS_FD_N)
    y = balanced_labels(n).to(device)
    x1 = noise((n, 1, 16, 16), seed + 6, device)
    gt = instaflow.guided(load_teacher("digits", device=device), w)
    flow2 = instaflow.load_digits_model("digits-if-2rf", device=device)
    rows = [digits_floor_row(device)]

    def score(name, k, sampler, x, sec, guided=False, **extra):
        common = dict(nfe=nfe(sampler, k, guided), steps=k, device=device, w=w, sampler=sampler, n=n, **extra)
        rows.extend([row("digits", name, "class_acc", digits_acc(x, y), sec, **common),
                     row("digits", name, "digits_fd", digits_fd(x), sec, **common)])

    xt, sec = timed(lambda: dpm_solver_pp_2m(lambda x, t: gt(x, t, y), x1, uniform(16), gt.process), device)
    score("teacher", 16, "dpmpp2m", xt, sec, guided=True)
    x2 = None
    for k in (1, 4, 16):
        x, sec = timed(lambda: euler(lambda x, t: flow2(x, t, y), x1, uniform(k), flow2.process), device)
        score("2-rf", k, "euler", x, sec)
        x2 = x if k == instaflow.DIGITS_RECIPE["distill_pairs_steps"] else x2
    m = min(n, 300)
    for name, flow, guided in (("teacher", reflow.RFView(gt), True), ("2-rf", flow2, False)):
        s, sec = timed(lambda: reflow.straightness(flow, x1[:m], 32, cond={"y": y[:m]}), device)
        rows.append(row("digits", name, "straightness", s, sec, nfe=nfe("euler", 32, guided), steps=32, device=device,
                        w=w, sampler="euler", n=m))
    for name, shipped, target in (("instaflow-l2", "digits-instaflow-l2", x2), ("instaflow", "digits-instaflow", x2),
                                  ("direct-distill-l2", "digits-direct-l2", xt), ("direct-distill", "digits-direct", xt)):
        model = instaflow.load_digits_model(shipped, device=device)
        x, sec = timed(lambda: instaflow.one_step(model, x1, y), device)
        score(name, 1, "one-step", x, sec)
        rows.append(row("digits", name, "heldout_err", instaflow.regression_error(model, x1, target, y), 0.0, nfe=1,
                        steps=1, device=device, w=w, n=n, coupling="2-rf" if "instaflow" in name else "teacher"))
    return rows
