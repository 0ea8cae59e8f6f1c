"""`bench reflow`: rectified flow and reflow (Liu et al. 2022) on the shipped flow-matching teachers."""
from __future__ import annotations

import torch

from ..config import pick
from ..plotting import table
from . import register
from .core import NFES, digits_fd, digits_floor_row, nfe, noise, prior, reference_2d, row, sweep_2d, timed, train_fields

REFLOW_NFES = (1, 2, 4, 64)


@register("reflow", "rectified flow and reflow (1-RF, 2-RF, 3-RF, 1-step distillations), SWD and straightness")
def bench_reflow(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Rectified flow and reflow (Liu et al. 2022) on the shipped 2D flow-matching teachers: "1-rf" (the teacher),
    "2-rf", "3-rf" sampled with Euler at NFE 1, 2, 4, 64 ("swd"), their straightness S(Z) measured on 64-step Euler
    paths ("straightness", nfe = 64), and the 1-step distillations "1-rf-distill", "2-rf-distill" (nfe 1). Teacher
    rows: the data floor and the teacher with Euler and Heun at NFE 1..128 (its best SWD is the target). Digits:
    the shipped digits 2-RF and its 1-step distillation (data/reflow), when present."""
    from ..config import default_device
    from ..distill import reflow
    from ..distill.reflow import reflow_2d_budget, reflow_2d_models
    from ..grids import uniform
    from ..metrics import sliced_wasserstein
    from ..samplers import euler

    device = torch.device(device) if device is not None else default_device()
    b = reflow_2d_budget(mode)
    n = b["n"]
    swd = lambda a, r: sliced_wasserstein(a.cpu(), r, n_proj=256, seed=0)
    rows: list[dict] = []
    for ds in ("checkerboard", "gmm"):
        ref, floor_row = reference_2d(ds, n, seed, swd, device)
        rows.append(floor_row)
        models, secs = reflow_2d_models(ds, b, seed, progress=mode != "smoke", device=device)
        teacher = models["1-rf"]
        for sampler in ("euler", "heun"):
            rows += sweep_2d(teacher, teacher.process, ds, f"fm-teacher-{sampler}", sampler, ref,
                             pick(mode, smoke=(1, 2, 4), laptop=NFES, full=NFES), seed + 3, swd, device)
        x1 = prior(teacher.process, (n, 2), seed + 3, device)
        for name in ("1-rf", "2-rf", "3-rf"):
            m = models[name]
            extra = {} if name == "1-rf" else train_fields(secs[name], b["steps"])
            for k in REFLOW_NFES:
                x, sec = timed(lambda: euler(m, x1, uniform(k), m.process), device)
                rows.append(row(ds, name, "swd", swd(x, ref), sec, nfe=nfe("euler", k), steps=k, device=device,
                                sampler="euler", n=n, **extra))
            s, sec = timed(lambda: reflow.straightness(m, x1[:2000], 64), device)
            rows.append(row(ds, name, "straightness", s, sec, nfe=nfe("euler", 64), steps=64, device=device,
                            sampler="euler", n=2000, **extra))
        for name in ("1-rf-distill", "2-rf-distill"):
            m = models[name]
            x, sec = timed(lambda: euler(m, x1, uniform(1), m.process), device)
            rows.append(row(ds, name, "swd", swd(x, ref), sec, nfe=nfe("euler", 1), steps=1, device=device,
                            sampler="euler", n=n, **train_fields(secs[name], b["steps"])))
    rows += reflow_digits_rows(mode, seed, device)
    print(reflow_summary(rows))
    return rows, {**b, "swd_projections": 256, "pair_solver": "heun"}


def reflow_summary(rows: list[dict]) -> str:
    """Per dataset: each model's SWD at its NFE over the teacher's best SWD, and straightness over 1-RF's."""
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in rows if r["metric"] == "swd"):
        mine = [r for r in rows if r["dataset"] == ds]
        best = min((r["value"] for r in mine if r["model"].startswith("fm-teacher") and r["metric"] == "swd"),
                   default=None)
        s1 = next((r["value"] for r in mine if r["model"] == "1-rf" and r["metric"] == "straightness"), None)
        for r in mine:
            if r["model"] in ("1-rf", "2-rf", "3-rf", "1-rf-distill", "2-rf-distill"):
                d = {"dataset": ds, "model": r["model"], "nfe": r["nfe"], "metric": r["metric"], "value": r["value"]}
                if r["metric"] == "swd" and best:
                    d["/ teacher best"] = r["value"] / best
                if r["metric"] == "straightness" and s1:
                    d["/ 1-rf"] = r["value"] / s1
                out.append(d)
    return table(out, ["dataset", "model", "nfe", "metric", "value", "/ teacher best", "/ 1-rf"])


def reflow_digits_rows(mode: str, seed: int, device: str | torch.device) -> list[dict]:
    """Digits: the diffusion teacher (DPM-Solver++ 16 steps: the solver that made the pairs; and read as a flow,
    "1-rf", with Euler), the shipped 2-RF (Euler 1, 4) and its 1-step distillation, digits Fréchet distance."""
    from ..classifier import DIGITS_FD_N, balanced_labels
    from ..distill import reflow
    from ..grids import uniform
    from ..guidance import condition
    from ..samplers import dpm_solver_pp_2m, euler
    from ..teachers import load_teacher

    if not (reflow.DIGITS_DIR / "digits-2rf").is_dir():
        return []
    n = pick(mode, smoke=64, laptop=DIGITS_FD_N, full=DIGITS_FD_N)
    teacher = load_teacher("digits", device=device)
    y = balanced_labels(n).to(device)
    x1 = noise((n, 1, 16, 16), seed + 6, device)
    rows = [digits_floor_row(device)]
    x, sec = timed(lambda: dpm_solver_pp_2m(condition(teacher, y), x1, uniform(16), teacher.process), device)
    rows.append(row("digits", "teacher", "digits_fd", digits_fd(x), sec, nfe=nfe("dpmpp2m", 16), steps=16,
                    device=device, sampler="dpmpp2m", n=n))
    models = [("1-rf", reflow.RFView(teacher), (1, 4)),
              ("2-rf", reflow.load_digits_flow("digits-2rf", device=device), (1, 4))]
    if (reflow.DIGITS_DIR / "digits-2rf-distill1").is_dir():
        models.append(("2-rf-distill", reflow.load_digits_flow("digits-2rf-distill1", device=device), (1,)))
    for name, m, ks in models:
        for k in ks:
            x, sec = timed(lambda: euler(condition(m, y), x1, uniform(k), m.process), device)
            rows.append(row("digits", name, "digits_fd", digits_fd(x), sec, nfe=nfe("euler", k), steps=k,
                            device=device, sampler="euler", n=n))
    return rows
