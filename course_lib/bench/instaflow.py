"""`bench instaflow`: InstaFlow (Liu et al. 2024) and the paper's ablation, direct distillation."""
from __future__ import annotations

import time

import torch

from ..conditioning import labels
from ..config import default_device, pick
from ..data2d import sample_2d
from ..distill import instaflow, reflow
from ..distill.instaflow import one_step, regression_error
from ..grids import uniform
from ..metrics import flow_map_error
from ..models import null_label
from ..plotting import table
from ..recipes.instaflow import (DIGITS_DIR, DIGITS_MODELS, DIGITS_RECIPE, instaflow_2d_budget, instaflow_2d_models,
                                 instaflow_sweep, instaflow_unconditional, load_digits_model)
from ..samplers import dpm_solver_pp_2m, euler
from ..teachers import load_teacher
from . import register
from .core import (Evaluation, conditional_reference, digit_labels, digits_floor, digits_n, fidelity_to_teacher, fresh,
                   nfe, noise, prior, score_digits, score_fidelity, side_by_side, swd, timed, train_fields)


def sweep_rows(ev: Evaluation, records: list[dict], dataset: str, x1s: list, y, targets: list[dict],
               swds: list) -> None:
    """Rows of the capacity sweep (recipes.instaflow.instaflow_sweep's records, with their students), evaluated on
    every seed's noise x1s[i] (labels y or None): "sweep-<coupling>" at one step, "swd_data" (swds[i] of the
    samples) and "heldout_err" (against targets[i][coupling]); fields coupling, width, n_pairs, train_steps,
    train_seconds, train_updates."""
    for i in range(len(x1s)):
        for r in records:
            extra = dict(coupling=r["coupling"], width=r["width"], n_pairs=r["n_pairs"], train_steps=r["train_steps"],
                         train_seconds=r["train_seconds"], train_updates=r["train_steps"], n=len(x1s[i]))
            ev.add(dataset, f"sweep-{r['coupling']}", "swd_data", swds[i](one_step(r["student"], x1s[i], y)),
                   nfe=1, steps=1, **extra)
            ev.add(dataset, f"sweep-{r['coupling']}", "heldout_err",
                   regression_error(r["student"], x1s[i], targets[i][r["coupling"]], y), nfe=1, steps=1, **extra)


