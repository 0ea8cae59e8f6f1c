"""The course's runs of InstaFlow (distill.instaflow): the 2D recipe and its ablation on gmm-overlap, the capacity
sweep (notebook 04 and `bench instaflow` share them), and the shipped digits models of data/instaflow.

    instaflow_2d_budget(mode), instaflow_2d_models(budget)   triplets -> 2-RF -> one step, and direct distillation
    instaflow_sweep(...), fresh_student(like, width)         one-step students of each width on each coupling
    instaflow_unconditional(dataset, budget, x1)             the two couplings of an unconditional teacher
    DIGITS_RECIPE, train_digits, load_digits_model           InstaFlow on the digits teacher, and its ablation

    python -m course_lib.recipes.instaflow train-digits --device cuda     # the shipped digits models
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from itertools import product
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .. import paths
from ..classifier import balanced_labels
from ..conditioning import Cond, labels
from ..config import pick, seeded
from ..distill import reflow as rf
from ..distill.instaflow import (OneStepConfig, distill_conditional_reflow, distill_direct, distill_onestep, one_step,
                                 regression_error, triplets)
from ..models import Denoiser, build_denoiser, load_denoiser, null_label, save_denoiser
from ..teachers import load_teacher
from ..train import TrainConfig

# ----------------------------------------------------------------------------------------------------------------
# The shipped digits models (data/instaflow): the recipe end to end on the digits teacher, and its ablation
# ----------------------------------------------------------------------------------------------------------------

DIGITS_DIR = paths.data_dir() / "instaflow"   # see course_lib.paths
RECREATE = "python -m course_lib.recipes.instaflow train-digits"
DIGITS_MODELS = ("digits-if-2rf", "digits-instaflow-l2", "digits-instaflow", "digits-direct-l2", "digits-direct")
DIGITS_RECIPE = dict(  # trained on one GPU (see each model's config.json for the measured seconds)
    w=0.5,                   # guidance of the teacher's triplets (diffusers' guidance_scale 1.5)
    n_pairs=20_000,          # (noise, digit, label) triplets, balanced labels
    pair_sampler="dpmpp2m",  # the guided teacher's ODE solved with DPM-Solver++(2M)...
    pair_steps=16,           # ...in 16 steps
    p_uncond=0.1,            # conditional reflow keeps an unconditional velocity
    reflow=TrainConfig(steps=6000, batch_size=256, lr=2e-4, warmup=200, ema_decay=0.999, ckpt_every=500, seed=0,
                       desc="digits InstaFlow 2-RF"),
    distill_pairs_steps=16,  # the 2-RF's own pairs (unguided velocity: the triplets already carry w), Euler
    distill_l2=TrainConfig(steps=3000, batch_size=256, lr=1e-4, warmup=100, ema_decay=0.999, ckpt_every=500, seed=1,
                           desc="digits InstaFlow distill (L2)"),
    distill_lap1=TrainConfig(steps=2000, batch_size=256, lr=5e-5, warmup=100, ema_decay=0.999, ckpt_every=500,
                             seed=2, desc="digits InstaFlow distill (Lap1)"),
)


def train_digits(runs: str | os.PathLike = "runs/instaflow-digits", out: Path = DIGITS_DIR, steps_scale: float = 1.0,
                 device: str | torch.device = "cpu", n_pairs: int | None = None,
                 parts: tuple[str, ...] = ("instaflow", "direct")) -> None:
    """InstaFlow on the shipped digits teacher, and direct distillation with the same budget. Resumable (ckpts).

    triplets (guided teacher, w) -> 2-RF (init: teacher) -> 2-RF pairs -> one step, L2 then Lap1;
    direct: one step from the teacher's triplets, L2 for (reflow + L2 updates) then Lap1 for as many updates."""
    r = DIGITS_RECIPE
    runs = Path(runs)
    scale = lambda c, extra=0: dataclasses.replace(c, steps=max(1, int((c.steps + extra) * steps_scale)))
    teacher = load_teacher("digits", device=device)
    n_pairs = n_pairs or r["n_pairs"]
    y = labels(balanced_labels(n_pairs).to(device), null_label(teacher))
    data = triplets(teacher, r["w"], y, "digits-teacher-guided", r["pair_steps"], r["pair_sampler"], seed=0,
                    noise_shape=(1, 16, 16), cache_dir=runs / "pairs")
    base = {"w_pairs": r["w"], "n_pairs": n_pairs, "pairs": f"{r['pair_sampler']} {r['pair_steps']} steps",
            "command": RECREATE, "device": str(device)}

    def timed_export(name: str, fn, meta: dict) -> Denoiser:
        t0 = time.perf_counter()
        model = fn()
        save_denoiser(out / name, model, {**base, **meta, "train_seconds": round(time.perf_counter() - t0, 1)},
                      half=True)
        return load_denoiser(out / name, device=device)[0].requires_grad_(False)      # the shipped fp16 weights

    l2_cfg, lap_cfg = scale(r["distill_l2"]), scale(r["distill_lap1"])
    if "instaflow" in parts:
        flow2 = timed_export("digits-if-2rf", lambda: distill_conditional_reflow(
                                 teacher, data, rf.ReflowConfig(r["p_uncond"]), run=scale(r["reflow"]),
                                 ckpt_dir=runs / "2rf")[0],
                             {"method": "InstaFlow stage 2: conditional 2-rectified flow, init teacher weights",
                              "steps": scale(r["reflow"]).steps, "p_uncond": r["p_uncond"]})
        data2 = triplets(flow2, 0.0, y, "digits-if-2rf", r["distill_pairs_steps"], "euler", seed=1,
                         noise_shape=(1, 16, 16), cache_dir=runs / "pairs")
        st = timed_export("digits-instaflow-l2", lambda: distill_onestep(flow2, data2, OneStepConfig("l2"), run=l2_cfg,
                                                                         ckpt_dir=runs / "if-l2")[0],
                          {"method": "InstaFlow stage 3a: 2-RF distilled to one step, L2", "steps": l2_cfg.steps})
        timed_export("digits-instaflow", lambda: distill_onestep(st, data2, OneStepConfig("lap1"), run=lap_cfg,
                                                                 ckpt_dir=runs / "if-lap1")[0],
                     {"method": "InstaFlow stage 3b: then Lap1 (offline stand-in for LPIPS)", "steps": lap_cfg.steps})
    if "direct" in parts:
        d_cfg = scale(r["distill_l2"], extra=r["reflow"].steps)
        dd = timed_export("digits-direct-l2", lambda: distill_direct(teacher, data, OneStepConfig("l2"), run=d_cfg,
                                                                     ckpt_dir=runs / "direct-l2")[0],
                          {"method": "direct distillation of the guided teacher's triplets to one step, L2",
                           "steps": d_cfg.steps})
        timed_export("digits-direct", lambda: distill_onestep(dd, data, OneStepConfig("lap1"), run=lap_cfg,
                                                              ckpt_dir=runs / "direct-lap1")[0],
                     {"method": "direct distillation, then Lap1 (same budget as InstaFlow)", "steps": lap_cfg.steps})
    print(f"wrote {', '.join(DIGITS_MODELS)} under {out}")


