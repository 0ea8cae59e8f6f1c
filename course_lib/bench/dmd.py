"""`bench dmd` and `bench dmd2`: distribution matching distillation (DMD, Yin et al. CVPR 2024; DMD2, Yin et al.
NeurIPS 2024) of the shipped 2D and digits teachers, students measured against the DATA (SWD, precision, recall on
2D; held-out KID and FD on digits), beside the teacher's DPM-Solver++ sweep (its best NFE) and the data floor.

bench dmd:  "dmd" (1:1 updates, regression on the teacher's DPM-Solver++ noise -> sample pairs, no GAN) and the
            ablation "dmd-noreg" (the same without the regression loss), one step.
bench dmd2: "dmd2" (TTUR, GAN head on the fake score) at one step, and at 2 and 4 steps (generators trained with
            backward simulation on the grid 1, (k-1)/k, ..., 1/k); the ablation "dmd2-nogan", one step. In 2D both
            learning rates decay on a cosine and the gradient's t is shared by the batch (`variants`).
Every model is trained once (seed `seed`) and evaluated over the evaluation seeds; rows carry train_seconds and
train_updates (generator updates)."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..classifier import balanced_labels
from ..conditioning import labels
from ..config import default_device, pick
from ..data2d import sample_2d
from ..distill.dmd import DMDConfig, distill_dmd, sample
from ..distill.reflow import cached_pairs
from ..images import batch_sampler, load_digits
from ..plotting import table
from ..teachers import load_teacher
from ..train import TrainConfig
from . import register
from .core import (Evaluation, digits_floor, digits_n, digits_teacher, lines_over_best, prior, reference_2d, score_2d,
                   score_digits, side_by_side, sweep_2d, timed, train_fields)

TEACHER_NFES = (1, 2, 4, 8, 16, 32, 64)
DIGITS_TEACHER_STEPS = 16


def dmd_budget(mode: str) -> dict:
    """Budgets shared by bench dmd and dmd2: iterations (critic updates; the generator takes iterations / ttur),
    batch, learning rates, the regression pairs, digits."""
    return dict(
        iters=pick(mode, smoke=10, laptop=1000, full=8000), batch=pick(mode, smoke=64, laptop=256, full=1024),
        lr=1e-3, ttur=5, pairs=pick(mode, smoke=256, laptop=8192, full=32768), pair_steps=32,
        lambda_reg=0.25,
        digits_iters=pick(mode, smoke=2, laptop=400, full=6000), digits_batch=pick(mode, smoke=8, laptop=32, full=64),
        digits_lr=1e-4, digits_pairs=pick(mode, smoke=32, laptop=2000, full=10000))


def variants(method: str, b: dict) -> dict[str, tuple]:
    """{row name: (DMDConfig, generator steps sampled, uses pairs)} of a benchmark."""
    base = DMDConfig(lr_g=b["lr"], lr_critic=b["lr"], normalize="batch")
    if method == "dmd":
        dmd1 = replace(base, ttur=1, gan=False, lambda_reg=b["lambda_reg"])
        return {"dmd": (dmd1, 1, True), "dmd-noreg": (replace(dmd1, lambda_reg=0.0), 1, False)}
    # the 2D recipe of DMD2 (measured by the course's diagnosis runs): both rates decay on a cosine, and one t of the
    # distribution-matching gradient per batch, so that the batch normaliser is that noise level's own (with a
    # constant rate the generator jitters around its fixed point; with t per sample the low-noise samples' steps
    # shrink under the high-noise samples' normaliser, and some seeds drop modes)
    dmd2 = replace(base, ttur=b["ttur"], gan=True, lr_schedule="cosine", t_shared=True)
    return {"dmd2": (dmd2, 1, False), "dmd2@2": (replace(dmd2, gen_steps=2), 2, False),
            "dmd2@4": (replace(dmd2, gen_steps=4), 4, False), "dmd2-nogan": (replace(dmd2, gan=False), 1, False)}


def _pairs_2d(teacher, ds: str, b: dict, device):
    return cached_pairs(teacher, f"{ds}-vp-dmd", b["pairs"], steps=b["pair_steps"], sampler="dpmpp2m",
                        progress=False, verbose=False)


def _train_2d(teacher, ds: str, cfg, pairs, b: dict, seed: int, device, progress: bool):
    def data(n, g):
        batch = {"x": sample_2d(ds, n, g)[0].to(device)}
        if pairs is not None:
            i = torch.randint(len(pairs[0]), (n,), generator=g)
            batch.update(z_ref=pairs[0][i].to(device), x_ref=pairs[1][i].to(device))
        return batch

    t0 = time.perf_counter()
    G, done = distill_dmd(teacher, data, cfg, run=TrainConfig(steps=b["iters"], batch_size=b["batch"], seed=seed,
                                                              desc=f"DMD {ds}"),
                          example={"x": sample_2d(ds, 8, torch.Generator().manual_seed(0))[0].to(device)},
                          progress=progress)
    return G, time.perf_counter() - t0, done.updates["generator"]


def _bench(method: str, mode: str, seed: int, device) -> tuple[list[dict], dict]:
    device = torch.device(device) if device is not None else default_device()
    b = dmd_budget(mode)
    n = pick(mode, smoke=250, laptop=5000, full=25_000)
    ev = Evaluation(seed, device)
    for ds in ("checkerboard", "gmm"):
        teacher = load_teacher(f"{ds}-vp", device=device)
        students = {}
        for name, (cfg, k, uses_pairs) in variants(method, b).items():
            pairs = _pairs_2d(teacher, ds, b, device) if uses_pairs else None
            students[name] = (*_train_2d(teacher, ds, cfg, pairs, b, seed, device, mode != "smoke"), k)
        for s in ev.seeds:
            ref = reference_2d(ev, ds, n, s)
            sweep_2d(ev, teacher, teacher.process, ds, "teacher", "dpmpp2m", ref,
                     pick(mode, smoke=(1, 2, 4), laptop=TEACHER_NFES, full=TEACHER_NFES), s + 3, device)
            x1 = prior(teacher.process, (n, 2), s + 3, device)
            for name, (G, secs, updates, k) in students.items():
                x, sec = timed(lambda: sample(G, x1, k, teacher.process, torch.Generator(device).manual_seed(s + 4)),
                               device)
                score_2d(ev, ds, name.split("@")[0], x, ref, sec, nfe=k, steps=k, compare=True,
                         sampler="dmd-generator", n=n, **train_fields(secs, updates))
    digits_rows(method, ev, mode, b, seed, device)
    rows = ev.rows()
    print(dmd_summary(rows, method))
    return rows, {**b, "n": n, "eval_seeds": ev.seeds, "variants": {k: repr(v[0]) for k, v in
                                                                     variants(method, b).items()},
                  "generator_grid": "k steps: 1, (k-1)/k, ..., 1/k (denoise, re-noise with fresh noise)",
                  "teacher_sampler": "dpmpp2m"}


def digits_rows(method: str, ev: Evaluation, mode: str, b: dict, seed: int, device) -> None:
    """Digits: the main student of the method ("dmd": with regression pairs of the teacher's DPM-Solver++ at 16
    steps, balanced labels; "dmd2": TTUR and GAN head, class-conditional), one step, beside the teacher at 16
    DPM-Solver++ steps and the data floor: kid_heldout, kid_train, fd_heldout."""
    teacher = load_teacher("digits", device=device)
    x_train, y_train = load_digits(16, "train")
    draw = batch_sampler(x_train, y_train)
    cfg, _, uses_pairs = variants(method, b)[method]
    cfg = replace(cfg, lr_g=b["digits_lr"], lr_critic=b["digits_lr"], normalize="sample", lr_schedule="constant",
                  t_shared=False)                  # digits: the image recipe (constant rates, per-sample normaliser)
    pairs = None
    if uses_pairs:
        y_ref = labels(balanced_labels(b["digits_pairs"]).to(device), teacher.net.num_classes)
        z_ref, x_ref = cached_pairs(teacher, "digits-dmd", b["digits_pairs"], steps=DIGITS_TEACHER_STEPS,
                                    sampler="dpmpp2m", cond=y_ref, noise_shape=(1, 16, 16), progress=False,
                                    verbose=False)
        pairs = (z_ref, x_ref, y_ref)

    def data(k, g):
        xb, yb = draw(k, g)
        batch = {"x": xb.to(device), "cond": labels(yb.to(device), teacher.net.num_classes)}
        if pairs is not None:
            i = torch.randint(len(pairs[0]), (k,), generator=g)
            batch.update(z_ref=pairs[0][i], x_ref=pairs[1][i], cond_ref=pairs[2][i])
        return batch

    t0 = time.perf_counter()
    G, done = distill_dmd(teacher, data, cfg, run=TrainConfig(steps=b["digits_iters"], batch_size=b["digits_batch"],
                                                              seed=seed, desc=f"{method.upper()} digits"),
                          example={"x": x_train[:4].to(device),
                                   "cond": labels(y_train[:4].to(device), teacher.net.num_classes)},
                          progress=mode != "smoke")
    secs = time.perf_counter() - t0
    big, small = digits_n(mode, cheap=True), digits_n(mode, cheap=False)
    for s in ev.seeds:
        digits_floor(ev, s)
        digits_teacher(ev, teacher, s, small, DIGITS_TEACHER_STEPS, device)
        x1 = prior(teacher.process, (big, 1, 16, 16), s + 6, device)
        x, sec = timed(lambda: sample(G, x1, 1, teacher.process, torch.Generator(device).manual_seed(s + 7),
                                      labels(balanced_labels(big).to(device), teacher.net.num_classes)), device)
        score_digits(ev, method, x, sec, nfe=1, steps=1, sampler="dmd-generator",
                     **train_fields(secs, done.updates["generator"]))


def dmd_summary(rows: list[dict], method: str) -> str:
    """Per 2D dataset: every student row (model, nfe) and the data floor, metrics side by side (mean ± std over
    seeds), each student's SWD over the teacher's best (lowest mean SWD) per seed, and the teacher's best row itself;
    then digits."""
    out = lines_over_best(rows, ("checkerboard", "gmm"),
                          lambda r, best: r["model"] != "teacher" or (best is not None and r["nfe"] == best["nfe"]),
                          skip=("data", "teacher"))
    digits = side_by_side([r for r in rows if r["dataset"] == "digits"], ("dataset", "model", "nfe"))
    for d in out + digits:
        d["train s"] = next(iter(d["rows"].values())).get("train_seconds", "")
    return (table(out, ["dataset", "model", "nfe", "swd", "swd / teacher best", "in_squares", "precision", "recall",
                        "train s"])
            + "\n\n" + table(digits, ["dataset", "model", "nfe", "kid_heldout", "kid_train", "fd_heldout", "train s"]))


@register("dmd", "DMD (regression pairs, 1:1 updates) of the 2D and digits teachers, one step; ablation without pairs")
def bench_dmd(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """DMD (Yin et al. CVPR 2024): one-step generators initialised from the shipped 2D teachers, the distribution-
    matching gradient (batch-normalised in 2D), the fake score updated once per generator update, and the regression
    loss (lambda_reg, squared L2) on the teacher's DPM-Solver++ noise -> sample pairs (the reflow pair cache), model
    "dmd"; "dmd-noreg" drops the regression. Measured against the data (swd, precision, recall; in_squares on the
    checkerboard) beside the teacher's DPM-Solver++ sweep and the data floor. Digits: "dmd" with pairs of balanced
    labels, per-sample normaliser; kid_heldout, kid_train, fd_heldout beside the teacher at 16 steps."""
    return _bench("dmd", mode, seed, device)


@register("dmd2", "DMD2 (TTUR + GAN head) of the 2D and digits teachers, 1/2/4 steps; ablation without the GAN")
def bench_dmd2(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """DMD2 (Yin et al. NeurIPS 2024): no regression, the two time-scale update rule (ttur critic updates per
    generator update), the GAN head on the fake score's bottleneck (non-saturating, lambda_g / lambda_d of DMD2's
    ImageNet recipe). Model "dmd2" at one step and at 2 and 4 steps (separate generators trained with backward
    simulation), "dmd2-nogan" at one step. 2D and digits measured as in bench dmd."""
    return _bench("dmd2", mode, seed, device)


# --- the shipped longer-trained 2D students (notebook 09 loads them beside its short runs) --------------------------

RECREATE_2D = "python -m course_lib.bench.dmd_ship {dataset} --iters {iters} --gan {gan}"


def ship_2d(dataset: str, iters: int, out_dir, gan: bool = False, seed: int = 0, batch: int = 256,
            device: str | torch.device = "cpu") -> dict:
    """Train bench dmd2's 2D recipe ("dmd2", or its ablation "dmd2-nogan" when gan is False) of the shipped
    {dataset}-vp teacher for `iters` iterations (the benchmark's laptop budget is 1000) and write the one-step
    generator's weights (safetensors) and what made them (JSON) to out_dir/<dataset>.*. Returns the JSON's dict."""
    from safetensors.torch import save_file

    b = {**dmd_budget("laptop"), "iters": iters, "batch": batch}
    cfg = variants("dmd2", b)["dmd2" if gan else "dmd2-nogan"][0]
    teacher = load_teacher(f"{dataset}-vp", device=device)
    G, secs, updates = _train_2d(teacher, dataset, cfg, None, b, seed, device, progress=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    save_file(weights, str(out / f"{dataset}.safetensors"))
    info = {"dataset": dataset, "teacher": f"{dataset}-vp", "model": "dmd2" if gan else "dmd2-nogan",
            "iterations": iters, "batch": batch, "seed": seed, "generator_updates": updates,
            "train_seconds": round(secs), "device": str(device), "recipe": repr(cfg),
            "command": RECREATE_2D.format(dataset=dataset, iters=iters, gan=int(gan))}
    (out / f"{dataset}.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


