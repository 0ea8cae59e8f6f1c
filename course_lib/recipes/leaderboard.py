"""The leaderboard's definition, shared by its command (`python -m course_lib.bench leaderboard`, bench.leaderboard)
and notebook 12: the datasets, step counts and quality metrics of the board, the course's families, the 2D students
that ship in data/, the README's short table, and each method's SD 1.5 bill from the cost table measured on a GPU."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import paths
from ..distill.gan import generate_one_step
from ..scale.cost import hypersd_estimates
from . import dmd as dmd_recipes
from . import flowmap as fm_recipes
from . import gdd as gdd_recipes

NFES = (1, 2, 4, 8)
DATASETS = ("gmm", "checkerboard", "digits", "mini-sd")
QUALITY = {"gmm": ("swd", "recall"), "checkerboard": ("swd", "in_squares"), "digits": ("kid_heldout", "class_acc"),
           "mini-sd": ("kid_heldout", "adherence", "colour_adherence")}
RATIO = {"swd", "kid_heldout"}            # lower is better, and a ratio to the teacher's best reads across datasets
RESULTS = paths.CHECKOUT / "docs" / "results"   # the saved laptop results of a checkout (a wheel has none)
SAVED = RESULTS / "leaderboard_laptop.json"       # the board the README and notebook 12 read

FLOWMAP_NAMES = {"meanflow": "MeanFlow", "meanflow-distill": "MeanFlow (distilled)", "shortcut": "shortcut model",
                 "scd": "sCD", "sct": "sCT"}   # bench flowmap's model names -> the board's


def shipped_students(device) -> dict[str, dict[str, tuple]]:
    """{dataset: {method: (family, sampler(x1, steps, seed) -> x, steps served, updates, seconds, process,
    teacher evaluations or None)}} of the 2D students that ship in data/: the flow-map students (bench flowmap's
    own seed-0 students) and the longer-trained DMD2 and GDD-I generators (`shipped_generators`)."""
    out: dict[str, dict[str, tuple]] = {}
    for ds, generators in shipped_generators(device).items():
        mine = out.setdefault(ds, {})
        for m in fm_recipes.METHODS:
            model, info = fm_recipes.load_shipped(ds, m, device)
            sample = lambda x1, k, s, model=model, m=m: fm_recipes.sample(model, m, x1, k, s)
            mine[FLOWMAP_NAMES[m]] = ("flow map", sample, fm_recipes.STEPS, info["updates"], info["train_seconds"],
                                      model.process, info.get("teacher_evals"))
        mine.update(generators)
    return out


def shipped_generators(device) -> dict[str, dict[str, tuple]]:
    """The longer-trained one-step DMD2 and GDD-I generators of data/, per 2D dataset, as in `shipped_students`."""
    out: dict[str, dict[str, tuple]] = {}
    for ds in fm_recipes.DATASETS:
        mine = out.setdefault(ds, {})
        G, info = dmd_recipes.load_shipped_2d(ds, device)
        mine["DMD2 (shipped)"] = ("distribution", lambda x1, k, s, G=G: _one_step(G, x1), (1,),
                                  info["generator_updates"], info["train_seconds"], G.process, None)
        G, info = gdd_recipes.load_shipped(ds, device)
        mine["GDD-I (shipped)"] = ("distribution", lambda x1, k, s, G=G: _one_step(G, x1), (1,),
                                   info["recipe"]["steps"], info["train_seconds"], G.process, None)
    return out


def _one_step(G, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return generate_one_step(G, z)


COST_TABLE = "cost_table_h200.json"    # the SD 1.5 cost table measured on a GPU (scale.cost --table)


def sd15_costs(path: Path | None = None) -> list[dict]:
    """GPU-hours of each method's SD 1.5 run, from the cost table measured on a GPU (docs/results): InstaFlow's and
    DMD2's published schedules and the course's LCM-LoRA plan priced with their measured steps, Hyper-SD's stages
    estimated from the measured UNet call times (scale.cost.hypersd_estimates: four TSCD stages and the reward stage,
    1000 iterations each). [] where the table is missing."""
    path = path or RESULTS / COST_TABLE
    if not path.is_file():
        return []
    table = json.loads(path.read_text())
    rows, device = table["rows"], table.get("device", "?")
    pick_row = lambda method, bs: next(r for r in rows if r["method"] == method and r["batch_size_per_gpu"] == bs
                                       and r["grad_checkpointing"] and r.get("online_steps", 0) == 0
                                       and r["status"] == "ok")
    lcm = pick_row("lcm-lora", 12)
    hyper = hypersd_estimates(rows)
    return [
        {"method": "InstaFlow", "gpu_hours": round(pick_row("reflow", 8)["instaflow_budget"]["gpu_hours"], 1),
         "what": "the paper's schedule (reflow and distillation stages), steps measured", "device": device},
        {"method": "DMD2", "gpu_hours": round(pick_row("dmd2", 4)["dmd2_budget"]["gpu_hours"], 1),
         "what": "the paper's SD 1.5 schedule, iterations measured", "device": device},
        {"method": "LCM", "gpu_hours": round(4000 * 96 * lcm["seconds_per_sample"] / 3600, 1),
         "what": "LCM-LoRA, the course's plan (4000 steps at a global batch of 96), steps measured", "device": device},
        {"method": "Hyper-SD", "gpu_hours": round(sum(r["gpu_hours_per_1000_iterations"] for r in hyper
                                                      if "adversarial" not in r["stage"]), 1),
         "what": "ESTIMATE: four TSCD stages and the reward stage, 1000 iterations each, from measured UNet call "
                 "times (the reward stage's VAE and reward model not counted)", "device": device},
    ]


FAMILIES = ("teacher", "trajectory", "consistency", "flow map", "distribution")


def by_family(rows: list[dict]) -> list[dict]:
    """`rows` ordered by the course's families (stable: the board's order within a family)."""
    return sorted(rows, key=lambda r: FAMILIES.index(r["family"]))


def short_table(rows: list[dict], nfes: tuple[int, ...] = (1, 4)) -> list[dict]:
    """One line per method: its quality over the teacher's best (SWD on gmm and the checkerboard, held-out KID on the
    digits and the mini SD) at each of `nfes`, "mean ± std" over the evaluation seeds; "" where the method has no
    such row."""
    lines: dict[str, dict] = {}
    for r in by_family([r for r in rows if "x_teacher" in r]):
        line = lines.setdefault(r["method"], {"method": r["method"], "family": r["family"]})
        if r["nfe"] in nfes:
            line[f"{r['dataset']} @{r['nfe']}"] = f"{r['x_teacher']:.2f} ± {r['x_teacher_std']:.2f}"
    cols = [f"{ds} @{k}" for ds in DATASETS for k in nfes]
    return [{c: line.get(c, "") for c in ("method", "family", *cols)} for line in lines.values()]
