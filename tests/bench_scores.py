"""Shared by the benchmark tests (test_bench, test_consistency): a trained student's SWD against its untrained
start's, seed by seed, the untrained start scored the way the benchmarks score their students."""
from __future__ import annotations

import torch

from course_lib.bench.core import Evaluation, reference_2d, score_2d


def swd(rows, dataset, model, nfe):
    """The per-seed SWD values of a benchmark's (dataset, model, nfe) row."""
    row, = [r for r in rows if r["dataset"] == dataset and r["model"] == model and r["metric"] == "swd"
            and r["nfe"] == nfe]
    return row["values"]


def untrained_swd(dataset, n, draw):
    """Per-seed SWD of an untrained student's samples draw(s), scored as the benchmarks score theirs: core.score_2d
    against core.reference_2d's n samples, over the evaluation seeds s of seed 0."""
    ev = Evaluation(0, "cpu")
    for s in ev.seeds:
        ref = reference_2d(ev, dataset, n, s)
        with torch.no_grad():
            score_2d(ev, dataset, "untrained", draw(s), ref, 0.0, nfe=1, steps=1)
    return swd(ev.rows(), dataset, "untrained", 1)


def beats(trained, start, ratio, what):
    """On every evaluation seed the trained student's SWD is below `ratio` times its untrained start's."""
    assert len(trained) == len(start) >= 3
    assert all(a < ratio * b for a, b in zip(trained, start)), f"{what}: trained {trained}, untrained {start}"
