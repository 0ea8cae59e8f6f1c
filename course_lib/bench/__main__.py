"""The benchmark command line:

    python -m course_lib.bench list                                   every benchmark, one line each
    python -m course_lib.bench NAME --mode M --device D --out F.json  run one (device: default_device())
    python -m course_lib.bench report F.json [--markdown] [...]       tables from saved results (bench.report)
    python -m course_lib.bench tables [LEADERBOARD.json]              the README's leaderboard table and figure
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ..config import MODES, course_mode, default_device
from ..plotting import table
from . import BENCHMARKS, DESCRIPTIONS, __doc__ as BENCH_DOC
from .core import SCHEMA, pm
from .leaderboard import main as leaderboard_main
from .report import main as report_main


def listing() -> str:
    """Every registered benchmark with its one-line description."""
    width = max(map(len, BENCHMARKS))
    return "\n".join(f"{name:<{width}}  {DESCRIPTIONS[name]}" for name in BENCHMARKS)


def main(argv: list[str] | None = None) -> dict | None:
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        report_main(argv[1:])
        return None
    if argv[:1] == ["tables"]:
        leaderboard_main(argv[1:])
        return None
    ap = argparse.ArgumentParser(prog="python -m course_lib.bench", description=BENCH_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help=f"benchmark to run: {', '.join(BENCHMARKS)}; or `list` to describe them")
    ap.add_argument("--mode", default=None, help=f"one of {', '.join(MODES)} (default: $COURSE_MODE or by hardware)")
    ap.add_argument("--device", default=None, help="where the models run, e.g. cpu, cuda, cuda:1, mps "
                                                   "(default: course_lib.config.default_device())")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.name == "list":
        print(listing())
        return None
    if args.name not in BENCHMARKS:
        ap.error(f"unknown benchmark {args.name!r}; valid benchmarks: {', '.join(BENCHMARKS)} (or list)")
    mode = course_mode(args.mode)
    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError as e:
        ap.error(f"--device {args.device!r}: {e}; pass cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {device}: CUDA is not available here; pass --device cpu")
    t0 = time.perf_counter()
    rows, meta = BENCHMARKS[args.name](mode, args.seed, device)
    meta.update({"seed": args.seed, "total_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
                 "device": str(device), "threads": torch.get_num_threads(), "machine": platform.machine(),
                 **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})})
    result = {"schema": SCHEMA, "name": args.name, "mode": mode, "meta": meta, "rows": rows}
    shown = [{**r, "mean ± std": pm(r["value"], r.get("std"))} for r in rows]
    print(table(shown, ["dataset", "model", "nfe", "steps", "metric", "mean ± std", "n_seeds", "seconds"]))
    print(f"\n{args.name} benchmark, mode {mode}, device {device}: {len(rows)} rows in {meta['total_seconds']} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