def load_digits_model(name: str, device: str | torch.device = "cpu") -> Denoiser:
    """A shipped digits InstaFlow model (eval, gradients off): one of DIGITS_MODELS."""
    if name not in DIGITS_MODELS:
        raise ValueError(f"unknown digits InstaFlow model {name!r}; valid: {', '.join(DIGITS_MODELS)}")
    return load_denoiser(paths.shipped(DIGITS_DIR / name, RECREATE), RECREATE, device=device)[0].requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# The 2D recipe and its ablation on gmm-overlap, and the capacity sweep (notebook 04, `bench instaflow`)
# ----------------------------------------------------------------------------------------------------------------

def instaflow_2d_budget(mode: str) -> dict:
    """Budgets of the 2D InstaFlow recipe and its ablation on gmm-overlap (shared by the benchmark and notebook 04).

    w: guidance of the teacher's triplets; pair_steps: DPM-Solver++ steps of the guided teacher; flow_pair_steps:
    Euler steps of the 2-RF for the distillation pairs; reflow_steps / distill_steps: updates of each stage (direct
    distillation gets their sum: the same budget); sweep: fresh one-step students of each width, trained on each
    coupling with n_pairs of its pairs for `steps` updates (the capacity sweep)."""
    return pick(mode,
                smoke=dict(n=400, n_pairs=800, w=0.5, pair_steps=4, flow_pair_steps=2, reflow_steps=20,
                           distill_steps=20, batch=128, lr=5e-4, p_uncond=0.1,
                           sweep=dict(widths=(8, 32), n_pairs=(200, 800), steps=(10,))),
                laptop=dict(n=10_000, n_pairs=10_000, w=0.5, pair_steps=16, flow_pair_steps=8, reflow_steps=300,
                            distill_steps=300, batch=512, lr=5e-4, p_uncond=0.1,
                            sweep=dict(widths=(8, 32, 256), n_pairs=(1000, 10_000), steps=(300, 2000))),
                full=dict(n=50_000, n_pairs=100_000, w=0.5, pair_steps=64, flow_pair_steps=32, reflow_steps=4000,
                          distill_steps=4000, batch=2048, lr=3e-4, p_uncond=0.1,
                          sweep=dict(widths=(8, 16, 32, 64, 256), n_pairs=(10_000, 100_000), steps=(2000,))))


