"""The course's 2D runs of the flow-map methods (distill.flowmap; notebook 14, bench flowmap): budgets by COURSE_MODE,
one recipe per model, how each student is built, trained and sampled, and the shipped students of data/flowmap.

    python -m course_lib.recipes.flowmap train --dataset gmm --method meanflow --out data/flowmap
    python -m course_lib.recipes.flowmap train --dataset all --method all --out data/flowmap

The models (bench flowmap's names):
    meanflow          MeanFlow from scratch on rf (the conditional velocity eps - x0)
    meanflow-distill  MeanFlow distilling the shipped {dataset}-vp teacher, read in rf time (reflow.RFView: the same
                      x0 and eps at the same log-SNR, so its velocity eps_hat - x0_hat is the rf velocity)
    shortcut          a shortcut model from scratch on rf
    scd               sCM distillation (TrigFlow = the course's vp-cosine) of the {dataset}-vp teacher, from the
                      teacher re-embedded in 10 t (`reembed`)
    sct               sCM training from scratch
Every fresh student is the teachers' MLP (teachers.MLP_2D) with time_scale 0.01 (the time input 10 t: sCM and
MeanFlow differentiate the network in t, and at 1000 t the JVP is too large to learn from; distill/flowmap.py).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import paths
from ..config import pick, seeded
from ..data2d import batches, sample_2d
from ..distill import flowmap as fm
from ..distill.reflow import RFView
from ..grids import uniform
from ..metrics import eval_seeds, in_squares, precision_recall, spread, swd
from ..models import Denoiser, MLP2D, load_denoiser, save_denoiser
from ..processes import RectifiedFlow, VPCosine
from ..samplers import consistency, flow_map
from ..teachers import MLP_2D, load_teacher
from ..train import Network, TrainConfig, train_networks

METHODS = ("meanflow", "meanflow-distill", "shortcut", "scd", "sct")
DATASETS = ("gmm", "checkerboard")
STEPS = (1, 2, 4)                  # every student is sampled at 1, 2 and 4 steps from one network
TIME_SCALE = 0.01                  # fresh students' time input 10 t (models.MLP2D time_scale)


@dataclass
class Recipe:
    """One model's 2D recipe: its method's config (distill.flowmap) and batch; updates come from the budget."""
    method: str
    cfg: fm.FlowMapConfig
    batch: int = 256
    steps_x: float = 1.0           # multiple of the budget's updates this method gets
    teacher_evals: int = 0         # teacher evaluations per sample and update (0: no teacher)
    notes: str = ""


# MeanFlow's (t, r) on 2D: the larger time from lognorm(0, 1.6), not the paper's lognorm(-0.4, 1.0). Every one-step
# sample starts at t = 1, and the paper's proposal (the larger of two draws) puts t above 0.9 for about 1% of the
# samples, lognorm(0, 1.6) for about 16%. On gmm at 1000 updates (seed 0) one step then scores 2.35x / 1.30x the
# teacher's best SWD from scratch / distilled, against 4.25x / 3.39x, recall 0.95 / 0.96 against 0.47 / 0.58
# (docs/results/flowmap_2d_budget.json)
MF_TIME_2D = (0.0, 1.6)
EMA = 0.99   # the sampling EMA: the engine's EMA starts at the initial weights, and 0.999 (the library's default)
             # still holds 0.999^1000 = 37% of them after the laptop's 1000 updates (shortcut models on gmm, 1000
             # updates at 0.999: 1-, 2- and 4-step SWD all 0.51, near the untrained start)


def recipes() -> dict[str, Recipe]:
    """The laptop recipes (the same in every mode; the budget sets the updates and the sCM warm-up)."""
    meanflow = dict(lr=1e-3, p=0.0, ema_decay=EMA, time_mean=MF_TIME_2D[0], time_std=MF_TIME_2D[1])
    return {
        # p = 0, the plain squared error: on gmm at 1000 / 2000 updates (seed 0) 1-step SWD 0.21 / 0.13 against
        # 0.32 / 0.23 with the paper's adaptive weight p = 1 (4 steps: 0.23 / 0.094 against 0.29 / 0.22), both with
        # the sampling EMA at 0.999
        "meanflow": Recipe("meanflow", fm.MeanFlowConfig(**meanflow)),
        "meanflow-distill": Recipe("meanflow-distill", fm.MeanFlowConfig(**meanflow), teacher_evals=1),
        # the self-consistency targets' network is an EMA of the student too: the same decay, for the same reason
        "shortcut": Recipe("shortcut", fm.ShortcutConfig(lr=1e-3, ema_decay=EMA, target_decay=EMA)),
        "scd": Recipe("scd", fm.SCMConfig(lr=1e-4, time_mean=fm.SCD_TIME[0], time_std=fm.SCD_TIME[1],
                                          ema_decay=EMA),
                      teacher_evals=1),
        "sct": Recipe("sct", fm.SCMConfig(lr=1e-3, ema_decay=EMA)),
    }


def budget(mode: str) -> dict:
    """The budgets bench flowmap and notebook 14 share: updates per student, evaluation sizes, the (t, s) grid."""
    return dict(
        steps=pick(mode, smoke=40, laptop=1000, full=8000),
        reembed=pick(mode, smoke=20, laptop=1500, full=3000),       # sCD's re-embedding updates (`reembed`)
        ema=pick(mode, smoke=0.0, laptop=None, full=None),          # None: the recipe's sampling EMA
        n=pick(mode, smoke=250, laptop=5000, full=25_000),          # samples per evaluation seed
        grid_k=pick(mode, smoke=3, laptop=6, full=9),               # times of the (t, s) error grid, 1 ... 0
        grid_n=pick(mode, smoke=100, laptop=1000, full=4000),       # points per grid cell
        grid_exact_steps=pick(mode, smoke=16, laptop=128, full=128),
    )


def fresh(process, parameterization: str, flow: bool, seed: int) -> Denoiser:
    """A fresh student of the teachers' architecture (time_scale TIME_SCALE), initialised from `seed`."""
    with seeded(seed):
        return Denoiser(MLP2D(**MLP_2D, flow_map=flow, time_scale=TIME_SCALE), process, parameterization)


