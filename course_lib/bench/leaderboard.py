"""The leaderboard: every method's student on the course's teachers and data, side by side.

    python -m course_lib.bench leaderboard --mode laptop --out runs/leaderboard.json

One row per (dataset, method, NFE, metric) at 1, 2, 4 and 8 network evaluations where the method has them, on the
2D mixtures (gmm, checkerboard), the digits and the mini Stable Diffusion ("mini-sd"), with the fields of every
benchmark row (schema 3: value = mean over the evaluation seeds, std, values) and:

    family, method     the course's grouping (trajectory, consistency, flow map, distribution) and the method's name
    origin             "loaded": the saved laptop run of the method's own benchmark (`source`, a file of
                       docs/results), whose students were trained in that run (hours of CPU for them all; each
                       file's meta has its total_seconds), or "shipped, evaluated here": a student of data/ loaded
                       and scored in this run with the benchmarks' evaluation seeds and references (the longer-trained
                       2D DMD2 and GDD-I students; in laptop and full mode also the mini SD's Hyper-SD LoRAs, scored
                       by their benchmark's own mini-SD evaluation: minutes)
    x_teacher, x_teacher_std
                       for SWD and KID rows: the value over the teacher's best on the same seeds (per-seed ratios,
                       core.per_seed), the teacher's best taken from the same file (its rows share the references)
    ms_per_sample      the wall time of producing the row's samples over their number (`seconds` / `n`), on the
                       machine and device the row was measured on (`device`; the benchmarks run on one CPU thread)
    train_updates, train_seconds
                       the training cost as the benchmark measured it (loaded and shipped rows alike; a student
                       trained from another model of its benchmark adds that model's seconds, `train_chain`; the
                       time to generate training pairs is not counted); teacher_evals where the benchmark counted them

The quality metrics: 2D "swd" beside "recall" (gmm) or "in_squares" (checkerboard); digits "kid_heldout" beside
"class_acc"; the mini SD "kid_heldout" beside "adherence" and "colour_adherence". `python -m course_lib.bench report
runs/leaderboard.json` prints every row; `short_table` is the README's table. Stable Diffusion 1.5 training costs
are not rows (no SD 1.5 student is trained here): meta["sd15_gpu_hours"] prices each method's SD 1.5 run from the
cost table measured on a GPU (`sd15_costs`; Hyper-SD's labelled as an estimate).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..config import pick
from ..distill import hypersd, tcd
from ..recipes.leaderboard import (DATASETS, FLOWMAP_NAMES, NFES, QUALITY, RATIO, RESULTS, SAVED, by_family,
                                   sd15_costs, shipped_generators, short_table)
from . import register
from . import hypersd as hypersd_bench
from .core import Evaluation, per_seed, prior, reference_2d, score_2d, timed
from .report import markdown

@dataclass(frozen=True)
class Entry:
    """A method's student in one benchmark's saved result: the rows of `model` in docs/results/bench_<bench>_laptop.json
    whose fields match `where` (the method's default sampler setting where its benchmark sweeps one). `after`: the
    models of the same file this student is trained from (its train_seconds are added: the cost of the chain)."""
    family: str
    method: str
    bench: str
    model: str
    where: tuple[tuple[str, float], ...] = ()
    after: tuple[str, ...] = ()


# The board, in the course's order. The teacher rows are the reference every ratio is taken to.
BOARD = (
    Entry("teacher", "teacher (DPM-Solver++)", "teacher", "teacher"),
    Entry("trajectory", "progressive distillation", "pd", "pd"),
    Entry("trajectory", "2-rectified flow", "reflow", "2-rf"),
    Entry("trajectory", "2-RF distilled", "reflow", "2-rf-distill", after=("2-rf",)),
    Entry("trajectory", "InstaFlow", "instaflow", "instaflow"),
    Entry("consistency", "consistency distillation", "cd", "cd"),
    Entry("consistency", "consistency training", "ct", "ct"),
    Entry("consistency", "LCM", "lcm", "lcm"),
    Entry("consistency", "TCD", "tcd", "tcd", (("gamma", tcd.GAMMA),)),
    Entry("consistency", "Hyper-SD", "hypersd", "hypersd", (("gamma", hypersd.GAMMAS[4]),)),
    Entry("consistency", "TSCD (Hyper-SD's stages)", "hypersd", "tscd", (("gamma", hypersd.GAMMAS[4]),)),
    Entry("consistency", "TSCD + reward", "hypersd", "tscd-reward", (("gamma", hypersd.GAMMAS[4]),)),
    *(Entry("flow map", name, "flowmap", model) for model, name in FLOWMAP_NAMES.items()),
    Entry("distribution", "ADD", "add", "add"),
    Entry("distribution", "DMD", "dmd", "dmd"),
    Entry("distribution", "DMD2", "dmd2", "dmd2"),
    Entry("distribution", "GDD", "gdd", "gdd"),
    Entry("distribution", "GDD-I", "gdd", "gdd-i"),
)
def bench_file(bench: str) -> Path:
    return RESULTS / f"bench_{bench}_laptop.json"


def _saved(bench: str) -> list[dict]:
    """The rows of a benchmark's saved laptop result ([] without one)."""
    path = bench_file(bench)
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def _teacher_best(rows: list[dict], dataset: str, metric: str) -> dict | None:
    """The teacher's row of lowest mean `metric` on `dataset` among `rows`: a file's own teacher rows, or bench
    teacher's where a file has none (bench reflow's flows; the same references, reference_2d)."""
    return min((r for r in rows if r["dataset"] == dataset and r["model"] == "teacher" and r["metric"] == metric),
               key=lambda r: r["value"], default=None)


def _board_row(r: dict, family: str, method: str, origin: str, source: str, best: dict | None) -> dict:
    out = {**r, "family": family, "method": method, "origin": origin, "source": source}
    if r.get("n"):
        out["ms_per_sample"] = round(1000 * r["seconds"] / r["n"], 4)
    same_n = r["metric"] != "swd" or best is None or best.get("n") == r.get("n")    # SWD's bias depends on n; KID's not
    if r["metric"] in RATIO and best is not None and best is not r and same_n \
            and len(best["values"]) == len(r["values"]):
        out["x_teacher"], out["x_teacher_std"] = (round(v, 4) for v in per_seed(r, best))
    return out


def loaded_rows(entries: Iterable[Entry] = BOARD, datasets: Iterable[str] = DATASETS) -> tuple[list[dict], list[str]]:
    """The board's rows read from the saved laptop results; the second list names the files that are missing."""
    rows, missing, teacher = [], [], _saved("teacher")
    for bench in dict.fromkeys(e.bench for e in entries):
        path = bench_file(bench)
        if not path.is_file():
            missing.append(f"docs/results/{path.name}")
            continue
        saved = _saved(bench)
        for e in (e for e in entries if e.bench == bench):
            for r in saved:
                if r["model"] != e.model or r["dataset"] not in datasets or r.get("nfe") not in NFES \
                        or r["metric"] not in QUALITY[r["dataset"]] or any(r.get(k) != v for k, v in e.where):
                    continue
                best = _teacher_best(saved, r["dataset"], r["metric"]) or _teacher_best(teacher, r["dataset"],
                                                                                        r["metric"])
                row = _board_row(r, e.family, e.method, "loaded", f"docs/results/{path.name}", best)
                if e.after and "train_seconds" in r:
                    before = [next(x["train_seconds"] for x in saved if x["model"] == m and x["dataset"] == r["dataset"]
                                   and "train_seconds" in x) for m in e.after]
                    row.update(train_seconds=round(r["train_seconds"] + sum(before), 1), train_chain=list(e.after))
                rows.append(row)
    seen: dict[tuple, int] = {}
    for r in rows:
        key = (r["method"], r["dataset"], r["nfe"], r["metric"])
        seen[key] = seen.get(key, 0) + 1
    if twice := [k for k, c in seen.items() if c > 1]:
        raise ValueError(f"the board has several rows for {twice[:3]}: give their entries a `where`")
    return rows, missing


def shipped_rows(mode: str, seed: int, device) -> list[dict]:
    """The shipped, longer-trained 2D students scored here (DMD2, GDD-I): the benchmarks' references (reference_2d:
    seed + 1) and their own noise, over the evaluation seeds of `seed`; ratios against bench teacher's saved rows
    (same references, same n). The 2D flow maps of data/flowmap are bench flowmap's own seed-0 students: their rows
    are loaded from its saved result."""
    n = pick(mode, smoke=500, laptop=5000, full=5000)
    teacher_rows = _saved("teacher")
    ev, info = Evaluation(seed, device), {}
    for ds, students in shipped_generators(device).items():
        for s in ev.seeds:
            ref = reference_2d(ev, ds, n, s)
            for method, (family, sample, steps, updates, seconds, process, evals) in students.items():
                x1 = prior(process, (n, 2), s + 3, device)
                for k in steps:
                    with torch.no_grad():
                        x, sec = timed(lambda: sample(x1, k, s + 4), device)
                    score_2d(ev, ds, method, x, ref, sec, nfe=k, steps=k, compare=True, n=n)
                info[(ds, method)] = (family, updates, seconds, evals)
    rows = []
    for r in ev.rows():
        if r["model"] == "data" or r["metric"] not in QUALITY[r["dataset"]]:
            continue
        family, updates, seconds, evals = info[(r["dataset"], r["model"])]
        r.update(train_updates=int(updates), train_seconds=seconds,
                 **({"teacher_evals": int(evals)} if evals is not None else {}))
        best = _teacher_best(teacher_rows, r["dataset"], r["metric"])
        rows.append(_board_row(r, family, r["model"], "shipped, evaluated here", "data/", best))
    return rows


# The mini SD's shipped Hyper-SD LoRAs scored here (laptop and full mode; bench hypersd's saved laptop result predates
# its mini-SD rows): (family, method) of each benchmark model name. The shipped MeanFlow LoRA's rows are bench
# flowmap's, loaded.
MINISD_SHIPPED = {"tscd": ("consistency", "TSCD (Hyper-SD's stages)"), "tscd-reward": ("consistency", "TSCD + reward")}


def minisd_rows(mode: str, seed: int, device) -> list[dict]:
    """The mini SD's shipped Hyper-SD and MeanFlow LoRAs (data/hypersd, data/flowmap/mini-sd-meanflow), scored by their
    benchmarks' own mini-SD evaluation (bench hypersd's rows_minisd, bench flowmap's minisd_rows: held-out KID,
    adherence, colour adherence over the evaluation seeds, each beside the guided teacher on the same seeds and
    prompts, its ratio's reference). Minutes on a CPU: not in smoke mode (there those benchmarks train a tiny
    stand-in instead)."""
    if mode == "smoke":
        return []
    ev = Evaluation(seed, device)
    hypersd_bench.rows_minisd(ev, mode)
    rows, out = ev.rows(), []
    for r in rows:
        if r["model"] not in MINISD_SHIPPED or r["metric"] not in QUALITY["mini-sd"] or r.get("nfe") not in NFES:
            continue
        best = _teacher_best(rows, "mini-sd", r["metric"])
        family, method = MINISD_SHIPPED[r["model"]]
        out.append(_board_row(r, family, method, "shipped, evaluated here", "data/", best))
    return out


@register("leaderboard", "every method's student side by side (saved benchmark results + shipped students scored here)")
def bench_leaderboard(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    device = torch.device(device or "cpu")
    rows, missing = loaded_rows()
    rows += shipped_rows(mode, seed, device)
    if device.type == "cpu":
        rows += minisd_rows(mode, seed, device)
    else:                                           # the mini SD's evaluation pipeline runs on the CPU whatever
        print("leaderboard: the mini SD's shipped LoRAs are scored only with --device cpu (their evaluation runs on "
              "the CPU)")
    meta = {"nfes": list(NFES), "datasets": list(DATASETS), "quality": QUALITY, "missing": missing,
            "sd15_gpu_hours": sd15_costs(),
            "sources": sorted({r["source"] for r in rows}), "shipped_seconds": round(time.perf_counter() - t0, 1)}
    if missing:
        print(f"leaderboard: no saved result for {', '.join(missing)} (run those benchmarks with --mode laptop)")
    return rows, meta


# ----------------------------------------------------------------------------------------------------------------
# The README's table and figure (`make tables`): generated from a saved leaderboard, never typed
# ----------------------------------------------------------------------------------------------------------------

START, END = "<!-- leaderboard: generated by make tables -->", "<!-- leaderboard end -->"
EVAL_NOTE = "3 evaluation seeds"
FAMILY_COLOURS = {"teacher": "0.3", "trajectory": "C0", "consistency": "C1", "flow map": "C2", "distribution": "C3"}


def readme_block(result: dict) -> str:
    """The README's leaderboard block: the short table (markdown) and where its numbers come from."""
    lines = short_table(result["rows"])
    cols = list(lines[0]) if lines else ["method"]
    return "\n".join([START, markdown(lines, cols), "",
                      f"Quality over the teacher's best (SWD on the 2D data, held-out KID on the digits and the mini "
                      f"SD; lower is better, 1 is the teacher at its best), mean ± std over {EVAL_NOTE}, at 1 and 4 "
                      f"network evaluations; `{result['mode']}` mode, CPU. Every row, with recall, adherence, training "
                      f"and sampling cost: `python -m course_lib.bench report docs/results/leaderboard_laptop.json`.",
                      END])


def write_readme(result: dict, readme: Path) -> bool:
    """Replace the README's leaderboard block (between START and END) with readme_block(result); False (nothing
    written) where the README has no such block."""
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    readme.write_text(head + readme_block(result) + rest.split(END, 1)[1])
    return True


def figure(result: dict, out: Path) -> Path:
    """Quality over the teacher's best against network evaluations, one panel per dataset, one line per method
    (colour: its family; one legend for all panels), error bars: the spread over the evaluation seeds."""
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "x_teacher" in r]
    methods = list(dict.fromkeys(r["method"] for r in by_family(rows)))
    style = {m: "osD^v<>pPX*h"[i % 12] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, ds in zip(axes.flat, DATASETS):
        mine = [r for r in rows if r["dataset"] == ds]
        for method in methods:
            pts = sorted((r["nfe"], r["x_teacher"], r["x_teacher_std"], r["family"]) for r in mine
                         if r["method"] == method)
            if pts:
                k, v, e, fam = zip(*pts)
                ax.errorbar(k, v, yerr=e, fmt=style[method] + "-", ms=4, lw=1, capsize=2, label=method,
                            color=FAMILY_COLOURS.get(fam[0], "k"), alpha=0.85)
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        ax.set_xscale("log", base=2), ax.set_yscale("log"), ax.set_xticks(NFES, [str(k) for k in NFES])
        metric = "SWD" if ds in ("gmm", "checkerboard") else "held-out KID"
        ax.set_title(f"{ds}: {metric} over the teacher's best", fontsize=9), ax.set_xlabel("network evaluations")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_legend_handles_labels()[0]}
    fig.legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles], fontsize=7,
               loc="center right", frameon=False)
    fig.suptitle("every student against its teacher's best (dotted: 1, lower is better)\ncolour: the family "
                 "(grey teacher, blue trajectory, orange consistency, green flow map, red distribution)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 0.97))
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "leaderboard.png", dpi=100)
    plt.close(fig)
    return out / "leaderboard.png"


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    ap = argparse.ArgumentParser(prog="python -m course_lib.bench tables",
                                 description="Write the README's leaderboard table and docs/figures/leaderboard.png "
                                             "from a saved leaderboard (`python -m course_lib.bench leaderboard`).")
    ap.add_argument("result", nargs="?", default=str(SAVED))
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--figures", default="docs/figures")
    args = ap.parse_args(argv)
    matplotlib.use("Agg")
    result = json.loads(Path(args.result).read_text())
    print(f"wrote {figure(result, Path(args.figures))}")
    print(f"{'updated' if write_readme(result, Path(args.readme)) else 'no leaderboard block in'} {args.readme}")
