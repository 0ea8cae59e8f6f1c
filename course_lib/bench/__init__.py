"""Benchmarks: quality and speed measured the same way for every method, printed as a table and saved as JSON.

    python -m course_lib.bench list
    python -m course_lib.bench teacher --mode laptop --device cpu --out runs/bench_teacher.json

Output format (schema 2, shared by every method's benchmark):
    {"schema": 2, "name": ..., "mode": ..., "meta": {..., "device": ...},
     "rows": [{"schema": 2, "dataset", "model", "nfe", "steps", "metric", "value", "seconds", "device",
               ...extra fields}, ...]}
`nfe` is the number of network evaluations per sample (a classifier-free-guided step costs 2, Heun with n steps
2n - 1), `steps` the solver steps (both null on "data" rows). `seconds` is the wall time of producing that row's
samples (not the metric); rows of models trained in the benchmark add `train_seconds` and `train_updates`.
Model "data" rows give the metric between two independent data batches of the same size: for the 2D data (exact
samplers, SWD) the metric's own sampling noise at that n. A model near it is as good as the metric can tell; a
model slightly smoother than the data can even score below it (the checkerboard teachers do, 0.7-0.8x: SWD's
sampling noise is largest where the projected density has gaps, and a model that blurs the squares' edges fills
them). For digits it is real-vs-real, two halves of the 1797 digits, and not a floor: the digits teacher partly
memorises its 1500 training digits and scores below it; compare digits models with each other.

Layout: `core` (rows, timing, references, sweeps, tables) and one module per method (`teacher`, `pd`, `guided`,
`reflow`, `instaflow`), each registering its benchmark function f(mode, seed=0, device=None) -> (rows, meta).
The methods' own budgets and recipes live beside them in course_lib.distill.
"""
from __future__ import annotations

from typing import Callable

BENCHMARKS: dict[str, Callable[..., tuple[list[dict], dict]]] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str):
    """Register a benchmark function f(mode, seed=0, device=None) -> (rows, meta) under `name`, with the one-line
    description `python -m course_lib.bench list` prints."""
    def wrap(fn):
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is registered twice")
        BENCHMARKS[name], DESCRIPTIONS[name] = fn, description
        return fn
    return wrap


def main(argv: list[str] | None = None):
    """The command line (`python -m course_lib.bench`); see course_lib.bench.__main__."""
    from .__main__ import main as cli

    return cli(argv)


# each method module registers its benchmark when imported (in this order: the course's)
from . import teacher  # noqa: E402
from . import pd  # noqa: E402
from . import guided  # noqa: E402
from . import reflow  # noqa: E402
from . import instaflow  # noqa: E402
from .core import NFES, SCHEMA, Evaluation, row, spread_row, timed  # noqa: E402
from .guided import GUIDANCE_WEIGHTS, bench_guided, guided_summary  # noqa: E402
from .instaflow import bench_instaflow, instaflow_summary  # noqa: E402
from .pd import bench_pd  # noqa: E402
from .reflow import REFLOW_NFES, bench_reflow, reflow_summary  # noqa: E402
from .teacher import bench_teacher  # noqa: E402