def teacher_of(method: str, dataset: str, device="cpu") -> nn.Module | None:
    """The model a method distils: the shipped {dataset}-vp teacher (read in rf time for MeanFlow), else None."""
    if method == "meanflow-distill":
        return RFView(load_teacher(f"{dataset}-vp", device=device))
    if method == "scd":
        return load_teacher(f"{dataset}-vp", device=device)
    return None


def start(method: str, dataset: str, seed: int, device="cpu") -> nn.Module:
    """The student before training: a fresh flow-map MLP on rf (MeanFlow, shortcut), a fresh vp-cosine MLP (sCT, and
    sCD's before `reembed`)."""
    if method in ("meanflow", "meanflow-distill", "shortcut"):
        return fresh(RectifiedFlow(), "velocity", True, seed).to(device)
    if method in ("sct", "scd"):
        return fresh(VPCosine(), "v", False, seed).to(device)
    raise ValueError(f"unknown flow-map model {method!r}; valid: {', '.join(METHODS)}")


def reembed(student: Denoiser, teacher: nn.Module, data, steps: int, seed: int, progress: bool = False) -> Denoiser:
    """sCD's initialisation. The paper starts the student as the teacher; the shipped teachers embed 1000 t, where
    sCM's tangent dF/dt is too large to learn from (Lu & Song 2024, Sec. 4.1), and sCD from a copy of them ends far
    from the teacher (docs/results/scd_2d_diagnosis.json). So `student`, a fresh network that embeds 10 t, is first
    regressed onto the teacher's TrigFlow velocity F (x_t of the data, t uniform in [1e-3, 1]): the teacher,
    re-embedded; sCD then starts from it. `steps` updates of batch 256 (one teacher evaluation per sample)."""
    def step(ctx, batch):
        x0, g, T = batch["x"], ctx.generator, ctx.nets["teacher"]
        t = torch.rand(len(x0), generator=g, device=g.device).clamp_min(1e-3).to(x0)
        x_t = T.process.marginal(x0, t, torch.randn(x0.shape, generator=g, device=g.device).to(x0))
        with torch.no_grad():
            target = fm.trigflow_velocity(T, x_t, t)
        return (fm.trigflow_velocity(ctx.nets["student"], x_t, t) - target).pow(2).flatten(1).mean(1)

    done = train_networks({"student": Network(student.requires_grad_(True).train(), lr=1e-3, grad_clip=None)}, step,
                          data, TrainConfig(steps=steps, batch_size=256, seed=seed + 7, desc="sCD: re-embed"),
                          frozen={"teacher": teacher}, progress=progress)
    return done.best("student")