def instaflow_2d_models(budget: dict, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                        progress: bool = True, device: str | torch.device = "cpu") -> tuple[dict, dict, dict]:
    """InstaFlow on the shipped gmm-overlap teacher (loaded on `device`), and direct distillation with the same
    budget: 2-RF budget["reflow_steps"] updates, InstaFlow those plus budget["distill_steps"], direct distillation
    their sum.

    Returns ({"teacher", "2-rf", "instaflow", "direct-distill": model}, {"teacher", "2-rf": triplets (eps, x0, cond)},
    {name: train seconds}). The teacher's triplets use guidance w; the 2-RF's pairs its plain velocity (w = 0)."""
    b = budget
    cache = cache_dir or rf.CACHE_DIR
    teacher = load_teacher("gmm-overlap-vp", device=device)
    y = labels((torch.arange(b["n_pairs"]) % null_label(teacher)).to(device), null_label(teacher))   # balanced
    cfg = TrainConfig(steps=b["reflow_steps"], batch_size=b["batch"], lr=b["lr"], lr_schedule="linear", ema_decay=0.0,
                      seed=seed)
    data = {"teacher": triplets(teacher, b["w"], y, f"gmm-overlap-w{b['w']}-{seed}", b["pair_steps"],
                                seed=seed + 10, cache_dir=cache, on_mismatch="regenerate", progress=progress,
                                verbose=progress)}
    secs, t0 = {}, time.perf_counter()
    flow2, _ = distill_conditional_reflow(teacher, data["teacher"], rf.ReflowConfig(b["p_uncond"]),
                                          run=dataclasses.replace(cfg, desc="gmm-overlap 2-RF"), progress=progress)
    secs["2-rf"] = time.perf_counter() - t0
    data["2-rf"] = triplets(flow2, 0.0, y, f"gmm-overlap-2rf-w{b['w']}-{seed}", b["flow_pair_steps"], "euler",
                            seed=seed + 11, cache_dir=cache, on_mismatch="regenerate", progress=progress,
                            verbose=progress)
    t0 = time.perf_counter()
    student, _ = distill_onestep(flow2, data["2-rf"], OneStepConfig(),
                                 run=dataclasses.replace(cfg, steps=b["distill_steps"], desc="2-RF -> 1 step"),
                                 progress=progress)
    secs["instaflow"] = time.perf_counter() - t0 + secs["2-rf"]
    t0 = time.perf_counter()
    direct, _ = distill_direct(teacher, data["teacher"], OneStepConfig(),
                               run=dataclasses.replace(cfg, steps=b["reflow_steps"] + b["distill_steps"],
                                                       desc="teacher -> 1 step (direct)"), progress=progress)
    secs["direct-distill"] = time.perf_counter() - t0
    return {"teacher": teacher, "2-rf": flow2, "instaflow": student, "direct-distill": direct}, data, secs


def instaflow_sweep(data: dict, targets: dict, x1: Tensor, cond: Cond | None, sweep: dict, budget: dict,
                    swd: Callable[[Tensor], float], like: Denoiser, dataset: str = "gmm-overlap", seed: int = 0,
                    progress: bool = True, return_students: bool = False) -> list[dict]:
    """The capacity sweep: a fresh one-step student of each width (shaped like `like`: same classes, on its device),
    trained (L2) on the first n_pairs triplets of each coupling, data["direct"] (the teacher's) and data["reflow"]
    (the 2-RF's), for `steps` updates; scored by swd(samples) and by held-out regression error against that
    coupling's endpoints targets[coupling] from noise x1 (labels cond, or None for unconditional data).

    Returns one record per trained student: {"coupling", "width", "n_pairs", "train_steps", "train_seconds",
    "swd", "heldout_err"} (`dataset` only names the progress bar), plus "student" (the trained model) with
    return_students=True (a benchmark evaluates them again on other noise)."""
    device = next(like.parameters()).device
    records = []
    grid = list(product(sweep["widths"], sweep["n_pairs"], sweep["steps"]))
    if progress:
        from tqdm.auto import tqdm
        grid = tqdm(grid, desc=f"capacity sweep ({dataset})", mininterval=0.5)
    for width, n_pairs, steps in grid:
        cfg = TrainConfig(steps=steps, batch_size=budget["batch"], lr=2e-3 if width <= 32 else 1e-3,
                          lr_schedule="linear", ema_decay=0.0, seed=seed)
        for coupling in ("direct", "reflow"):
            part = tuple(None if v is None else v[:n_pairs] for v in data[coupling])
            t0 = time.perf_counter()
            student, _ = distill_onestep(fresh_student(like, width, seed=seed).to(device), part, OneStepConfig(),
                                         run=dataclasses.replace(cfg, desc=f"w{width}"), progress=False)
            sec = time.perf_counter() - t0
            records.append(dict(coupling=coupling, width=width, n_pairs=n_pairs, train_steps=steps,
                                train_seconds=round(sec, 1), swd=swd(one_step(student, x1, cond)),
                                heldout_err=regression_error(student, x1, targets[coupling], cond),
                                **({"student": student} if return_students else {})))
    return records


