"""`bench add`: adversarial diffusion distillation (Sauer et al. 2023) of the shipped 2D and digits teachers, students
sampled at 1, 2 and 4 steps on the trailing grid and measured against the DATA (not the teacher), with ADD's three-way
ablation (adversarial only, distillation only, both) and a student trained from scratch."""
from __future__ import annotations

import time

import torch

from ..conditioning import labelled, labels
from ..config import default_device, pick
from ..data2d import get_mixture, sample_2d
from ..distill.add import ADDConfig, distill_add, feature_network, sample
from ..images import batch_sampler, load_digits
from ..metrics import mode_coverage
from ..plotting import table
from ..teachers import load_teacher
from ..train import TrainConfig
from . import register
from .core import (Evaluation, PR_N, digit_labels, digits_floor, digits_n, digits_teacher, lines_over_best, prior,
                   reference_2d, score_2d, score_digits, side_by_side, sweep_2d, timed, train_fields)

STUDENT_STEPS = (1, 2, 4)
TEACHER_NFES = (1, 2, 4, 8, 16, 32, 64)
# model name -> (ADDConfig changes, init): the main student and the ablation of ADD's Table 1
VARIANTS = {"add": ({}, "teacher"), "add-adv": ({"distill": False}, "teacher"),
            "add-distill": ({"adversarial": False}, "teacher"), "add-scratch": ({}, "scratch")}


def add_budget(mode: str) -> dict:
    """The 2D and digits budgets and the course's recipe at this scale (c(t) = alpha_t, hinge). On 2D the
    discriminator is conditioned on the student's time (ADDConfig.d_time_cond) and lambda is 0.25, not ADD's 2.5:
    in the course's diagnosis an unconditioned discriminator and lambda = 2.5 narrow the modes at low noise, and 4
    steps came out worse than 2 (docs/results/add_2d_diagnosis.json). Digits keep ADD's lambda = 2.5."""
    return dict(steps=pick(mode, smoke=10, laptop=500, full=3000), batch=pick(mode, smoke=64, laptop=256, full=512),
                lr=3e-4, r1_gamma=0.1, ema=pick(mode, smoke=0.9, laptop=0.99, full=0.999), lambda_2d=0.25,
                d_time_cond=True,
                digits_steps=pick(mode, smoke=2, laptop=30, full=1500),
                digits_batch=pick(mode, smoke=8, laptop=32, full=64), digits_lr_g=1e-4, digits_lr_d=2e-4,
                digits_r1_every=4)


def _cfg(b: dict, changes: dict, digits: bool = False):
    if digits:
        return ADDConfig(lr_g=b["digits_lr_g"], lr_d=b["digits_lr_d"], r1_gamma=b["r1_gamma"],
                         r1_every=b["digits_r1_every"], **changes)
    return ADDConfig(lr_g=b["lr"], lr_d=b["lr"], r1_gamma=b["r1_gamma"], ema_decay=b["ema"],
                     lambda_distill=b["lambda_2d"], d_time_cond=b["d_time_cond"], **changes)


def _train_2d(name: str, ds: str, b: dict, seed: int, device, progress: bool):
    """(student, seconds) of variant `name` on the shipped {ds}-vp teacher; discriminator on RandomFeatures2D."""
    changes, init = VARIANTS[name]
    teacher = load_teacher(f"{ds}-vp", device=device)
    t0 = time.perf_counter()
    student, _ = distill_add(teacher, lambda n, g: {"x": sample_2d(ds, n, g)[0].to(device)}, _cfg(b, changes),
                             run=TrainConfig(steps=b["steps"], batch_size=b["batch"], seed=seed, desc=f"{name} {ds}"),
                             features=feature_network("random2d").to(device),
                             example={"x": torch.randn(8, 2, device=device)}, init=init, progress=progress,
                             init_seed=seed)
    return student, time.perf_counter() - t0


def _coverage(ev: Evaluation, ds: str, model: str, x, seconds: float, **common) -> None:
    """The mode-coverage rows of samples x on a Gaussian mixture: "modes_covered" and "mass_tv"."""
    cov = mode_coverage(x[:PR_N].cpu(), get_mixture(ds))
    ev.add(ds, model, "modes_covered", cov["modes_covered"], seconds, **common)
    ev.add(ds, model, "mass_tv", cov["mass_tv"], seconds, **common)