@dataclass
class Result:
    student: nn.Module
    seconds: float
    updates: int
    teacher_evals: int                          # teacher evaluations in all (per sample, summed over the batches)
    recipe: Recipe = field(repr=False)
    cfg: fm.FlowMapConfig = field(repr=False)   # the method's config as run (the budget's EMA, sCM's warm-up)
    reembed: int = 0                            # of the updates, sCD's re-embedding (`reembed`)


def train(method: str, dataset: str, b: dict, seed: int = 0, device="cpu", progress: bool = False, ckpt_dir=None,
          recipe: Recipe | None = None) -> Result:
    """Train `method`'s student on `dataset` with its recipe at budget b (b["steps"] updates x recipe.steps_x);
    sCM's tangent warm-up over the first fifth of the run."""
    r = recipe or recipes()[method]
    updates = max(1, round(b["steps"] * r.steps_x))
    cfg = r.cfg if b.get("ema") is None else replace(r.cfg, ema_decay=b["ema"])
    if isinstance(cfg, fm.SCMConfig):
        cfg = replace(cfg, tangent_warmup=updates // 5)
    run = TrainConfig(steps=updates, batch_size=r.batch, seed=seed, desc=f"{method} {dataset}")
    model, teacher, data = start(method, dataset, seed, device), teacher_of(method, dataset, device), batches(dataset)
    t0 = time.perf_counter()
    pre = b["reembed"] if method == "scd" else 0
    if pre:
        model = reembed(model, teacher, data, pre, seed, progress)
    if method.startswith("meanflow"):
        student, _ = fm.train_meanflow(model, data, cfg, run=run, teacher=teacher, ckpt_dir=ckpt_dir, progress=progress)
    elif method == "shortcut":
        student, _ = fm.train_shortcut(model, data, cfg, run=run, ckpt_dir=ckpt_dir, progress=progress)
    else:
        student, _ = fm.train_scm(model, data, cfg, run=run, teacher=teacher, ckpt_dir=ckpt_dir, progress=progress)
    return Result(student, time.perf_counter() - t0, pre + updates, (pre + updates) * r.batch * r.teacher_evals, r,
                  cfg, pre)


def sample(student: nn.Module, method: str, x1: Tensor, steps: int, seed: int) -> Tensor:
    """`steps` steps from noise x1 on the uniform grid: the flow map's jumps (samplers.flow_map) for MeanFlow and
    shortcut models, multistep consistency sampling (fresh noise from `seed`) for sCM."""
    ts = uniform(steps)
    if method in ("scd", "sct"):
        return consistency(student, x1, ts, student.process, generator=torch.Generator().manual_seed(seed))
    return flow_map(student, x1, ts, student.process)


# ----------------------------------------------------------------------------------------------------------------
# The shipped students: data/flowmap/<dataset>-<method>/ (model.safetensors in fp16 + config.json, save_denoiser)
# ----------------------------------------------------------------------------------------------------------------

RECREATE = "python -m course_lib.recipes.flowmap train --dataset {dataset} --method {method} --steps {steps}"


def shipped_dir() -> Path:
    return paths.data_dir() / "flowmap"


def ship(student: Denoiser, folder, info: dict) -> dict:
    """Save a trained student as shipped: its weights rounded to fp16 (the shipped models' form, models.save_denoiser),
    measured after the rounding (`evaluate`, the benchmark's seeds), the measurement in config.json under
    "flowmap" with `info` (what made it). Returns the saved info."""
    student.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in student.state_dict().items()})
    info = {**info, "weights": "fp16", "quality": evaluate(student, info["method"], info["dataset"])}
    save_denoiser(folder, student, {"flowmap": info}, half=True)
    return info


