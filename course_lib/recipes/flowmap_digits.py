"""The course's runs of the flow-map methods (distill.flowmap) on digits: budgets by COURSE_MODE, the students'
initialisations, training and sampling, shared by `bench flowmap`'s digits rows (bench.flowmap_digits) and
notebook 14.

    meanflow          MeanFlow from scratch: a fresh flow-map UNet on rf, the conditional velocity eps - x0
    meanflow-distill  MeanFlow distilling the shipped vp digits teacher: the student is flow_map_student(teacher)
                      read in rf time (flowmap.RFFlowMap: MeanFlow is written on rf), v = the teacher's velocity in
                      rf time (reflow.RFView of the teacher); it starts as the teacher's DDIM step for every (t, s)
    shortcut          shortcut model from scratch: a fresh flow-map UNet on rf (the paper's process), targets from
                      its EMA
    scd               sCD: a copy of the teacher (vp-cosine = TrigFlow, its v-prediction is TrigFlow's F) trained
                      with the teacher's velocity; a consistency model (its x0_hat), sampled with multistep
                      consistency sampling
    sct               sCT: a fresh UNet of the teacher's architecture, time_scale 0.01 (sCM's Sec. 4.1: the time
                      embedding of 10 t, not 1000 t)

Every student is class-conditional (the teacher's labels). The budget is bench cd's digits budget (cm_budget:
updates, batch, learning rate), so the flow-map students sit beside CD's at the same cost in updates; teacher
evaluations per sample and update: MeanFlow-distill and sCD 1 (CD's Heun step 2), the rest 0.

Measured (laptop budget, 3 evaluation seeds, docs/results/flowmap_digits_diagnosis.json): no one-step student
reaches the 16-step teacher's held-out KID spread. From scratch sCT and MeanFlow come closest at one step, and
MeanFlow at two steps is within it; four times the updates made both worse on held-out KID while their training
KID and class accuracy improved (fitting the 1500 training digits). The teacher-initialised students (sCD,
MeanFlow-distill) barely move from the teacher's one-step DDIM in this budget, and diverge at CD's learning rate
(sCD in the teacher's 1000 t time embedding: sCM's Sec. 4.1).
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from ..conditioning import Cond, labelled, labels, with_end_time
from ..config import pick, seeded
from ..distill import flowmap as fm
from ..distill.reflow import RFView
from ..grids import uniform
from ..images import batch_sampler, load_digits
from ..minisd import load_mini_sd
from ..models import MLP2D, Denoiser, build_denoiser, flow_map_student
from ..processes import RectifiedFlow
from ..samplers import consistency, flow_map
from ..sd import from_pipeline, tiny_sd_pipeline
from ..teachers import load_teacher
from ..train import TrainConfig
from .consistency import cm_budget

MODELS = ("meanflow", "meanflow-distill", "shortcut", "scd", "sct")
DISTILLED = ("meanflow-distill", "scd")          # trained with the teacher's velocity (1 evaluation per sample)
SAMPLER = {"meanflow": "flow_map", "meanflow-distill": "flow_map", "shortcut": "flow_map", "scd": "consistency",
           "sct": "consistency"}


def digits_budget(mode: str) -> dict:
    """The flow-map students' digits budget: bench cd's (cm_budget's digits_steps, digits_batch, digits_lr); the
    students copied from the teacher at the papers' 1e-4 (distill_lr: at CD's 1e-3 sCD diverged, 1-step held-out
    KID 1.05, and MeanFlow-distill fell below its start, 0.41; at 1e-4 0.25 and 0.31, laptop budget, 3 seeds);
    EMA 0 as CD's (a short run's EMA lags behind), sCM's tangent warm-up over the first tenth of the updates (the
    paper: 10k of 100k+), shortcut targets from an EMA of 0.95."""
    b = cm_budget(mode)
    return dict(steps=b["digits_steps"], batch=b["digits_batch"], lr=b["digits_lr"], distill_lr=1e-4,
                ema=b["digits_ema"],
                sc_target_decay=pick(mode, smoke=0.0, laptop=0.95, full=0.999), scm_warmup_frac=0.1,
                mf_ratio=fm.MF_RATIO, fd_h=None)


def _fresh(teacher: Denoiser, process: dict, parameterization: str, flow_map: bool, time_scale: float = 1.0
           ) -> Denoiser:
    """A fresh (random) model of the teacher's UNet architecture on `process`."""
    config = copy.deepcopy(teacher.config())
    config["net"].update({"flow_map": True} if flow_map else {})
    if time_scale != 1.0:
        config["net"]["time_scale"] = time_scale
    config.update(process=process, parameterization=parameterization)
    return build_denoiser(config).to(next(teacher.parameters()).device)


