"""The figures the README shows, regenerated from benchmark results and the shipped teachers.

    python -m course_lib.figures [--bench runs/bench_teacher.json] [--instaflow runs/bench_instaflow.json]
                                 [--out docs/figures]

Reads the teacher benchmark's JSON (run `python -m course_lib.bench teacher --mode laptop --out ...` first) and,
when present, the InstaFlow benchmark's (its capacity sweep).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .plotting import image_grid, nfe_curves  # noqa: E402


def teacher_quality(result: dict, out: Path) -> Path:
    """SWD against NFE for each teacher and solver, one panel per 2D dataset, with the data floor."""
    datasets = [d for d in ("checkerboard", "gmm") if any(r["dataset"] == d for r in result["rows"])]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        rows = [r for r in result["rows"] if r["dataset"] == ds and r["metric"] == "swd"]
        floor = next(r["value"] for r in rows if r["model"] == "data")
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for r in rows:
            if r["model"] != "data":
                curves.setdefault(r["model"], ([], []))
                curves[r["model"]][0].append(r["nfe"]), curves[r["model"]][1].append(r["value"])
        n = rows[0].get("n", "")
        nfe_curves(curves, floor=floor, ax=ax, title=f"{ds}: teacher quality vs NFE ({n} samples)")
    fig.tight_layout()
    path = out / "teacher_quality_vs_nfe.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def digits_grid(out: Path, nfes=(1, 2, 4, 8, 16, 32)) -> Path:
    """The digits teacher's samples at increasing NFE, same noise in every row."""
    from .samplers import generate
    from .teachers import load_teacher

    teacher = load_teacher("digits")
    labels = torch.arange(10).repeat(2)
    fig, axes = plt.subplots(len(nfes), 1, figsize=(8, 0.55 * len(nfes) + 0.4))
    for ax, k in zip(axes, nfes):
        x = generate(teacher, teacher.process, (len(labels), 1, 16, 16), "dpmpp2m", k,
                     generator=torch.Generator().manual_seed(4), y=labels)
        image_grid(x, nrow=len(labels), ax=ax)
        ax.set_ylabel(f"{k} NFE", rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("digits teacher, DPM-Solver++(2M)", fontsize=10)
    path = out / "digits_teacher_nfe.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def instaflow_sweep(result: dict, out: Path, n_pairs: int = 10_000, steps: int = 2000) -> Path:
    """The InstaFlow benchmark's capacity sweep: held-out error and SWD of fresh one-step students against width,
    on the teacher's coupling ("direct") and the 2-RF's ("reflow"), one row of panels per 2D dataset; error bars:
    the spread over the benchmark's evaluation seeds."""
    rows = [r for r in result["rows"] if r["model"].startswith("sweep-") and r["n_pairs"] == n_pairs
            and r["train_steps"] == steps]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(8, 2.9 * len(datasets)), squeeze=False)
    for (ax_e, ax_s), ds in zip(axes, datasets):
        for coupling, style in (("direct", "o-"), ("reflow", "s--")):
            for ax, metric in ((ax_e, "heldout_err"), (ax_s, "swd_data")):
                pts = sorted((r["width"], r["value"], r.get("std", 0.0)) for r in rows
                             if r["dataset"] == ds and r["coupling"] == coupling and r["metric"] == metric)
                w, v, e = zip(*pts)
                ax.errorbar(w, v, yerr=e, fmt=style, capsize=2, label=coupling)   # mean ± std over eval seeds
        for ax, what in ((ax_e, "held-out regression error (log)"), (ax_s, "SWD (linear, from 0)")):
            ax.set_xscale("log", base=2), ax.set_xlabel("student width")
            ax.set_title(f"{ds}: {what}", fontsize=9), ax.legend(fontsize=8)
        ax_e.set_yscale("log"), ax_s.set_ylim(bottom=0), ax_s.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"fresh one-step students, {n_pairs} pairs, {steps} updates (bench instaflow, {result['mode']})",
                 fontsize=9)
    fig.tight_layout()
    path = out / "instaflow_capacity_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def instaflow_digits(out: Path) -> Path:
    """The shipped digits InstaFlow models against the guided teacher and direct distillation, same noise."""
    from .distill import instaflow
    from .grids import uniform
    from .samplers import dpm_solver_pp_2m, euler
    from .teachers import load_teacher

    w = instaflow.DIGITS_RECIPE["w"]
    y = torch.arange(10).repeat(2)
    x1 = torch.randn(len(y), 1, 16, 16, generator=torch.Generator().manual_seed(4))
    gt = instaflow.guided(load_teacher("digits"), w)
    flow2 = instaflow.load_digits_model("digits-if-2rf")
    rows = [(f"teacher (w={w}), 16 steps", dpm_solver_pp_2m(lambda x, t: gt(x, t, y), x1, uniform(16), gt.process)),
            ("2-RF, 1 Euler step", euler(lambda x, t: flow2(x, t, y), x1, uniform(1), flow2.process)),
            ("InstaFlow, 1 step", instaflow.one_step(instaflow.load_digits_model("digits-instaflow"), x1, y)),
            ("direct distillation, 1 step", instaflow.one_step(instaflow.load_digits_model("digits-direct"), x1, y))]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.55 * len(rows) + 0.4))
    for ax, (label, x) in zip(axes, rows):
        image_grid(x, nrow=len(y), ax=ax)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("digits: InstaFlow against direct distillation (same noise and labels)", fontsize=10)
    path = out / "instaflow_digits.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def consistency_quality(results: list[dict], out: Path) -> Path:
    """SWD against steps of the consistency students (bench cd / bench ct results, each a saved JSON) beside the
    teacher's DPM-Solver++ sweep and the data floor, one panel per 2D dataset, mean ± std over evaluation seeds."""
    rows = [r for res in results for r in res["rows"]]
    datasets = [d for d in ("checkerboard", "gmm") if any(r["dataset"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        mine = [r for r in rows if r["dataset"] == ds and r["metric"] == "swd"]
        floor = next((r["value"], r.get("std", 0.0)) for r in mine if r["model"] == "data")
        curves: dict[str, tuple[list[int], list]] = {}
        for r in mine:
            if r["model"] in ("teacher", "cd", "ct", "pd") and (r["model"], r["nfe"]) not in \
                    {(m, k) for m, (ks, _) in curves.items() for k in ks}:
                curves.setdefault(r["model"], ([], []))
                curves[r["model"]][0].append(r["nfe"]), curves[r["model"]][1].append((r["value"], r.get("std", 0.0)))
        nfe_curves(curves, floor=floor, ax=ax, title=f"{ds}: consistency students vs the teacher")
    fig.tight_layout()
    path = out / "consistency_vs_nfe.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m course_lib.figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="runs/bench_teacher.json")
    ap.add_argument("--instaflow", default="runs/bench_instaflow.json")
    ap.add_argument("--cm", nargs="*", default=["runs/bench_cd.json", "runs/bench_ct.json"],
                    help="bench cd / ct results for the consistency figure (those that exist)")
    ap.add_argument("--out", default="docs/figures")
    args = ap.parse_args(argv)
    bench = Path(args.bench)
    if not bench.is_file():
        raise SystemExit(f"{bench} not found: run `python -m course_lib.bench teacher --mode laptop --out {bench}` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (teacher_quality(json.loads(bench.read_text()), out), digits_grid(out), instaflow_digits(out)):
        print(f"wrote {path}")
    insta = Path(args.instaflow)
    if insta.is_file():
        print(f"wrote {instaflow_sweep(json.loads(insta.read_text()), out)}")
    else:
        print(f"skipped the capacity-sweep figure: {insta} not found (`python -m course_lib.bench instaflow`)")
    cms = [json.loads(Path(p).read_text()) for p in args.cm if Path(p).is_file()]
    if cms:
        print(f"wrote {consistency_quality(cms, out)}")


if __name__ == "__main__":
    main()
