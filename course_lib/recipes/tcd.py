"""The course's runs of TCD (distill.tcd) on the mini Stable Diffusion: its student's files, its evaluation with
strategic stochastic sampling, and the shipped student of data/tcd (trained with the shipped LCM student's recipe).

    python -m course_lib.recipes.tcd train --out data/tcd --threads 2
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import minisd, paths
from ..distill import lcm
from ..distill.tcd import GAMMA, TCDModel, distill_tcd_sd, sampler
from ..minisd import digit_batches
from ..sd import load_unet_student, save_unet_student
from . import lcm as lcm_recipes

TCD_JSON = "tcd.json"


def evaluate(sd: Any, student: nn.Module, n: int = 500, steps: int = 4, w: float | None = None,
             seeds: Sequence[int] = (0, 1, 2), gamma: float = GAMMA) -> dict[str, Any]:
    """recipes.lcm.evaluate (adherence, KID/FD against held-out and training digits, mean and spread over seeds) of
    SSS."""
    return {**lcm_recipes.evaluate(sd, student, n, steps, w, seeds, sampler=sampler(gamma)), "gamma": gamma}


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading; the shipped student: python -m course_lib.recipes.tcd train
# ----------------------------------------------------------------------------------------------------------------

def save_tcd(student: TCDModel, folder: str | os.PathLike, info: dict | None = None) -> Path:
    """The student's UNet in diffusers' format (folder/unet) and tcd.json (w range, info)."""
    return save_unet_student(student.denoiser.unet, folder, TCD_JSON, {
        "kind": "tcd", "w_range": student.w_range, "original_inference_steps": lcm.ORIGINAL_STEPS, **(info or {})})


def load_tcd(folder: str | os.PathLike, teacher: nn.Module) -> TCDModel:
    """A TCD student saved by save_tcd, for the teacher (an sd.SDDenoiser) it was distilled from."""
    denoiser, meta = load_unet_student(folder, TCD_JSON, teacher, "TCD student (save_tcd writes one)")
    return TCDModel(denoiser, w_range=tuple(meta["w_range"]))


def shipped_dir() -> Path:
    return paths.data_dir() / "tcd"


SHIPPED = "mini-sd-tcd"
RECIPE = lcm_recipes.RECIPE           # the same recipe as the shipped LCM student: a like-for-like comparison
RECREATE = "python -m course_lib.recipes.tcd train --out data/tcd --threads 2"


def load_shipped(sd: Any) -> TCDModel:
    """The shipped TCD student of the mini SD (data/tcd/mini-sd-tcd)."""
    return load_tcd(paths.shipped(shipped_dir() / SHIPPED, RECREATE), sd.model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.recipes.tcd",
                                     description="Distil the mini Stable Diffusion into a TCD student.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="TCD of the mini SD with the shipped LCM student's recipe")
    p.add_argument("--out", default=str(shipped_dir()))
    p.add_argument("--steps", type=int, default=RECIPE.steps)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = lcm.LCMConfig(**{**asdict(RECIPE), "steps": args.steps})
    sd = minisd.load_mini_sd()
    t0 = time.time()
    student, _ = distill_tcd_sd(sd, digit_batches(sd), cfg, run=lcm.train_config(cfg, "TCD: mini SD student"),
                                ckpt_dir=paths.cache_dir() / f"tcd_student_{cfg.seed}")
    secs = time.time() - t0
    results = {}
    if args.n_eval:
        for k in (2, 4, 8):
            r = evaluate(sd, student, args.n_eval, k, minisd.DEFAULT_W, (0, 1, 2), GAMMA)
            results[f"tcd {k} steps gamma {GAMMA}"] = lcm_recipes.summary(r)
            print(k, results[f"tcd {k} steps gamma {GAMMA}"], flush=True)
    info = {"command": f"{RECREATE} (steps {args.steps})", "recipe": asdict(cfg), "train_seconds": round(secs),
            "threads": torch.get_num_threads(),
            "evaluation": {"n": args.n_eval, "seeds": [0, 1, 2], "w": minisd.DEFAULT_W, "mean_std": results}}
    folder = save_tcd(student, Path(args.out) / SHIPPED, info)
    print(f"saved {folder} ({secs:.0f} s of training)", flush=True)


if __name__ == "__main__":
    main()
