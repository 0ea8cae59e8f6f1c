"""The course's runs of guided distillation (distill.guided): the 2D recipe that notebook 02 and `bench guided` share,
its budgets and both stages on the shipped gmm-overlap teacher.
"""
from __future__ import annotations

import time

from ..conditioning import labelled
from ..config import pick, seeded
from ..data2d import sample_2d
from ..distill.guided import GuidedConfig, StepsConfig, distill_guidance, distill_steps
from ..models import Denoiser
from ..train import TrainConfig

P_W_MIN = 0.25   # the course's choice of p_w_min for the 2D recipe (see the module docstring)


def guided_2d_budget(mode: str) -> dict:
    """Budgets of the 2D guided distillation (shared by the benchmark and notebook 02).

    p_w_min: the probability that a training w is exactly w_min (course choice beside Meng et al.'s plain
    U[w_min, w_max]; see the module docstring), in stage 1 and in every PD round."""
    return pick(mode,
                smoke=dict(n=400, teacher_steps=8, stage1_steps=20, stage1_lr=1e-3, n_start=8, pd_steps=10,
                           pd_lr=3e-4, batch=128, p_w_min=P_W_MIN),
                laptop=dict(n=8000, teacher_steps=64, stage1_steps=2000, stage1_lr=1e-3, n_start=64, pd_steps=300,
                            pd_lr=3e-4, batch=1024, p_w_min=P_W_MIN),
                full=dict(n=50_000, teacher_steps=64, stage1_steps=10_000, stage1_lr=1e-3, n_start=64, pd_steps=4000,
                          pd_lr=1e-4, batch=2048, p_w_min=P_W_MIN))


def guided_2d_students(teacher: Denoiser, budget: dict, w_range: tuple[float, float] = (0.0, 4.0), seed: int = 0,
                       progress: bool = True) -> tuple[Denoiser, dict[int, Denoiser], dict]:
    """Meng et al.'s two stages on the gmm-overlap teacher: stage 1 (w-conditioned student), then PD from
    budget["n_start"] DDIM steps to 1 with w as an input; w = w_min with probability budget["p_w_min"] (default 0,
    the paper's plain uniform). The data is sampled on the CPU; the students live on the teacher's device.
    Returns (stage-1 student, {steps: student}, {"stage1" or steps: training seconds that made that student (for a
    stage-2 student: stage 1, its own PD round and every round before it)}). Updates: stage1_steps for stage 1,
    plus pd_steps per round for stage 2."""
    sample = labelled(lambda n, g: sample_2d("gmm-overlap", n, g), teacher.net.num_classes)
    t0 = time.perf_counter()
    p_w_min = budget.get("p_w_min", 0.0)
    starts: dict[int, float] = {}

    def cfg2(N: int) -> TrainConfig:               # PD calls this as each round starts: note the time
        starts[N] = time.perf_counter()
        return TrainConfig(steps=budget["pd_steps"], batch_size=budget["batch"], lr=budget["pd_lr"],
                           lr_schedule="linear", ema_decay=0.0, seed=seed + 1)

    with seeded(seed):                  # the guidance embedding's initialisation; the caller's RNG is left alone
        cfg1 = TrainConfig(steps=budget["stage1_steps"], batch_size=budget["batch"], lr=budget["stage1_lr"],
                           lr_schedule="linear", ema_decay=0.0, seed=seed, desc="guided stage 1")
        stage1, _ = distill_guidance(teacher, sample, GuidedConfig(w_range, p_w_min=p_w_min), run=cfg1,
                                     progress=progress)
        seconds: dict = {"stage1": time.perf_counter() - t0}
        students: dict = {}
        distill_steps(stage1, sample, StepsConfig(budget["n_start"], 1, p_w_min), run=cfg2, progress=progress,
                      rounds=students)
    end = time.perf_counter()
    seconds.update({N: starts.get(N // 2, end) - t0 for N in students})
    return stage1, students, seconds
