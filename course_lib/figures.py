"""The figures the README shows, regenerated from benchmark results and the shipped teachers.

    python -m course_lib.figures [--bench runs/bench_teacher.json] [--out docs/figures]

Reads the teacher benchmark's JSON (run `python -m course_lib.bench teacher --mode laptop --out ...` first).
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m course_lib.figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="runs/bench_teacher.json")
    ap.add_argument("--out", default="docs/figures")
    args = ap.parse_args(argv)
    bench = Path(args.bench)
    if not bench.is_file():
        raise SystemExit(f"{bench} not found: run `python -m course_lib.bench teacher --mode laptop --out {bench}` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (teacher_quality(json.loads(bench.read_text()), out), digits_grid(out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
