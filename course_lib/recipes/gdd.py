"""The course's runs of GDD / GDD-I (distill.gdd): the budgets that notebook 10 and `bench gdd` share, one run on
a shipped 2D or digits teacher, and the shipped longer-trained GDD-I students of data/gdd.

    gdd_budget(mode)                             updates, batch, learning rates, R1 weights, EMA per data set
    train_2d(ds, freeze, b, seed, device)        GDD(-I) of the shipped {ds}-vp teacher -> (G, seconds, fraction)
    train_digits(freeze, b, seed, device)        GDD(-I) of the digits teacher, class-conditional discriminator
    load_shipped(ds)                             the shipped GDD-I student of data/gdd/<ds>-gdd-i (a GDDPrecond)

    python -m course_lib.recipes.gdd train       # the shipped 2D students (SHIP_STEPS updates each), measured
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import paths
from ..conditioning import labels
from ..config import pick, seeded
from ..data2d import sample_2d
from ..distill import gdd
from ..images import batch_sampler, load_digits
from ..models import load_model, save_model
from ..teachers import load_teacher
from ..train import TrainConfig

SHIP_DIR = paths.data_dir() / "gdd"          # see course_lib.paths
SHIP_DATASETS = ("gmm", "checkerboard")
RECREATE = "python -m course_lib.recipes.gdd train"


def gdd_budget(mode: str) -> dict:
    """Budgets of bench gdd and notebook 10 (one source): updates, batch and learning rates per data set."""
    return dict(steps=pick(mode, smoke=10, laptop=800, full=5000), batch=pick(mode, smoke=64, laptop=256, full=1024),
                lr=pick(mode, smoke=1e-3, laptop=1e-3, full=3e-4), gamma=1e-3, lr_d_x=3.0,
                digits_steps=pick(mode, smoke=2, laptop=150, full=3000),
                digits_batch=pick(mode, smoke=8, laptop=32, full=128),
                digits_lr=pick(mode, smoke=5e-4, laptop=5e-4, full=1e-4), digits_gamma=1e-2,
                # 2D: a generator EMA and cosine-annealed learning rates (at a constant rate the GAN oscillates: the
                # raw generator's SWD jumps several-fold between checkpoints); smoke keeps the plain recipe
                ema=pick(mode, smoke=0.0, laptop=0.99, full=0.999),
                lr_schedule=pick(mode, smoke="constant", laptop="cosine", full="cosine"))


def train_2d(ds: str, freeze: str, b: dict, seed: int, device, progress: bool):
    """(generator, seconds, trained fraction): GDD(-I) of the shipped {ds}-vp teacher, 1:1 updates."""
    teacher = load_teacher(f"{ds}-vp", device=device)
    x_ex = sample_2d(ds, 64, torch.Generator().manual_seed(seed))[0].to(device)
    with seeded(seed):
        disc = gdd.make_discriminator(teacher, x_ex, hidden=128)
    cfg = gdd.GDDConfig(freeze=freeze, lr_g=b["lr"], lr_d=b["lr"] * b["lr_d_x"], gamma=b["gamma"],
                        ema_decay=b.get("ema", 0.0), lr_schedule=b.get("lr_schedule", "constant"))
    t0 = time.perf_counter()
    G, done = gdd.distill_gdd(teacher, lambda n, g: {"x": sample_2d(ds, n, g)[0].to(device)}, cfg,
                              run=TrainConfig(steps=b["steps"], batch_size=b["batch"], seed=seed,
                                              desc=f"GDD {freeze} {ds}"), disc=disc, progress=progress)
    return G, time.perf_counter() - t0, done.logs["trained_fraction"][0]


def train_digits(freeze: str, b: dict, seed: int, device, progress: bool):
    """(generator, seconds, trained fraction): GDD(-I) of the digits teacher, class-conditional discriminator."""
    teacher = load_teacher("digits", device=device)
    x_train, y_train = load_digits(16, "train")
    draw = batch_sampler(x_train, y_train)

    def data(n, g):
        x, y = draw(n, g)
        return {"x": x.to(device), "cond": labels(y.to(device), teacher.net.num_classes)}

    with seeded(seed):
        disc = gdd.make_discriminator(teacher, x_train[:8].to(device),
                                      labels(y_train[:8].to(device), teacher.net.num_classes))
    cfg = gdd.GDDConfig(freeze=freeze, lr_g=b["digits_lr"], lr_d=b["digits_lr"] * b["lr_d_x"], gamma=b["digits_gamma"])
    t0 = time.perf_counter()
    G, done = gdd.distill_gdd(teacher, data, cfg, run=TrainConfig(steps=b["digits_steps"], batch_size=b["digits_batch"],
                                                                  seed=seed, desc=f"GDD {freeze} digits"),
                              disc=disc, progress=progress)
    return G, time.perf_counter() - t0, done.logs["trained_fraction"][0]


def load_shipped(ds: str, device: str | torch.device = "cpu") -> tuple[gdd.GDDPrecond, dict]:
    """The shipped GDD-I student of the {ds}-vp teacher (data/gdd/<ds>-gdd-i): (generator in eval mode, no grad;
    its config, with "recipe" and "train_seconds")."""
    model, config = load_model(SHIP_DIR / f"{ds}-gdd-i", RECREATE, device)      # a precond.Boundary of kind "gdd"
    G = gdd.GDDPrecond(model.model, **model.params)
    return G.eval().requires_grad_(False), config


def ship_budget() -> dict:
    """The shipped students' budget: the laptop recipe of gdd_budget (EMA 0.99, cosine-annealed learning rates) with
    SHIP_SCALE times the updates."""
    b = gdd_budget("laptop")
    return {**b, "steps": b["steps"] * SHIP_SCALE}


SHIP_SCALE = 3     # the shipped 2D students train 3x the laptop budget's updates


def train_shipped(out: str | Path = SHIP_DIR, datasets=SHIP_DATASETS, steps_scale: float = 1.0, seed: int = 0,
                  device: str | torch.device = "cpu") -> None:
    """Train and save the shipped GDD-I student of each 2D teacher: <out>/<ds>-gdd-i/{model.safetensors,
    config.json} (the generator, its recipe and its training time)."""
    b = ship_budget()
    b["steps"] = max(1, int(b["steps"] * steps_scale))
    for ds in datasets:
        G, secs, frac = train_2d(ds, "gdd-i", b, seed, device, progress=True)
        save_model(Path(out) / f"{ds}-gdd-i", G.cpu(), {"recipe": {**b, "freeze": "gdd-i", "seed": seed},
                                                        "train_seconds": round(secs, 1), "trained_fraction": frac,
                                                        "command": RECREATE})
        print(f"{ds}: {b['steps']} updates in {secs:.0f} s -> {Path(out) / f'{ds}-gdd-i'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m course_lib.recipes.gdd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train and save the shipped 2D GDD-I students")
    tr.add_argument("--out", default=str(SHIP_DIR))
    tr.add_argument("--datasets", nargs="+", default=list(SHIP_DATASETS), choices=list(SHIP_DATASETS))
    tr.add_argument("--steps-scale", type=float, default=1.0, help="multiply the budget (tests: 0.01)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    train_shipped(args.out, args.datasets, args.steps_scale, args.seed, args.device)


if __name__ == "__main__":
    main()
