"""`bench gdd`: GDD and GDD-I (Zheng & Yang 2024, arXiv 2405.20750) on the shipped 2D and digits teachers. One-step
students measured against the DATA (SWD, precision / recall on the mixture, in_squares on the checkerboard; held-out
KID / FD on digits), beside the teacher's DPM-Solver++ sweep (its best NFE; digits at 16 and 32 steps) and the data
floor; on 2D also the frozen-fraction sweep (models "gdd-freeze-<rule>", field trained_fraction)."""
from __future__ import annotations


import torch

from ..classifier import balanced_labels
from ..conditioning import labels
from ..config import default_device, pick
from ..distill.gan import generate_one_step as one_step
from ..plotting import table
from ..recipes.gdd import SHIP_DATASETS, gdd_budget, load_shipped, train_2d, train_digits
from ..teachers import load_teacher
from . import register
from .core import (Evaluation, digits_floor, digits_n, digits_teacher, lines_over_best, prior, reference_2d, score_2d,
                   score_digits, side_by_side, sweep_2d, timed, train_fields)

TEACHER_NFES = (1, 2, 4, 8, 16, 32, 64)
SWEEP = ("embeddings-only",)          # 2D: wider freezing rules beside "none" (gdd) and "gdd-i"
METHODS = {"gdd": "none", "gdd-i": "gdd-i"}


@register("gdd", "GDD and GDD-I one-step students (GAN only) on 2D and digits, the frozen-fraction sweep")
def bench_gdd(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """GDD (model "gdd": every parameter trains) and GDD-I ("gdd-i": the blocks' convolutions and attention output
    projections frozen, distill.gdd.frozen_name) of the shipped vp teachers: a non-saturating GAN with lazy R1 and no
    distillation term, the discriminator's features from the frozen teacher on re-noised inputs. One-step students
    (nfe 1) against the data: 2D "swd", "precision", "recall" (gmm), "in_squares" (checkerboard); digits
    "kid_heldout", "kid_train", "fd_heldout", "class_acc"; beside the teacher's DPM-Solver++ sweep and the data floor.
    2D sweep: "gdd-freeze-<rule>" for the wider rules in SWEEP; "gdd-i-shipped": the shipped longer-trained GDD-I
    student (data/gdd, recipes.gdd), measured on the same seeds (its train_seconds are those of its making). Rows
    carry train_seconds, train_updates and trained_fraction."""
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
        updates = {name: b["steps"] for name in students}
        if ds in SHIP_DATASETS:                    # the shipped longer-trained GDD-I student (data/gdd), measured here
            G, cfg = load_shipped(ds, device)
            students["gdd-i-shipped"] = (G, cfg["train_seconds"], cfg["trained_fraction"])
            updates["gdd-i-shipped"] = cfg["recipe"]["steps"]
        for s in ev.seeds:
            ref = reference_2d(ev, ds, n, s)
            sweep_2d(ev, teacher, teacher.process, ds, "teacher", "dpmpp2m", ref,
                     pick(mode, smoke=(1, 2, 4), laptop=TEACHER_NFES, full=TEACHER_NFES), s + 3, device)
            z = prior(teacher.process, (n, 2), s + 4, device)
            for name, (G, secs, frac) in students.items():
                x, sec = timed(lambda: one_step(G, z), device)
                score_2d(ev, ds, name, x, ref, sec, nfe=1, steps=1, compare=True, sampler="one-step", n=n,
                         trained_fraction=round(frac, 4), **train_fields(secs, updates[name]))
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
    out = lines_over_best(rows, ("gmm", "checkerboard"),
                          lambda r, best: r["model"] != "teacher" or (best and r["nfe"] in (1, best["nfe"])))
    for d in out:
        d["trained"] = d["rows"].get("swd", {}).get("trained_fraction", "")
        d["train s"] = d["rows"].get("swd", {}).get("train_seconds", "")
    digits = side_by_side([r for r in rows if r["dataset"] == "digits"], ("dataset", "model", "nfe"))
    for d in digits:
        d["trained"] = d["rows"]["kid_heldout"].get("trained_fraction", "")
        d["train s"] = d["rows"]["kid_heldout"].get("train_seconds", "")
    return (table(out, ["dataset", "model", "nfe", "swd", "swd / teacher best", "in_squares", "precision", "recall",
                        "trained", "train s"])
            + "\n\n" + table(digits, ["dataset", "model", "nfe", "kid_heldout", "kid_train", "fd_heldout", "class_acc",
                                      "trained", "train s"]))
