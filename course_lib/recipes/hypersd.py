"""The course's 2D runs of Hyper-SD (distill.hypersd; notebook 11, bench hypersd): budgets by COURSE_MODE, the known
rewards of the 2D data, and the training of every ablation from one shipped teacher:

    "tscd"            TSCD's stages 8 -> 4 -> 2 -> 1 (updates per stage from the budget)
    "tscd-reward"     + reward feedback (ReFL) on the TSCD student
    "hypersd"         + score distillation (DMD's gradient, the 2D DMD2 recipe of bench dmd2) on the one-step end
    "cd-same-budget"  k = 1 from the start: consistency distillation (the DDIM-jump consistency function) with as
                      many teacher evaluations as TSCD's four stages (the same teacher step, batch, 4x the updates)
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from ..config import pick
from ..data2d import batches, get_mixture, sample_2d
from ..distill import hypersd as h
from ..distill.dmd import DMDConfig
from ..train import TrainConfig

PREFERRED = (0, 1, 2)   # gmm: the reward prefers components 0, 1, 2 (angles 0, 45, 90 degrees) of its eight


def budget(mode: str) -> dict:
    """The 2D budgets of bench hypersd (and notebook 11): updates per TSCD stage, batch, grid, rates, the reward and
    score stages."""
    return dict(
        stage_steps=pick(mode, smoke=5, laptop=150, full=1500), batch=pick(mode, smoke=128, laptop=512, full=2048),
        N=17, lr=1e-3, mu=0.9, ema=0.95, solver="ddim",
        reward_steps=pick(mode, smoke=5, laptop=150, full=1000), reward_lr=1e-4, lambda_reward=0.1,
        score_iters=pick(mode, smoke=10, laptop=400, full=4000), score_batch=pick(mode, smoke=64, laptop=256, full=1024),
        score_lr=1e-4)


def reward_fn(dataset: str) -> Callable:
    """The known reward of a 2D dataset: gmm, the log posterior of the PREFERRED components (hypersd.mode_reward,
    bumps of std 1); otherwise the right half plane (hypersd.half_plane_reward)."""
    if dataset == "gmm":
        return h.mode_reward(get_mixture("gmm").means, PREFERRED, scale=1.0)
    return h.half_plane_reward()


def tscd_config(b: dict, segments: tuple[int, ...] = h.SEGMENTS) -> h.TSCDConfig:
    return h.TSCDConfig(segments=segments, N=b["N"], solver=b["solver"], mu=b["mu"], lr=b["lr"], ema_decay=b["ema"])


def score_config(b: dict) -> DMDConfig:
    """bench dmd2's 2D recipe (batch normaliser, one t per batch, cosine rates, TTUR 5, GAN head) at the score
    stage's rate: the generator starts from a trained student, not from the teacher."""
    return DMDConfig(lr_g=b["score_lr"], lr_critic=b["score_lr"], normalize="batch", ttur=5, gan=True,
                     lr_schedule="cosine", t_shared=True)


def train_2d(teacher: nn.Module, dataset: str, b: dict, seed: int, progress: bool = False,
             ckpt_dir=None) -> dict[str, tuple[nn.Module, float, int]]:
    """Every ablation of one teacher: {model name: (student, training seconds, teacher-evaluation updates)}; the
    seconds of "tscd-reward" and "hypersd" include the stages before them."""
    data = batches(dataset)
    run = TrainConfig(steps=b["stage_steps"], batch_size=b["batch"], seed=seed, desc=f"Hyper-SD {dataset}")
    example = {"x": sample_2d(dataset, 8, torch.Generator().manual_seed(0))[0].to(next(teacher.parameters()).device)}
    sub = (lambda name: None) if ckpt_dir is None else (lambda name: f"{ckpt_dir}/{dataset}-{seed}/{name}")
    out: dict[str, tuple[nn.Module, float, int]] = {}
    n_stages = len(h.SEGMENTS)
    t0 = time.perf_counter()
    tscd, _ = h.distill_tscd(teacher, data, tscd_config(b), run=run, ckpt_dir=sub("tscd"), progress=progress)
    out["tscd"] = (tscd, time.perf_counter() - t0, b["stage_steps"] * n_stages)
    rcfg = h.RewardConfig(lambda_reward=b["lambda_reward"], lr=b["reward_lr"], N=b["N"], mu=b["mu"],
                          ema_decay=b["ema"], solver=b["solver"])
    rewarded, _ = h.distill_reward(tscd, data, reward_fn(dataset), rcfg,
                                   run=replace(run, steps=b["reward_steps"], desc=f"{run.desc} reward"),
                                   ckpt_dir=sub("reward"), progress=progress)
    out["tscd-reward"] = (rewarded, time.perf_counter() - t0, out["tscd"][2] + b["reward_steps"])
    final, _ = h.distill_score(rewarded, teacher, data, score_config(b),
                               run=replace(run, steps=b["score_iters"], batch_size=b["score_batch"],
                                           desc=f"{run.desc} score"), example=example, ckpt_dir=sub("score"),
                               progress=progress)
    out["hypersd"] = (final, time.perf_counter() - t0, out["tscd-reward"][2] + b["score_iters"])
    t1 = time.perf_counter()
    cd, _ = h.distill_tscd(teacher, data, tscd_config(b, (1,)),
                           run=replace(run, steps=b["stage_steps"] * n_stages, desc=f"CD same budget {dataset}"),
                           ckpt_dir=sub("cd"), progress=progress)
    out["cd-same-budget"] = (cd, time.perf_counter() - t1, b["stage_steps"] * n_stages)
    return out


def describe(b: dict) -> dict[str, Any]:
    return {**b, "segments": list(h.SEGMENTS), "gammas": {str(k): v for k, v in h.GAMMAS.items()},
            "preferred_gmm_components": list(PREFERRED)}