def instaflow_unconditional(dataset: str, budget: dict, x1: Tensor, seed: int = 0, progress: bool = True,
                            return_flow: bool = False) -> tuple:
    """The two couplings of an unconditional diffusion teacher (shipped "<dataset>-vp", loaded on x1's device): its
    own ODE pairs (DPM-Solver++, pair_steps) and the pairs of its 2-RF (reflow initialised from its weights, Euler
    flow_pair_steps). Returns ({"direct", "reflow": (eps, x0, None)}, {"direct", "reflow": endpoints from the
    evaluation noise x1 (N, 2)}, teacher), and the 2-RF as a fourth element with return_flow=True."""
    b = budget
    teacher = load_teacher(f"{dataset}-vp", device=x1.device)
    cfg = TrainConfig(steps=b["reflow_steps"], batch_size=b["batch"], lr=b["lr"], lr_schedule="linear", ema_decay=0.0,
                      seed=seed, desc=f"{dataset} 2-RF")
    pairs = rf.cached_pairs(teacher, f"{dataset}-vp-{seed}", b["n_pairs"], b["pair_steps"], "dpmpp2m",
                            seed=seed + 10, on_mismatch="regenerate", progress=progress, verbose=progress)
    flow2, _ = rf.distill_reflow(teacher, pairs, rf.ReflowConfig(), run=cfg, progress=progress)
    pairs2 = rf.cached_pairs(flow2, f"{dataset}-vp-2rf-{seed}", b["n_pairs"], b["flow_pair_steps"], "euler",
                             seed=seed + 11, on_mismatch="regenerate", progress=progress, verbose=progress)
    targets = {"direct": rf.generate_pairs(teacher, x1, b["pair_steps"], "dpmpp2m")[1],
               "reflow": rf.generate_pairs(flow2, x1, b["flow_pair_steps"], "euler")[1]}
    out = ({"direct": (*pairs, None), "reflow": (*pairs2, None)}, targets, teacher)
    return (*out, flow2) if return_flow else out


def fresh_student(like: Denoiser, hidden: int, depth: int | None = None, seed: int = 0) -> Denoiser:
    """A randomly initialised velocity MLP of width `hidden` with `like`'s classes: the capacity sweep's student
    (trained from scratch with distill_onestep on a coupling, so the coupling alone decides how hard it is to
    learn)."""
    c = copy.deepcopy(like.config())
    c["net"].update(hidden=hidden, **({"depth": depth} if depth else {}))
    c["net"].pop("guidance_range", None)
    c.update(process={"name": "rf"}, parameterization="velocity")
    with seeded(seed):  # initialisation; the caller's global RNG is left as it was
        return build_denoiser(c)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m course_lib.recipes.instaflow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train-digits", help="train the shipped digits InstaFlow models and the direct baseline")
    tr.add_argument("--runs", default="runs/instaflow-digits", help="checkpoints and triplet caches (a rerun resumes)")
    tr.add_argument("--steps-scale", type=float, default=1.0, help="multiply every training budget (tests: 0.01)")
    tr.add_argument("--out", default=str(DIGITS_DIR))
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--n-pairs", type=int, default=None, help=f"triplets (default {DIGITS_RECIPE['n_pairs']})")
    tr.add_argument("--parts", default="instaflow,direct", help="which models: instaflow, direct or both")
    args = ap.parse_args(argv)
    train_digits(args.runs, Path(args.out), args.steps_scale, args.device, args.n_pairs,
                 tuple(p.strip() for p in args.parts.split(",")))


if __name__ == "__main__":
    main()