def _bench(mode: str, seed: int, device) -> tuple[list[dict], dict]:
    device = torch.device(device) if device is not None else default_device()
    b = add_budget(mode)
    n = pick(mode, smoke=250, laptop=5000, full=25_000)
    ev = Evaluation(seed, device)
    progress = mode != "smoke"
    for ds in ("gmm", "checkerboard"):
        teacher = load_teacher(f"{ds}-vp", device=device)
        students = {name: _train_2d(name, ds, b, seed, device, progress) for name in VARIANTS}
        for s in ev.seeds:
            ref = reference_2d(ev, ds, n, s)
            if ds == "gmm":
                # the floor: reference_2d's independent exact batch (seed s + 2)
                _coverage(ev, ds, "data", sample_2d(ds, n, torch.Generator().manual_seed(s + 2))[0], 0.0, nfe=None,
                          steps=None, n=n)
            sweep_2d(ev, teacher, teacher.process, ds, "teacher", "dpmpp2m", ref,
                     pick(mode, smoke=(1, 2, 4), laptop=TEACHER_NFES, full=TEACHER_NFES), s + 3, device)
            x1 = prior(teacher.process, (n, 2), s + 3, device)
            for name, (student, secs) in [("teacher-trailing", (teacher, 0.0)), *students.items()]:
                fields = {} if name == "teacher-trailing" else train_fields(secs, b["steps"])
                for k in STUDENT_STEPS:
                    x, sec = timed(lambda: sample(student, x1, k, teacher.process,
                                                  torch.Generator().manual_seed(s + 4)), device)
                    common = dict(nfe=k, steps=k, sampler="trailing", n=n, **fields)
                    score_2d(ev, ds, name, x, ref, sec, compare=True, **common)
                    if ds == "gmm":
                        _coverage(ev, ds, name, x, sec, **common)
    digits_rows(ev, mode, b, seed, device)
    rows = ev.rows()
    print(add_summary(rows))
    return rows, {**b, "n": n, "eval_seeds": ev.seeds, "pr_n": PR_N, "student_steps": list(STUDENT_STEPS),
                  "variants": {k: {"changes": v[0], "init": v[1]} for k, v in VARIANTS.items()},
                  "student_times": "trailing grid: 1, (k-1)/k, ..., 1/k", "lambda_digits": 2.5,
                  "weighting": "alpha_t", "features_2d": "RandomFeatures2D (frozen)",
                  "features_digits": "the teacher's own layers (LADD)"}


def digits_rows(ev: Evaluation, mode: str, b: dict, seed: int, device) -> None:
    """Digits: ADD of the shipped digits teacher with a class-conditional discriminator on the frozen teacher's own
    layers on re-noised inputs (LADD; add.feature_network("dinov2") falls back to it offline), lazy R1; the student
    ("add") at 1, 2, 4 steps on thousands of samples per seed, the teacher with the same sampler ("teacher-trailing")
    and with DPM-Solver++ at 32 steps (a few hundred), beside the data floor; kid_heldout, kid_train, fd_heldout."""
    teacher = load_teacher("digits", device=device)
    x_train, y_train = load_digits(16, "train")
    data = labelled(batch_sampler(x_train, y_train), teacher.net.num_classes)
    t0 = time.perf_counter()
    student, _ = distill_add(teacher, data, _cfg(b, {}, digits=True),
                             run=TrainConfig(steps=b["digits_steps"], batch_size=b["digits_batch"], seed=seed,
                                             desc="add digits"),
                             features=feature_network("dinov2", teacher),
                             example={"x": x_train[:4].to(device),
                                      "cond": labels(y_train[:4].to(device), teacher.net.num_classes)},
                             progress=mode != "smoke", init_seed=seed)
    secs = time.perf_counter() - t0
    big, small = digits_n(mode, cheap=True), digits_n(mode, cheap=False)
    for s in ev.seeds:
        digits_floor(ev, s)
        digits_teacher(ev, teacher, s, small, 32, device)
        x1 = prior(teacher.process, (big, 1, 16, 16), s + 6, device)
        for name, model, fields in (("teacher-trailing", teacher, {}),
                                    ("add", student, train_fields(secs, b["digits_steps"]))):
            for k in STUDENT_STEPS:
                x, sec = timed(lambda: sample(model, x1, k, teacher.process, torch.Generator().manual_seed(s + 7),
                                              cond=digit_labels(big, device)), device)
                score_digits(ev, name, x, sec, nfe=k, steps=k, sampler="trailing", **fields)


def add_summary(rows: list[dict]) -> str:
    """Per 2D dataset: every student (and the teacher with the students' sampler) at 1, 2, 4 steps against the data,
    metrics side by side (mean ± std over seeds), with its SWD over the teacher's best (the teacher row of lowest
    mean SWD), per seed, and its training seconds; then digits."""
    out = lines_over_best(rows, ("gmm", "checkerboard"),
                          lambda r, best: r["model"] != "teacher" or r is best or (best and r["nfe"] == best["nfe"]))
    for d in out:
        d["train s"] = next(iter(d["rows"].values())).get("train_seconds")
    digits = side_by_side([r for r in rows if r["dataset"] == "digits"], ("dataset", "model", "nfe"))
    return (table(out, ["dataset", "model", "nfe", "swd", "swd / teacher best", "precision", "recall",
                        "modes_covered", "mass_tv", "in_squares", "train s"])
            + "\n\n" + table(digits, ["dataset", "model", "nfe", "kid_heldout", "kid_train", "fd_heldout"]))


@register("add", "adversarial diffusion distillation of the 2D and digits teachers, 1/2/4 steps, the three-way ablation")
def bench_add(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """ADD (Sauer et al. 2023) of the shipped 2D teachers: the student initialised from the teacher, a discriminator of
    trainable heads on a frozen random feature network (hinge, R1 on real data) conditioned on the student's time,
    the score-distillation term with c(t) = alpha_t and lambda = 0.25 (add_budget); students sampled on the trailing
    grid at 1, 2, 4 steps, measured against exact DATA samples (every score_2d metric; on gmm also "modes_covered"
    and "mass_tv" of metrics.mode_coverage): model "add", the ablation "add-adv" (adversarial only), "add-distill"
    (distillation only), "add-scratch" (both losses, random initialisation), and "teacher-trailing" (the teacher
    with the students' sampler: their starting point), beside the teacher's DPM-Solver++ sweep ("teacher", its best
    SWD the reference) and the data floor ("data").
    Digits: "add" with the teacher's own features (LADD) against the held-out digits. Every student row carries its
    training seconds and updates."""
    return _bench(mode, seed, device)