def initial_student(name: str, teacher: Denoiser, seed: int) -> nn.Module:
    """The student `name` (MODELS) before training: a copy of the teacher or a fresh network (seeded)."""
    with seeded(seed):
        if name == "meanflow-distill":
            return fm.RFFlowMap(flow_map_student(teacher))
        if name in ("meanflow", "shortcut"):
            return _fresh(teacher, {"name": "rf"}, "velocity", flow_map=True)
        if name == "scd":
            return copy.deepcopy(teacher).requires_grad_(True).train()
        if name == "sct":
            return _fresh(teacher, teacher.config()["process"], "v", flow_map=False, time_scale=0.01)
    raise ValueError(f"unknown flow-map digits student {name!r}; valid: {', '.join(MODELS)}")


def digits_data(num_classes: int = 10):
    """The labelled training digits as a course data source (as bench cd)."""
    x_train, y_train = load_digits(16, "train")
    return labelled(batch_sampler(x_train, y_train), num_classes)


def train_student(name: str, teacher: Denoiser, b: dict, seed: int, progress: bool = False
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Train the student `name` on budget `b` (digits_budget). Returns (the student to sample, eval mode, no grad;
    its cost: train_seconds, train_updates, teacher_evals = updates x batch x evaluations per sample)."""
    run = TrainConfig(steps=b["steps"], batch_size=b["batch"], seed=seed, desc=f"{name} digits")
    common = dict(lr=b["distill_lr"] if name in DISTILLED else b["lr"], ema_decay=b["ema"], fd_h=b["fd_h"])
    model = initial_student(name, teacher, seed)
    data = digits_data(teacher.net.num_classes)
    t0 = time.perf_counter()
    if name.startswith("meanflow"):
        cfg = fm.MeanFlowConfig(ratio=b["mf_ratio"], **common)
        student, _ = fm.train_meanflow(model, data, cfg, run=run, progress=progress,
                                       teacher=RFView(teacher) if name == "meanflow-distill" else None)
    elif name == "shortcut":
        cfg = fm.ShortcutConfig(target_decay=b["sc_target_decay"], **common)
        student, _ = fm.train_shortcut(model, data, cfg, run=run, progress=progress)
    else:
        mean, std = fm.SCD_TIME if name == "scd" else fm.SCT_TIME
        cfg = fm.SCMConfig(time_mean=mean, time_std=std, tangent_warmup=int(b["scm_warmup_frac"] * b["steps"]),
                           **common)
        student, _ = fm.train_scm(model, data, cfg, run=run, progress=progress,
                                  teacher=teacher if name == "scd" else None)
    seconds = time.perf_counter() - t0
    evals = b["steps"] * b["batch"] * (1 if name in DISTILLED else 0)
    return student, {"train_seconds": round(seconds, 1), "train_updates": int(b["steps"]), "teacher_evals": evals}


def sample(name: str, student: nn.Module, x1: torch.Tensor, steps: int, cond: Cond | None, seed: int
           ) -> torch.Tensor:
    """`steps`-step samples of a trained student from x1 on the uniform grid 1 -> 0: the flow map's jumps
    (samplers.flow_map) or multistep consistency sampling (sCM; fresh noise from `seed`, CPU)."""
    ts = uniform(steps)
    if SAMPLER[name] == "flow_map":
        return flow_map(student, x1, ts, student.process, cond=cond)
    return consistency(student, x1, ts, student.process, cond=cond, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# The finite-difference tangent against the exact JVP: python -m course_lib.recipes.flowmap_digits fd-table
# ----------------------------------------------------------------------------------------------------------------

FD_HS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


def _tangent_cases(n: int = 8) -> dict[str, tuple]:
    """name -> (make(dtype) -> (f, primals, tangents)): the targets' directional derivatives on the course's small
    models. MeanFlow's du/dt (tangent (v, 0, 1)) on a flow-map MLP2D (rf, random step embedding) and on the digits
    teacher's flow-map student read in rf time; sCD's cos sin dF/dphi (tangent (cs dx/dphi, cs / a)) on the digits
    teacher; the eps-prediction's derivative along (v, 1) through diffusers' UNet2DConditionModel with its
    attention (the tiny test pipeline's and the shipped mini SD's), in course time."""
    g = torch.Generator().manual_seed(0)
    rf = RectifiedFlow()

    def meanflow(model, x, cond):
        t = 0.2 + 0.7 * torch.rand(n, generator=g)
        r = (t - 0.1) * torch.rand(n, generator=g)          # t - r >= 0.1 > h: the central difference stays at r <= t
        v = torch.randn(x.shape, generator=g)

        def make(dtype):
            m = copy.deepcopy(model).to(dtype)
            f = lambda z_, r_, t_: fm.average_velocity(m, z_, t_, r_, cond)
            return f, (x.to(dtype), r.to(dtype), t.to(dtype)), (v.to(dtype), torch.zeros_like(r, dtype=dtype),
                                                               torch.ones_like(t, dtype=dtype))
        return make

    def plain(model, x, t, v_x, v_t, cond, attr):
        def make(dtype):
            m = copy.deepcopy(model).to(dtype)
            f = lambda x_, t_: attr(m, x_, t_)
            return f, (x.to(dtype), t.to(dtype)), (v_x.to(dtype), v_t.to(dtype))
        return make

    with seeded(0):
        mlp = flow_map_student(Denoiser(MLP2D(hidden=64, depth=2), rf, "velocity"))
        torch.nn.init.normal_(mlp.net.step_emb.mlp[2].weight, std=0.3)
    teacher = load_teacher("digits")
    x0, y = load_digits(16, "train")
    x0, y = x0[:n], labels(y[:n], 10)
    digits_map = fm.RFFlowMap(flow_map_student(teacher))
    t_d = 0.2 + 0.7 * torch.rand(n, generator=g)
    xt_rf = rf.marginal(x0, t_d, torch.randn(x0.shape, generator=g))
    vp = teacher.process
    t_v = fm.scm_times(n, g, vp, *fm.SCD_TIME)
    x_v = vp.marginal(x0, t_v, torch.randn(x0.shape, generator=g))
    dxdphi = fm.trigflow_velocity(teacher, x_v, t_v, y).detach()
    phi = vp.a * t_v + vp.b
    cs = torch.cos(phi) * torch.sin(phi)
    cases = {
        "mlp2d flow map, meanflow du/dt": meanflow(mlp, torch.randn(n, 2, generator=g), None),
        "digits unet flow map (rf view), meanflow du/dt": meanflow(digits_map, xt_rf, y),
        "digits unet, scd cos sin dF/dphi": plain(teacher, x_v, t_v, cs.view(-1, 1, 1, 1) * dxdphi, cs / vp.a, y,
                                                  lambda m, x_, t_: fm.trigflow_velocity(m, x_, t_, y)),
    }
    for name, sd in (("tiny sd unet", from_pipeline(tiny_sd_pipeline())), ("mini sd unet", load_mini_sd())):
        model = sd.model
        ch, size = model.unet.config.in_channels, model.unet.config.sample_size
        text = torch.randn(n, 16, model.unet.config.cross_attention_dim, generator=g)
        cond = Cond(text=text)
        x = torch.randn(n, ch, size, size, generator=g)
        t = 0.2 + 0.7 * torch.rand(n, generator=g)
        cases[f"{name} (cross-attention), eps along (v, 1)"] = plain(
            model, x, t, torch.randn(x.shape, generator=g), torch.ones(n), cond,
            lambda m, x_, t_, c=cond: m(x_, t_, with_end_time(c, None)).eps)
    return cases


def fd_tangent_table(hs: tuple[float, ...] = FD_HS) -> dict[str, dict]:
    """For every case of `_tangent_cases`: the float32 finite-difference tangent's relative error against the
    float64 exact JVP (a float64 copy of the model) for each h, and the float32 JVP's own (h "jvp")."""
    out = {}
    for name, make in _tangent_cases().items():
        f64, p64, v64 = make(torch.float64)
        exact = fm.directional_derivative(f64, p64, v64)[1].detach()
        f32, p32, v32 = make(torch.float32)
        errs = fm.fd_tangent_error(f32, p32, v32, hs, exact)
        jvp32 = fm.directional_derivative(f32, p32, v32)[1].detach().double()
        out[name] = {"jvp": float((jvp32 - exact).norm() / exact.norm()), **{f"{h:g}": e for h, e in errs.items()}}
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m course_lib.recipes.flowmap_digits")
    parser.add_argument("command", choices=["fd-table"])
    parser.add_argument("--out", default="docs/results/flowmap_fd_tangent.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = fd_tangent_table()
    for name, errs in table.items():
        print(name, " ".join(f"{h}: {e:.1e}" for h, e in errs.items()))
    Path(args.out).write_text(json.dumps({"what": "relative error ||tangent - exact|| / ||exact|| of float32 "
                                          "tangents against the float64 JVP (fd_tangent_table)",
                                          "fd_h": fm.FD_H, "torch": torch.__version__, "table": table}, indent=1))


if __name__ == "__main__":
    main()
