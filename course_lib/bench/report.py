"""Tables from saved benchmark results: the tables of docs/results.md and docs/benchmarks.md are this command's output, not retyped.

    python -m course_lib.bench report runs/bench_pd.json                        every row, one table per dataset
    python -m course_lib.bench report runs/bench_pd.json --steps 1,4 --markdown  a selection, as markdown

One line per (model, sampler, steps, nfe, w, gamma) with each metric as a column, "mean ± std" over the evaluation seeds
(schema 3; older files print the single value). Data rows (the floors) come first in each dataset's table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Sequence

from ..plotting import table
from .core import side_by_side

KEY = ("model", "sampler", "steps", "nfe", "w", "gamma")
# The order metrics are shown in: quality against data, sharpness/coverage, fidelity to the teacher, images.
METRIC_ORDER = ("swd", "in_squares", "precision", "recall", "flow_map_err_exact", "swd_teacher",
                "flow_map_err_teacher", "class_acc", "swd_data", "heldout_err", "straightness", "kid_heldout",
                "kid_train", "fd_heldout")


def load(path: str | Path) -> dict:
    result = json.loads(Path(path).read_text())
    if not isinstance(result, dict) or "rows" not in result:
        raise ValueError(f"{path} is not a benchmark result (python -m course_lib.bench NAME --out FILE writes one)")
    return result


def _keep(r: dict, datasets, models, steps, metrics) -> bool:
    return ((not datasets or r["dataset"] in datasets) and (not models or r["model"] in models)
            and (not metrics or r["metric"] in metrics)
            and (not steps or r["model"] == "data" or r.get("steps") in steps))


def tables(rows: Iterable[dict], datasets: Sequence[str] = (), models: Sequence[str] = (),
           steps: Sequence[int] = (), metrics: Sequence[str] = ()) -> dict[str, list[dict]]:
    """{dataset: side-by-side lines} of the rows that pass the filters (an empty filter keeps everything)."""
    by_dataset: dict[str, list[dict]] = {}
    for r in rows:
        if _keep(r, datasets, models, steps, metrics):
            by_dataset.setdefault(r["dataset"], []).append(r)
    # floors first, otherwise the run's order
    return {ds: sorted(side_by_side(rs, KEY), key=lambda l: l["model"] != "data") for ds, rs in by_dataset.items()}


def columns(lines: list[dict]) -> list[str]:
    present = {m for l in lines for m in l["rows"]}
    keys = [k for k in KEY if any(l.get(k) is not None for l in lines)]
    return keys + [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))


def markdown(lines: list[dict], cols: list[str]) -> str:
    cell = lambda v: "-" if v is None or v == "" else str(v)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(l.get(c)) for c in cols) + " |" for l in lines]
    return "\n".join(out)


def report(paths: Sequence[str | Path], md: bool = False, **filters) -> str:
    parts = []
    for p in paths:
        result = load(p)
        meta = result.get("meta", {})
        seeds = meta.get("eval_seeds")
        parts.append(("## " if md else "") + f"{result.get('name', p)} benchmark, mode {result.get('mode')}, device {meta.get('device')}, "
                     f"schema {result.get('schema')}" + (f", evaluation seeds {seeds}" if seeds else "")
                     + f" ({p})")
        for ds, lines in tables(result["rows"], **filters).items():
            cols = columns(lines)
            parts.append(f"\n### {ds}\n\n{markdown(lines, cols)}" if md else f"\n{ds}:\n{table(lines, cols)}")
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m course_lib.bench report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="JSON files written by python -m course_lib.bench NAME --out FILE")
    ap.add_argument("--markdown", action="store_true", help="markdown tables (for docs/)")
    ap.add_argument("--dataset", default="", help="comma-separated datasets to keep")
    ap.add_argument("--model", default="", help="comma-separated models to keep (data rows are kept with --steps)")
    ap.add_argument("--steps", default="", help="comma-separated solver step counts to keep")
    ap.add_argument("--metric", default="", help="comma-separated metrics to keep")
    args = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]
    try:
        steps = [int(s) for s in split(args.steps)]
    except ValueError:
        ap.error(f"--steps takes comma-separated integers, got {args.steps!r}")
    try:
        print(report(args.files, args.markdown, datasets=split(args.dataset), models=split(args.model), steps=steps,
                     metrics=split(args.metric)))
    except (OSError, ValueError) as e:
        ap.error(str(e))
