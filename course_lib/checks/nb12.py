"""Checker of notebook 12 (the leaderboard): the Pareto front of methods by training cost and quality (both lower
better). Cases are small random boards on an integer grid, so ties and duplicate points occur."""
from __future__ import annotations

from typing import Callable

import torch

from ..metrics import pareto_front
from .core import accept, checker, fall_back, first_look, fresh_generator, named_slip


def _board(g: torch.Generator, n: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """n methods' (cost, quality) on a 6 x 6 integer grid, float64, with one point repeated (a tie on the front)."""
    cost = torch.randint(0, 6, (n,), generator=g).double()
    quality = torch.randint(0, 6, (n,), generator=g).double()
    i = int(torch.argmin(cost * 10 + quality))                   # a front point, repeated at the end
    return torch.cat([cost, cost[i:i + 1]]), torch.cat([quality, quality[i:i + 1]])


def _drops_ties(cost: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """The slip "at least as good on both axes dominates": equal points remove each other."""
    n = len(cost)
    weak = (cost[None] <= cost[:, None]) & (quality[None] <= quality[:, None]) & ~torch.eye(n, dtype=torch.bool)
    return ~weak.any(dim=1)


def _extremes(cost: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """The slip "the cheapest and the best": only the two ends of the front."""
    mask = torch.zeros(len(cost), dtype=torch.bool)
    mask[torch.argmin(cost + 1e-9 * quality)] = mask[torch.argmin(quality + 1e-9 * cost)] = True
    return mask


@checker("12.1")
def check_pareto_front(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 12.1: student(cost, quality) -> a boolean mask (N,) of the methods on the Pareto front, lower better
    on both axes: True where no other method is at least as good on both and strictly better on one. Checked on
    random boards with ties against metrics.pareto_front, with the plausible slips named."""
    g = fresh_generator(seed)
    first = (torch.tensor([1.0, 2.0, 4.0, 3.0, 5.0, 2.0], dtype=torch.float64),       # a front of three, no ties
             torch.tensor([5.0, 3.0, 1.0, 4.0, 2.0, 4.0], dtype=torch.float64))
    boards = [first] + [_board(g) for _ in range(6)] + [(torch.ones(4).double(), torch.ones(4).double())]
    slips = [
        (lambda c, q: pareto_front(c, -q), "your front keeps the methods of HIGHEST quality value: here quality is an "
                                           "SWD or KID ratio, lower is better on both axes."),
        (lambda c, q: pareto_front(-c, -q), "your front is the most expensive and worst methods: lower is better on "
                                            "both axes."),
        (_drops_ties, "two methods with the same cost and the same quality dominate each other in your rule, so a "
                      "repeated point disappears: another method dominates one only if it is at least as good on both "
                      "axes AND strictly better on one."),
        (_extremes, "your front holds only the cheapest method and the best one: every method that no other beats "
                    "on both axes at once is on it (each is the best at its cost)."),
    ]
    c0, q0 = boards[0]
    want0 = pareto_front(c0, q0)
    problem = first_look(lambda c, q: student(c, q).to(torch.double), (c0.clone(), q0.clone()), want0.double(),
                         f"for {len(c0)} methods (a mask with one entry per method, not the indices of the front)",
                         zeros="Every board has at least one method on its front (the cheapest of the best).")
    if problem:
        return fall_back("12.1", pareto_front, problem)
    for cost, quality in boards:
        got = student(cost.clone(), quality.clone())
        if got.dtype != torch.bool and not ((got == 0) | (got == 1)).all():
            return fall_back("12.1", pareto_front, "return a boolean mask (True on the front), not scores.")
        got, want = got.bool(), pareto_front(cost, quality)
        if torch.equal(got, want):
            continue
        why = named_slip(got, [(slip(cost, quality), why) for slip, why in slips], torch.equal)
        if why:
            return fall_back("12.1", pareto_front, why)
        wrong = [(float(cost[i]), float(quality[i]), bool(want[i])) for i in torch.nonzero(got != want).flatten()]
        return fall_back("12.1", pareto_front, f"your mask is wrong for {len(wrong)} of {len(cost)} methods, e.g. "
                                               f"(cost, quality) = {wrong[0][:2]} should be "
                                               f"{'on' if wrong[0][2] else 'off'} the front.")
    return accept("12.1", student, f"correct on {len(boards)} boards with ties (equal to "
                                   "metrics.pareto_front).")