def load_shipped(dataset: str, method: str, device="cpu") -> tuple[nn.Module, dict]:
    """The shipped 2D student of `method` on `dataset` (eval, no grad) and what made it (recipe, command, quality)."""
    folder = paths.shipped(shipped_dir() / f"{dataset}-{method}",
                           RECREATE.format(dataset=dataset, method=method, steps="<n>"))
    model, config = load_denoiser(folder, device=device)
    return model.requires_grad_(False), config["flowmap"]


def evaluate(student: nn.Module, method: str, dataset: str, n: int = 5000, seed: int = 0,
             steps: tuple[int, ...] = STEPS) -> dict:
    """SWD (and recall on gmm, in_squares on the checkerboard) at 1, 2, 4 steps, mean and std over the evaluation
    seeds of `seed`, drawn exactly as bench flowmap draws them (its reference, noise and sampling seeds): a student
    trained here with the benchmark's recipe and seed scores what the benchmark's rows say."""
    out = {}
    for k in steps:
        vals: dict[str, list] = {"swd": [], "recall" if dataset == "gmm" else "in_squares": []}
        for s in eval_seeds(seed):
            ref = sample_2d(dataset, n, torch.Generator().manual_seed(s + 1))[0]
            x1 = student.process.prior((n, 2), torch.Generator().manual_seed(s + 3))
            x = sample(student, method, x1, k, s + 4).cpu()
            vals["swd"].append(swd(x, ref))
            if dataset == "gmm":
                vals["recall"].append(precision_recall(x[:2000], ref[:2000])[1])
            else:
                vals["in_squares"].append(in_squares(x))
        out[f"{k} steps"] = {m: [round(float(v), 4) for v in spread(v_)] for m, v_ in vals.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.recipes.flowmap",
                                     description="Train the shipped 2D flow-map students (bench flowmap's recipes).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--dataset", default="all", choices=(*DATASETS, "all"))
    p.add_argument("--method", default="all", choices=(*METHODS, "all"))
    p.add_argument("--steps", type=int, default=budget("laptop")["steps"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(shipped_dir()))
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for ds in DATASETS if args.dataset == "all" else (args.dataset,):
        for method in METHODS if args.method == "all" else (args.method,):
            res = train(method, ds, {**budget("laptop"), "steps": args.steps}, args.seed, progress=True)
            info = {"dataset": ds, "method": method, "updates": res.updates, "batch": res.recipe.batch,
                    "seed": args.seed, "teacher_evals": res.teacher_evals, "train_seconds": round(res.seconds),
                    "threads": torch.get_num_threads(), "recipe": {"method": method, **asdict(res.cfg),
                                                                   **({"reembed": res.reembed} if res.reembed else {})},
                    "command": RECREATE.format(dataset=ds, method=method, steps=args.steps)}
            folder = Path(args.out) / f"{ds}-{method}"
            info = ship(res.student, folder, info)
            print(json.dumps({k: info[k] for k in ("dataset", "method", "updates", "train_seconds", "quality")}),
                  "->", folder, flush=True)


if __name__ == "__main__":
    main()
