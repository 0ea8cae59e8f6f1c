"""Benchmarks: quality and speed measured the same way for every method, printed as a table and saved as JSON.

    python -m course_lib.bench list
    python -m course_lib.bench teacher --mode laptop --device cpu --out runs/bench_teacher.json

Output format (schema 3, shared by every method's benchmark):
    {"schema": 3, "name": ..., "mode": ..., "meta": {..., "device": ..., "eval_seeds": [...]},
     "rows": [{"schema": 3, "dataset", "model", "nfe", "steps", "metric", "value", "std", "n_seeds", "values",
               "seconds", "device", ...extra fields}, ...]}
Every model is trained once per run; its evaluation is repeated over 3 evaluation seeds (core.eval_seeds: the first is
the run's seed), each with fresh noise AND fresh reference samples. `value` is the mean over them, `std` the sample
standard deviation, `values` the per-seed values (n_seeds of them); two numbers differ only when the gap exceeds the
spread. Ratios in the printed summaries (student / teacher) are mean ± std of the per-seed ratios. `nfe` is the
number of network evaluations per sample (a classifier-free-guided step costs 2, Heun with n steps 2n - 1), `steps`
the solver steps (both null on "data" rows). `seconds` is the mean wall time of producing that row's samples (not the
metric); rows of models trained in the benchmark add `train_seconds` and `train_updates`; `n` is the sample count
per seed; rows of an estimate with its own standard error (KID) add `se` (the mean over seeds of it).

Metrics. 2D against exact data samples: "swd" (SWD, 256 fixed directions), "in_squares" (checkerboard: the fraction
on the filled squares), "precision" / "recall" (Gaussian mixtures, k-NN, core.PR_N points; only on the rows a reader
compares: 1-4 steps and each sweep's largest NFE), "flow_map_err_exact" (gmm: RMS distance to the EXACT mixture
teacher's ODE solution from the same noise, in the model's own process (vp-cosine for diffusion, rf for flows),
DPM-Solver++ with core.EXACT_STEPS steps, on the first PR_N samples: a trajectory student's fidelity to the map it
is meant to keep). Guided students (bench guided, bench instaflow) against what they distil, the guided teacher at the
same w: "swd_teacher" (SWD against the teacher's samples from fresh noise: the next seed's; the teacher's own row is
this metric's floor) and "flow_map_err_teacher" (RMS distance to the teacher's output from the same noise), beside
"class_acc" and, as context only, "swd_data" (against the unguided class-conditional data, which guidance leaves by
design). Digits (classifier.digits_scores, features of the shipped digits classifier): "kid_heldout" (unbiased KID
against the 297 held-out digits no model trained on, with `se`), "kid_train" (the same against the 1500 training
digits: well below kid_heldout means memorisation), "fd_heldout" (Frechet distance to the held-out digits, biased
upward at these sizes), "class_acc". 1-4 step students are scored on thousands of samples per seed, many-step rows
on a few hundred (core.digits_n; KID is unbiased at any n, its se says how precise).
Model "data" rows are the floors, with their spread: for 2D, every metric of an independent exact batch (a model
near it is as good as the metric can tell; one slightly smoother than the data can score a little below it); for
digits, core.DIGITS_FLOOR_N real training digits (a different random subset per seed) against the held-out digits.

Layout: `core` (rows, timing, references, sweeps, tables) and one module per method (`teacher`, `pd`, `guided`,
`reflow`, `instaflow`, `cd` (with ct)), each registering its benchmark function f(mode, seed=0, device=None) -> (rows, meta).
The budgets and experiments a benchmark shares with its notebook live in course_lib.recipes (the methods in
course_lib.distill).
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
from . import cd  # noqa: E402  (registers cd and ct)
from . import lcm  # noqa: E402
from . import tcd  # noqa: E402
from . import add  # noqa: E402
from . import dmd  # noqa: E402  (registers dmd and dmd2)
from . import gdd  # noqa: E402
from . import flowmap  # noqa: E402  (flow maps: MeanFlow, shortcut models, sCM; digits rows in flowmap_digits)
from . import hypersd  # noqa: E402
from . import leaderboard  # noqa: E402  (reads the others' saved results: registered last)
