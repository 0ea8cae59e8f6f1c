"""`bench gdd`: GDD and GDD-I (Zheng & Yang 2024, arXiv 2405.20750) on the shipped 2D and digits teachers. One-step
students measured against the DATA (SWD, precision / recall on the mixture, in_squares on the checkerboard; held-out
KID / FD on digits), beside the teacher's DPM-Solver++ sweep (its best NFE; digits at 16 and 32 steps) and the data
floor; on 2D also the frozen-fraction sweep (models "gdd-freeze-<rule>", field trained_fraction)."""
from __future__ import annotations

import time

import torch

from ..classifier import balanced_labels
from ..conditioning import labels
from ..config import default_device, pick, seeded
from ..data2d import sample_2d
from ..distill import gdd
from ..distill.gan import generate_one_step as one_step
from ..images import batch_sampler, load_digits
from ..plotting import table
from ..teachers import load_teacher
from ..train import TrainConfig
from . import register
from .core import (Evaluation, digits_floor, digits_n, digits_teacher, over_best, prior, reference_2d,
                   score_2d, score_digits, side_by_side, sweep_2d, teacher_best, timed, train_fields)

TEACHER_NFES = (1, 2, 4, 8, 16, 32, 64)
SWEEP = ("embeddings-only",)          # 2D: wider freezing rules beside "none" (gdd) and "gdd-i"
METHODS = {"gdd": "none", "gdd-i": "gdd-i"}


def gdd_budget(mode: str) -> dict:
    """Budgets of bench gdd (and the notebook's laptop budget): updates, batch and learning rates per data set."""
    return dict(steps=pick(mode, smoke=10, laptop=800, full=5000), batch=pick(mode, smoke=64, laptop=256, full=1024),
                lr=pick(mode, smoke=1e-3, laptop=1e-3, full=3e-4), gamma=1e-3, lr_d_x=3.0,
                digits_steps=pick(mode, smoke=2, laptop=150, full=3000),
                digits_batch=pick(mode, smoke=8, laptop=32, full=128),
                digits_lr=pick(mode, smoke=5e-4, laptop=5e-4, full=1e-4), digits_gamma=1e-2)


def train_2d(ds: str, freeze: str, b: dict, seed: int, device, progress: bool):
    """(generator, seconds, trained fraction): GDD(-I) of the shipped {ds}-vp teacher, 1:1 updates."""
    teacher = load_teacher(f"{ds}-vp", device=device)
    x_ex = sample_2d(ds, 64, torch.Generator().manual_seed(seed))[0].to(device)
    with seeded(seed):
        disc = gdd.make_discriminator(teacher, x_ex, hidden=128)
    cfg = gdd.GDDConfig(freeze=freeze, lr_g=b["lr"], lr_d=b["lr"] * b["lr_d_x"], gamma=b["gamma"])
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


