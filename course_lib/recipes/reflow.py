"""The course's runs of rectified flow and reflow (distill.reflow): the 2D recipe that notebook 03 and
`bench reflow` share, and the shipped digits flows of data/reflow.

    reflow_2d_budget(mode), reflow_2d_models(dataset, budget)   1-RF -> 2-RF -> 3-RF and the 1-step distillations
    DIGITS_RECIPE, train_digits, load_digits_flow              the digits teacher reflowed, and distilled to 1 step

    python -m course_lib.recipes.reflow train-digits     # the shipped digits 2-RF and its 1-step distillation
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

from .. import paths
from ..classifier import balanced_labels
from ..conditioning import labels
from ..config import pick
from ..distill.reflow import CACHE_DIR, KStepConfig, ReflowConfig, cached_pairs, distill_kstep, distill_reflow
from ..models import Denoiser, load_denoiser, save_denoiser
from ..teachers import load_teacher
from ..train import TrainConfig

# ----------------------------------------------------------------------------------------------------------------
# The shipped digits flows (data/reflow)
# ----------------------------------------------------------------------------------------------------------------

DIGITS_DIR = paths.data_dir() / "reflow"   # see course_lib.paths
RECREATE = "python -m course_lib.recipes.reflow train-digits"
DIGITS_RECIPE = dict(  # budgets of the shipped models (data/reflow); on a shared 2-core CPU, 1 thread: ~12 + ~8 min
    n_pairs=4000,            # noise -> image pairs of the diffusion teacher (balanced labels)
    pair_sampler="dpmpp2m",  # the teacher's ODE solved with DPM-Solver++(2M)...
    pair_steps=16,           # ...in 16 steps
    reflow=TrainConfig(steps=1005, batch_size=64, lr=1e-4, warmup=100, ema_decay=0.999, ckpt_every=100, seed=0,
                       desc="digits 2-RF"),
    distill_pairs_steps=16,  # the 2-RF's own pairs, Euler 16 steps
    distill=TrainConfig(steps=670, batch_size=64, lr=1e-4, warmup=50, ema_decay=0.999, ckpt_every=100, seed=1,
                        desc="digits 2-RF -> 1 step"),
)


def train_digits(runs: str | os.PathLike = "runs/reflow-digits", out: Path = DIGITS_DIR, steps_scale: float = 1.0,
                 device: str | torch.device = "cpu") -> None:
    """Reflow of the shipped digits diffusion teacher (InstaFlow's recipe at toy scale) and its 1-step distillation:
    pairs from the teacher's ODE -> 2-RF initialised from the teacher's weights -> 1-step student. Resumable."""
    r = DIGITS_RECIPE
    teacher = load_teacher("digits", device=device)
    n = r["n_pairs"]
    y = labels(balanced_labels(n).to(device), teacher.net.num_classes)
    eps, x0 = cached_pairs(teacher, "digits-teacher", n, r["pair_steps"], r["pair_sampler"], seed=0,
                           cache_dir=Path(runs) / "pairs", cond=y, noise_shape=(1, 16, 16))
    scale = lambda c: dataclasses.replace(c, steps=max(1, int(c.steps * steps_scale)))
    cfg = scale(r["reflow"])
    t0 = time.perf_counter()
    flow2, _ = distill_reflow(teacher, (eps, x0, y), ReflowConfig(), run=cfg, ckpt_dir=Path(runs) / "2rf")
    meta = {"method": "2-rectified flow of the digits teacher (pairs: teacher ODE, DPM-Solver++ "
                      f"{r['pair_steps']} steps; init: teacher weights as velocity)", "n_pairs": n,
            "steps": cfg.steps, "batch_size": cfg.batch_size, "train_seconds": round(time.perf_counter() - t0, 1),
            "command": RECREATE}
    save_denoiser(out / "digits-2rf", flow2, meta, half=True)
    flow2, _ = load_denoiser(out / "digits-2rf")              # the shipped (fp16-rounded) weights
    eps2, x02 = cached_pairs(flow2, "digits-2rf", n, r["distill_pairs_steps"], "euler", seed=1,
                             cache_dir=Path(runs) / "pairs", cond=y, noise_shape=(1, 16, 16))
    cfg = scale(r["distill"])
    t0 = time.perf_counter()
    student, _ = distill_kstep(flow2, (eps2, x02, y), KStepConfig(1), run=cfg, ckpt_dir=Path(runs) / "2rf-distill1")
    save_denoiser(out / "digits-2rf-distill1", student, {**meta, "method": "2-RF distilled to 1 Euler step (L2)",
                  "steps": cfg.steps, "train_seconds": round(time.perf_counter() - t0, 1)}, half=True)
    print(f"wrote {out / 'digits-2rf'} and {out / 'digits-2rf-distill1'}")


def load_digits_flow(name: str = "digits-2rf", device: str | torch.device = "cpu") -> Denoiser:
    """A shipped digits flow: "digits-2rf" or "digits-2rf-distill1" (eval mode, gradients off)."""
    if name not in ("digits-2rf", "digits-2rf-distill1"):
        raise ValueError(f"unknown digits flow {name!r}; valid: digits-2rf, digits-2rf-distill1")
    return load_denoiser(paths.shipped(DIGITS_DIR / name, RECREATE), RECREATE, device=device)[0].requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# 7. The 2D recipe: budgets, and 1-RF -> 2-RF -> 3-RF with the 1-step distillations (notebook 03, `bench reflow`)
# ----------------------------------------------------------------------------------------------------------------

def reflow_2d_budget(mode: str) -> dict:
    """Budgets of the 2D reflow experiments (shared by the benchmark and notebook 03).

    n: evaluation samples; n_pairs: pairs per round; pair_steps: Heun steps solving the 1-RF's ODE for its pairs
    (later rounds are nearly straight: pair_steps_later); steps/batch/lr: every reflow and distillation run."""
    return pick(mode,
                smoke=dict(n=500, n_pairs=1000, pair_steps=4, pair_steps_later=2, steps=20, batch=128, lr=5e-4),
                laptop=dict(n=10_000, n_pairs=10_000, pair_steps=16, pair_steps_later=8, steps=300, batch=512, lr=1e-3),
                full=dict(n=50_000, n_pairs=100_000, pair_steps=64, pair_steps_later=32, steps=4000, batch=2048,
                          lr=3e-4))


def reflow_2d_models(dataset: str, budget: dict, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """1-RF (the shipped flow-matching teacher "<dataset>-rf", loaded on `device`) -> 2-RF -> 3-RF, and the 1-step
    distillations of 1-RF and 2-RF (Liu et al. 2022, Algorithm 1), each trained for budget["steps"] updates.
    Pairs are cached (data/cache/reflow); their noise is drawn on the CPU, so they are the same on every device.
    Returns ({name: model}, {name: seconds}: training seconds of each trained model, "pairs-k-rf" for the pairs)."""
    cfg = TrainConfig(steps=budget["steps"], batch_size=budget["batch"], lr=budget["lr"], lr_schedule="linear",
                      ema_decay=0.0, seed=seed)
    models = {"1-rf": load_teacher(f"{dataset}-rf", device=device)}
    seconds: dict[str, float] = {}
    pairs = {}
    for k in (1, 2):
        steps = budget["pair_steps"] if k == 1 else budget["pair_steps_later"]
        t0 = time.perf_counter()
        pairs[k] = cached_pairs(models[f"{k}-rf"], f"{dataset}-{k}rf-{seed}", budget["n_pairs"], steps, "heun",
                                seed=seed + k, cache_dir=cache_dir or CACHE_DIR, on_mismatch="regenerate",
                                progress=progress, verbose=progress)
        seconds[f"pairs-{k}-rf"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        models[f"{k + 1}-rf"], _ = distill_reflow(models[f"{k}-rf"], pairs[k], ReflowConfig(),
                                                  run=dataclasses.replace(cfg, desc=f"{dataset} {k + 1}-RF"),
                                                  progress=progress)
        seconds[f"{k + 1}-rf"] = time.perf_counter() - t0
    for k in (1, 2):
        t0 = time.perf_counter()
        models[f"{k}-rf-distill"], _ = distill_kstep(models[f"{k}-rf"], pairs[k], KStepConfig(1),
                                                     run=dataclasses.replace(cfg, desc=f"{dataset} {k}-RF -> 1 step"),
                                                     progress=progress)
        seconds[f"{k}-rf-distill"] = time.perf_counter() - t0
    return models, seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m course_lib.recipes.reflow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train-digits", help="train the shipped digits 2-RF and its 1-step distillation")
    tr.add_argument("--runs", default="runs/reflow-digits", help="checkpoints and pair caches (a rerun resumes)")
    tr.add_argument("--steps-scale", type=float, default=1.0, help="multiply every training budget (tests: 0.01)")
    tr.add_argument("--out", default=str(DIGITS_DIR))
    tr.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    train_digits(args.runs, Path(args.out), args.steps_scale, args.device)


if __name__ == "__main__":
    main()