@register("instaflow", "InstaFlow against direct distillation (gmm-overlap, digits) and the capacity sweep")
def bench_instaflow(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """InstaFlow (Liu et al. 2024) on the conditional gmm-overlap teacher, and the paper's ablation.

    Models: "teacher" (guided with w, DPM-Solver++ 64 steps, each two network evaluations: nfe 128),
    "2-rf" (conditional reflow from the teacher's weights, Euler 1 and 4 steps, no guidance at use),
    "instaflow" (2-RF distilled to 1 step) and "direct-distill" (the teacher's triplets distilled to 1 step with the
    same number of updates as reflow + distillation). Models are trained once; every row is evaluated over the
    evaluation seeds. Every student is measured against what it distils, the guided teacher at the same w:
    "swd_teacher" (SWD against the teacher's samples from fresh noise; the teacher's own row is the floor),
    "flow_map_err_teacher" (RMS distance to the teacher's output from the same noise); "class_acc" (Bayes
    classifier of the mixture); "swd_data" (context only: against exact class-conditional samples, which the
    guided teacher leaves by design); "heldout_err" (one-step students: mean squared error against their own
    coupling's endpoints on noise they never saw), "straightness" (teacher read as a flow; 2-RF).
    Capacity sweep rows: "sweep-direct" / "sweep-reflow" (fields width, n_pairs, train_steps; "swd_data",
    "heldout_err"), on gmm-overlap and on the unconditional 8-mode "gmm" (its shipped diffusion teacher, its 2-RF;
    teacher and 2-RF rows give the swd_data of each coupling's endpoints, which the students imitate). Digits: the
    shipped data/instaflow models (trained on a GPU by `python -m course_lib.recipes.instaflow train-digits`)."""
    device = torch.device(device) if device is not None else default_device()
    b = instaflow_2d_budget(mode)
    n, ds = pick(mode, smoke=200, laptop=5000, full=25_000), "gmm-overlap"      # per evaluation seed
    progress = mode != "smoke"
    models, data, secs = instaflow_2d_models(b, seed, progress=progress, device=device)
    updates = {"2-rf": b["reflow_steps"], "instaflow": b["reflow_steps"] + b["distill_steps"],
               "direct-distill": b["reflow_steps"] + b["distill_steps"]}
    teacher, flow2 = models["teacher"], models["2-rf"]
    gt = instaflow.guided(teacher, b["w"])
    ev = Evaluation(seed, device)
    samples, x1s, targets, swds = [], [], [], []
    y = labels((torch.arange(n) % null_label(teacher)).to(device), null_label(teacher))   # balanced, as every seed's
    for s in ev.seeds:
        mix, y_cpu, swd_data, acc = conditional_reference(ev, ds, n, s)
        x1 = prior(teacher.process, (n, 2), s + 3, device)
        runs = [("teacher", 64, "dpmpp2m", True,
                 lambda: dpm_solver_pp_2m(gt, x1, uniform(64), teacher.process, cond=y))]
        runs += [("2-rf", k, "euler", False,
                  lambda k=k: euler(flow2, x1, uniform(k), flow2.process, cond=y)) for k in (1, 4)]
        runs += [(name, 1, "one-step", False, lambda name=name: instaflow.one_step(models[name], x1, y))
                 for name in ("instaflow", "direct-distill")]
        mine = {}
        for name, k, sampler, guided, fn in runs:
            x, sec = timed(fn, device)
            common = dict(nfe=nfe(sampler, k, guided), steps=k, w=b["w"], sampler=sampler, n=n,
                          **(train_fields(secs[name], updates[name]) if name in secs else {}))
            mine[(name, k)] = (x, sec, common)
            ev.add(ds, name, "class_acc", acc(x), sec, **common)
            ev.add(ds, name, "swd_data", swd_data(x), sec, **common)
        samples.append(mine)
        # held-out endpoints of each coupling from the evaluation noise (never used in training)
        _, xt = reflow.generate_pairs(gt, x1, b["pair_steps"], "dpmpp2m", cond=y)
        _, x2 = reflow.generate_pairs(flow2, x1, b["flow_pair_steps"], "euler", cond=y)
        targets.append({"direct": xt, "reflow": x2})
        x1s.append(x1)
        swds.append(swd_data)
        for name, key in (("instaflow", "reflow"), ("direct-distill", "direct")):
            ev.add(ds, name, "heldout_err", instaflow.regression_error(models[name], x1, targets[-1][key], y),
                   nfe=1, steps=1, w=b["w"], n=n, coupling="2-rf" if key == "reflow" else "teacher",
                   **train_fields(secs[name], updates[name]))
        m = min(n, 2000)
        for name, flow, guided in (("teacher", reflow.RFView(gt), True), ("2-rf", flow2, False)):
            st, sec = timed(lambda: reflow.straightness(flow, x1[:m], 64, cond=y[:m]), device)
            ev.add(ds, name, "straightness", st, sec, nfe=nfe("euler", 64, guided), steps=64, w=b["w"],
                   sampler="euler", n=m)
    for i, mine in enumerate(samples):            # fidelity to the guided teacher: needs every seed's teacher samples
        for (name, k), (x, sec, common) in mine.items():
            score_fidelity(ev, ds, name, x, None if name == "teacher" else mine[("teacher", 64)][0],
                           fresh(samples, i)[("teacher", 64)][0], sec, **common)
    records = instaflow_sweep({"direct": data["teacher"], "reflow": data["2-rf"]}, targets[0], x1s[0], y, b["sweep"],
                              b, swds[0], teacher, ds, seed, progress, return_students=True)
    sweep_rows(ev, records, ds, x1s, y, targets, swds)
    # the same sweep where the map is multimodal: the unconditional 8-mode mixture (no labels to split it); the
    # couplings' endpoints from every seed's noise at once (one 2-RF), then split by seed
    t0 = time.perf_counter()
    u_data, u_all, u_teacher = instaflow_unconditional("gmm", b, torch.cat(x1s), seed, progress)
    u_sec = time.perf_counter() - t0            # the 2-RF's training and both couplings' pairs
    u_targets = [{c: v[i * n:(i + 1) * n] for c, v in u_all.items()} for i in range(len(x1s))]
    u_swds = [(lambda a, ref=sample_2d("gmm", n, torch.Generator().manual_seed(s + 1))[0]: swd(a, ref))
              for s in ev.seeds]
    for i in range(len(x1s)):
        ev.add("gmm", "teacher", "swd_data", u_swds[i](u_targets[i]["direct"]), nfe=nfe("dpmpp2m", b["pair_steps"]),
               steps=b["pair_steps"], sampler="dpmpp2m", n=n)
        ev.add("gmm", "2-rf", "swd_data", u_swds[i](u_targets[i]["reflow"]), nfe=nfe("euler", b["flow_pair_steps"]),
               steps=b["flow_pair_steps"], sampler="euler", n=n, **train_fields(u_sec, b["reflow_steps"]))
    records = instaflow_sweep(u_data, u_targets[0], x1s[0], None, b["sweep"], b, u_swds[0], u_teacher, "gmm", seed,
                              progress, return_students=True)
    sweep_rows(ev, records, "gmm", x1s, None, u_targets, u_swds)
    instaflow_digits_rows(ev, mode, device)
    rows = ev.rows()
    print(instaflow_summary(rows))
    return rows, {**b, "n": n, "swd_projections": 256, "eval_seeds": ev.seeds}


def instaflow_summary(rows: list[dict]) -> str:
    """The headline (students against the guided teacher: swd_teacher over the teacher's own floor, class accuracy
    in points, both per seed, then mean ± std) and the ablation's sweep side by side."""
    head = side_by_side([r for r in rows if not r["model"].startswith("sweep-")], ("dataset", "model", "steps", "nfe"))
    sweep = side_by_side([{**r, "metric": f"{r['coupling']} {r['metric']}"} for r in rows
                          if r["model"].startswith("sweep-")], ("dataset", "width", "n_pairs", "train_steps"))
    teach = {d["dataset"]: d["rows"] for d in head if d["model"] == "teacher" and "class_acc" in d["rows"]}
    for d in head:
        t = teach.get(d["dataset"])
        if t is not None and d["model"] not in ("teacher", "data"):
            fidelity_to_teacher(d, t)
    return (table(head, ["dataset", "model", "steps", "nfe", "class_acc", "swd_teacher", "flow_map_err_teacher",
                         "swd_data", "kid_heldout", "heldout_err", "straightness", "swd_teacher / teacher's",
                         "acc - teacher (points)"])
            + "\n\ncapacity sweep (fresh one-step students; direct = the teacher's coupling, reflow = the 2-RF's)\n"
            + table(sweep, ["dataset", "width", "n_pairs", "train_steps", "direct swd_data", "reflow swd_data",
                            "direct heldout_err", "reflow heldout_err"]))


def instaflow_digits_rows(ev: Evaluation, mode: str, device: str | torch.device) -> None:
    """Digits: the guided teacher (w of the recipe, DPM-Solver++ 16 steps, the solver of the triplets), the shipped
    conditional 2-RF (Euler 1, 4, 16), InstaFlow (L2, then Lap1) and direct distillation (L2, then Lap1) at one
    step: class accuracy and classifier.digits_scores (1-4 step models on thousands of samples per seed, the
    16-step rows on a few hundred: the first of the same noise); "flow_map_err_teacher", the RMS pixel distance to
    the guided teacher's output from the same noise, and the one-step students' held-out regression error (both
    on the first few hundred)."""
    if not all((DIGITS_DIR / m).is_dir() for m in DIGITS_MODELS):
        return
    w = DIGITS_RECIPE["w"]
    big, small = digits_n(mode, cheap=True), digits_n(mode, cheap=False)
    gt = instaflow.guided(load_teacher("digits", device=device), w)
    flow2 = load_digits_model("digits-if-2rf", device=device)
    students = {name: load_digits_model(shipped, device=device) for name, shipped in
                (("instaflow-l2", "digits-instaflow-l2"), ("instaflow", "digits-instaflow"),
                 ("direct-distill-l2", "digits-direct-l2"), ("direct-distill", "digits-direct"))}
    for s in ev.seeds:
        digits_floor(ev, s)
        x1 = noise((max(big, small), 1, 16, 16), s + 6, device)
        y = digit_labels(len(x1), device)

        def score(name, k, sampler, x, sec, guided=False, **extra):
            common = dict(nfe=nfe(sampler, k, guided), steps=k, w=w, sampler=sampler, **extra)
            score_digits(ev, name, x, sec, y=y.y[:len(x)], **common)
            if name != "teacher":
                ev.add("digits", name, "flow_map_err_teacher", flow_map_error(x[:small].cpu(), xt.cpu()), sec,
                       n=small, **common)

        xt, sec = timed(lambda: dpm_solver_pp_2m(gt, x1[:small], uniform(16), gt.process, cond=y[:small]), device)
        score("teacher", 16, "dpmpp2m", xt, sec, guided=True)
        x2 = None
        for k in (1, 4, 16):
            m = big if k <= 4 else small
            x, sec = timed(lambda: euler(flow2, x1[:m], uniform(k), flow2.process, cond=y[:m]), device)
            score("2-rf", k, "euler", x, sec)
            x2 = x[:small] if k == DIGITS_RECIPE["distill_pairs_steps"] else x2
        m = min(small, 300)
        for name, flow, guided in (("teacher", reflow.RFView(gt), True), ("2-rf", flow2, False)):
            st, sec = timed(lambda: reflow.straightness(flow, x1[:m], 32, cond=y[:m]), device)
            ev.add("digits", name, "straightness", st, sec, nfe=nfe("euler", 32, guided), steps=32, w=w,
                   sampler="euler", n=m)
        for name, model in students.items():
            x, sec = timed(lambda: instaflow.one_step(model, x1[:big], y[:big]), device)
            score(name, 1, "one-step", x, sec)
            target = x2 if "instaflow" in name else xt
            ev.add("digits", name, "heldout_err", instaflow.regression_error(model, x1[:small], target, y[:small]),
                   nfe=1, steps=1, w=w, n=small, coupling="2-rf" if "instaflow" in name else "teacher")
