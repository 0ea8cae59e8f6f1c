"""The consistency students' budgets (notebook 05's methods): the 2D and digits budgets that `bench cd` and `bench ct`
share, which the flow-map students on digits (recipes.flowmap_digits) reuse so they are measured on CD's budget."""
from __future__ import annotations

from ..config import pick


def cm_budget(mode: str) -> dict:
    """The 2D and digits budgets shared by `bench cd` and `bench ct` (the same for both methods: CT is measured on
    CD's budget). N is CD's grid; CT's grid grows with iCT's doubling schedule from s0 to s1 intervals."""
    return dict(
        steps=pick(mode, smoke=20, laptop=400, full=6000), batch=pick(mode, smoke=128, laptop=1024, full=2048),
        lr=1e-3, N=pick(mode, smoke=6, laptop=10, full=18), mu=pick(mode, smoke=0.9, laptop=0.9, full=0.95),
        ema=pick(mode, smoke=0.9, laptop=0.95, full=0.999),
        ct_s0=pick(mode, smoke=4, laptop=4, full=10), ct_s1=pick(mode, smoke=8, laptop=32, full=640),
        # "ct-long" (2D only): iCT's full recipe (pseudo-Huber, lambda = 1 / (s_{n+1} - s_n), lognormal n) on
        # ct_long_x times CD's updates, the grid doubling up to ct_long_s1 intervals
        ct_long_x=pick(mode, smoke=2, laptop=10, full=10), ct_long_s1=pick(mode, smoke=8, laptop=128, full=1280),
        digits_steps=pick(mode, smoke=2, laptop=150, full=5000), digits_batch=pick(mode, smoke=8, laptop=32, full=128),
        digits_lr=pick(mode, smoke=1e-3, laptop=1e-3, full=2e-4), digits_ema=pick(mode, smoke=0.0, laptop=0.0, full=0.999))
