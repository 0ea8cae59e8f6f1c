"""`bench tcd`: trajectory consistency distillation (Zheng et al. 2024) on the 2D teachers and the mini Stable
Diffusion, on `bench lcm`'s budgets and evaluation (bench/lcm.py), with the gamma sweep of its sampler."""
from __future__ import annotations

import torch

from . import register
from .lcm import run

GAMMAS = (0.3, 0.0, 0.6, 1.0)    # the first (the README's recommendation) is the default row; the rest: the sweep
SWEEP_STEPS = (2, 4, 8)          # mini SD: the step counts of the gamma sweep


@register("tcd", "TCD on 2D and the shipped mini-SD TCD student, 1/2/4/8 steps, gamma sweep")
def bench_tcd(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Trajectory consistency distillation (Zheng et al. 2024). 2D: TCD of the shipped vp teachers on bench lcm's
    grid, target EMA, updates and batch (random end point s in [0, t_n], one DDIM step of the teacher, squared L2),
    students (model "tcd") sampled with the gamma sampler (samplers.tcd) at 1, 2, 4, 8 steps for every gamma in
    GAMMAS (field "gamma"), beside the teacher's DPM-Solver++ sweep and the data floor; on gmm the flow-map error to
    the exact mixture teacher. Mini SD (dataset "mini-sd"): the shipped TCD student (data/tcd; the shipped LCM's
    recipe) with strategic stochastic sampling (tcd.sss = diffusers' TCDScheduler) at 1, 2, 4, 8 steps with
    gamma = 0.3, and every gamma at SWEEP_STEPS, beside the guided teacher and the training digits (the metrics of
    bench lcm)."""
    return run("tcd", mode, seed, device, GAMMAS, SWEEP_STEPS)
