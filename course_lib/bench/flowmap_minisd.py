"""The mini-SD rows of `bench flowmap`: the MeanFlow flow-map LoRA of the guided mini SD (recipes.flowmap_minisd,
model "meanflow-distill") at 1, 2 and 4 steps beside the guided teacher's 25-step DDIM and the training digits, on
the mini SD's evaluation (minisd.evaluate_images: adherence, held-out KID and FD), as bench lcm's mini-SD rows.
Laptop and full modes load the shipped LoRA (data/flowmap/mini-sd-meanflow); smoke mode trains a few updates of the
recipe on the tiny random SD, so the whole path runs in seconds."""
from __future__ import annotations

import json
from dataclasses import replace

import torch

from .. import minisd, sd as sdlib
from ..config import pick
from ..plotting import table
from ..recipes import flowmap_minisd as recipe
from .core import Evaluation, side_by_side, timed
from .lcm import SD, add_sd_rows, add_sd_references

MODEL = "meanflow-distill"
STEPS = (1, 2, 4)


def minisd_budget(mode: str) -> dict:
    return dict(sd_n=pick(mode, smoke=16, laptop=300, full=1000), sd_train=pick(mode, smoke=2, laptop=0, full=0))


def _student(sd, b: dict, mode: str) -> tuple[sdlib.SDFlowMap, dict]:
    """(student, meta): smoke, a few recipe updates on the tiny SD; otherwise the shipped LoRA (its recorded cost)."""
    if mode == "smoke":
        cfg = replace(recipe.RECIPE, steps=b["sd_train"], batch=4, ckpt_every=0)
        student, _ = recipe.train_minisd(sd, cfg, n_images=20, progress=False)
        return student, {"sd_student": f"tiny random SD, {b['sd_train']} updates"}
    folder = recipe.shipped_dir()
    if not (folder / recipe.FLOWMAP_JSON).is_file():
        raise FileNotFoundError(f"no shipped flow-map LoRA in {folder}: recreate it with `{recipe.RECREATE}`")
    info = json.loads((folder / recipe.FLOWMAP_JSON).read_text())
    return recipe.load_shipped(sd), {"sd_student": info["command"], "sd_train_updates": info["recipe"]["steps"],
                                     "sd_train_seconds": info["train_seconds"]}


def minisd_rows(mode: str, seed: int, device=None) -> tuple[list[dict], dict]:
    """Schema-3 rows on the mini SD (dataset "mini-sd"): "teacher" (guided 25-step DDIM, nfe 50), "data" (training
    digits) and MODEL at STEPS (one UNet call per step, nfe = steps), over the evaluation seeds. On the CPU (the
    evaluation pipeline's device). Returns (rows, meta)."""
    b = minisd_budget(mode)
    ev = Evaluation(seed, torch.device("cpu"))
    sd = sdlib.from_pipeline(sdlib.tiny_sd_pipeline(seed=0)) if mode == "smoke" else minisd.load_mini_sd()
    student, meta = _student(sd, b, mode)
    w, n, seeds = minisd.DEFAULT_W, b["sd_n"], ev.seeds
    per = lambda t: t / len(seeds)              # wall seconds of one seed's samples AND scores
    add_sd_references(ev, sd, n, w, seeds, shipped=mode != "smoke")
    cost = {k: meta[f"sd_{k}"] for k in ("train_updates", "train_seconds") if f"sd_{k}" in meta}
    for k in STEPS:
        r, sec = timed(lambda: recipe.evaluate(sd, student, n, k, seeds))
        add_sd_rows(ev, MODEL, r, per(sec), nfe=k, steps=k, w=w, sampler="flow_map", n=n, **cost)
    rows = ev.rows()
    print(summary(rows))
    return rows, {**b, **meta, "sd_w": w, "sd_seconds": "per seed, sampling and scoring together"}


def summary(rows: list[dict]) -> str:
    lines = side_by_side([r for r in rows if r["dataset"] == SD], ("dataset", "model", "nfe"))
    return table(lines, ["dataset", "model", "nfe", "adherence", "colour_adherence", "kid_heldout", "fd_heldout",
                         "kid_train"])