@register("gdd", "GDD and GDD-I one-step students (GAN only) on 2D and digits, the frozen-fraction sweep")
def bench_gdd(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """GDD (model "gdd": every parameter trains) and GDD-I ("gdd-i": the blocks' convolutions and attention output
    projections frozen, distill.gdd.frozen_name) of the shipped vp teachers: a non-saturating GAN with lazy R1 and no
    distillation term, the discriminator's features from the frozen teacher on re-noised inputs. One-step students
    (nfe 1) against the data: 2D "swd", "precision", "recall" (gmm), "in_squares" (checkerboard); digits
    "kid_heldout", "kid_train", "fd_heldout", "class_acc"; beside the teacher's DPM-Solver++ sweep and the data floor.
    2D sweep: "gdd-freeze-<rule>" for the wider rules in SWEEP. Rows carry train_seconds, train_updates and
    trained_fraction."""
    device = torch.device(device) if device is not None else default_device()
    b = gdd_budget(mode)
    n = pick(mode, smoke=250, laptop=5000, full=25_000)
    progress = mode != "smoke"
    ev = Evaluation(seed, device)
    for ds in ("gmm", "checkerboard"):
        teacher = load_teacher(f"{ds}-vp", device=device)
        students = {name: train_2d(ds, rule, b, seed, device, progress) for name, rule in METHODS.items()}
        if ds == "gmm":
            students.update({f"gdd-freeze-{r}": train_2d(ds, r, b, seed, device, progress) for r in SWEEP})
        for s in ev.seeds:
            ref = reference_2d(ev, ds, n, s)
            sweep_2d(ev, teacher, teacher.process, ds, "teacher", "dpmpp2m", ref,
                     pick(mode, smoke=(1, 2, 4), laptop=TEACHER_NFES, full=TEACHER_NFES), s + 3, device)
            z = prior(teacher.process, (n, 2), s + 4, device)
            for name, (G, secs, frac) in students.items():
                x, sec = timed(lambda: one_step(G, z), device)
                score_2d(ev, ds, name, x, ref, sec, nfe=1, steps=1, compare=True, sampler="one-step", n=n,
                         trained_fraction=round(frac, 4), **train_fields(secs, b["steps"]))
    digits_rows(ev, mode, b, seed, device)
    rows = ev.rows()
    print(gdd_summary(rows))
    return rows, {**b, "n": n, "eval_seeds": ev.seeds, "sweep": list(SWEEP),
                  "discriminator": "frozen teacher features on re-noised inputs (LADD), trainable heads"}


def digits_rows(ev: Evaluation, mode: str, b: dict, seed: int, device) -> None:
    """Digits: GDD and GDD-I one-step students on thousands of samples per seed (balanced labels), the teacher
    (DPM-Solver++, 16 and 32 steps) on a few hundred, beside the data floor."""
    teacher = load_teacher("digits", device=device)
    students = {name: train_digits(rule, b, seed, device, mode != "smoke") for name, rule in METHODS.items()}
    big, small = digits_n(mode, cheap=True), digits_n(mode, cheap=False)
    y = lambda k: balanced_labels(k).to(device)
    for s in ev.seeds:
        digits_floor(ev, s)
        for steps in (16, 32):
            digits_teacher(ev, teacher, s, small, steps, device, with_labels=True)
        z = prior(teacher.process, (big, 1, 16, 16), s + 7, device)
        for name, (G, secs, frac) in students.items():
            with torch.no_grad():
                x, sec = timed(lambda: one_step(G, z, labels(y(big), teacher.net.num_classes)), device)
            score_digits(ev, name, x, sec, nfe=1, steps=1, y=y(big), sampler="one-step",
                         trained_fraction=round(frac, 4), **train_fields(secs, b["digits_steps"]))


def gdd_summary(rows: list[dict]) -> str:
    """Per 2D data set: data, the teacher's best NFE (lowest mean SWD) and every one-step student with its SWD over
    the teacher's best per seed; digits: every row side by side."""
    out = []
    for ds in ("gmm", "checkerboard"):
        mine = [r for r in rows if r["dataset"] == ds]
        best = teacher_best(mine)
        keep = [r for r in mine if r["model"] != "teacher" or (best and r["nfe"] in (1, best["nfe"]))]
        for d in over_best(side_by_side(keep, ("dataset", "model", "nfe")), best):
            d["trained"] = d["rows"].get("swd", {}).get("trained_fraction", "")
            d["train s"] = d["rows"].get("swd", {}).get("train_seconds", "")
            out.append(d)
    digits = side_by_side([r for r in rows if r["dataset"] == "digits"], ("dataset", "model", "nfe"))
    for d in digits:
        d["trained"] = d["rows"]["kid_heldout"].get("trained_fraction", "")
        d["train s"] = d["rows"]["kid_heldout"].get("train_seconds", "")
    return (table(out, ["dataset", "model", "nfe", "swd", "swd / teacher best", "in_squares", "precision", "recall",
                        "trained", "train s"])
            + "\n\n" + table(digits, ["dataset", "model", "nfe", "kid_heldout", "kid_train", "fd_heldout", "class_acc",
                                      "trained", "train s"]))
