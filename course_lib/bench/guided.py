"""`bench guided`: guided distillation (Meng et al. 2023) of the shipped gmm-overlap and digits teachers."""
from __future__ import annotations

import torch

from ..config import pick
from ..plotting import table
from . import register
from .core import digits_acc, digits_fd, nfe, prior, row, side_by_side, timed, train_fields, conditional_reference

GUIDANCE_WEIGHTS = (0.0, 1.0, 2.0, 4.0)


@register("guided", "guided distillation (Meng et al. 2023) on gmm-overlap, w = 0..4, and the guided digits teacher")
def bench_guided(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Guided distillation (Meng et al. 2023) of the shipped gmm-overlap teacher, w in {0, 1, 2, 4}.

    Rows per (model, steps, w), extra fields "w" and "sampler": "swd" against exact samples of the requested
    classes (labels balanced over the 8 classes) and "class_acc", the fraction of samples the exact mixture's
    Bayes classifier assigns to the requested class. Models: "data" (exact class-conditional samples: the SWD
    floor and the Bayes accuracy of the data itself), "teacher" (classifier-free guidance, DPM-Solver++(2M);
    each step costs TWO network evaluations, cond + uncond, batched: nfe = 2 steps), "guided-student-stage1"
    (stage 1 sampled with n_start DDIM steps, one evaluation per step) and "guided-student" at 4 and 1 steps.
    Digits: the shipped digits teacher with guidance (class_acc from the digits classifier)."""
    from ..config import default_device
    from ..distill.guided import guided_2d_budget, guided_2d_students
    from ..grids import uniform
    from ..guidance import cfg as guide
    from ..samplers import ddim, dpm_solver_pp_2m
    from ..teachers import load_teacher

    device = torch.device(device) if device is not None else default_device()
    b = guided_2d_budget(mode)
    n, ds = b["n"], "gmm-overlap"
    mix, y_cpu, swd, acc, rows = conditional_reference(ds, n, seed, device)
    y = y_cpu.to(device)

    teacher = load_teacher(f"{ds}-vp", device=device)
    stage1, students, secs = guided_2d_students(teacher, b, seed=seed, progress=mode != "smoke")
    trained = {"guided-student-stage1": train_fields(secs["stage1"], b["stage1_steps"])}
    x1 = prior(teacher.process, (n, 2), seed + 3, device)
    for w in GUIDANCE_WEIGHTS:
        runs = [("teacher", b["teacher_steps"], "dpmpp2m", True,
                 lambda: dpm_solver_pp_2m(lambda x, t: guide(teacher, w, mix.num_classes)(x, t, y), x1,
                                          uniform(b["teacher_steps"]), teacher.process)),
                ("guided-student-stage1", b["n_start"], "ddim", False,
                 lambda: ddim(lambda x, t: stage1(x, t, y, w), x1, uniform(b["n_start"]), teacher.process))]
        for N in (4, 1):
            if N in students:
                trained[f"guided-student-{N}"] = train_fields(
                    secs[N], b["stage1_steps"] + b["pd_steps"] * ((b["n_start"] // N).bit_length() - 1))
                runs.append(("guided-student", N, "ddim", False,
                             lambda N=N: ddim(lambda x, t: students[N](x, t, y, w), x1, uniform(N), teacher.process)))
        for name, steps, sampler, guided, fn in runs:
            x, sec = timed(fn, device)
            extra = trained.get(name if name != "guided-student" else f"{name}-{steps}", {})
            for metric, value in (("swd", swd(x)), ("class_acc", acc(x))):
                rows.append(row(ds, name, metric, value, sec, nfe=nfe(sampler, steps, guided), steps=steps,
                                device=device, w=w, sampler=sampler, n=n, **extra))
    rows += guided_digits_rows(mode, seed, device)
    print(guided_summary(rows))
    return rows, {**b, "w_range": [0.0, 4.0], "swd_projections": 256}


def guided_summary(rows: list[dict]) -> str:
    """One line per (dataset, model, steps, w) with both metrics side by side, and the student-to-teacher ratios."""
    out = side_by_side(rows, ("dataset", "model", "steps", "nfe", "w"))
    teach = {(d["dataset"], d["w"]): d for d in out if d["model"] == "teacher"}
    for d in out:
        t = teach.get((d["dataset"], d["w"]))
        if t is not None and d["model"].startswith("guided-student"):
            d["swd / teacher"] = d["swd"] / t["swd"]
            d["acc - teacher (points)"] = 100 * (d["class_acc"] - t["class_acc"])
    return table(out, ["dataset", "model", "steps", "nfe", "w", "class_acc", "swd", "digits_fd", "swd / teacher",
                       "acc - teacher (points)"])


def guided_digits_rows(mode: str, seed: int, device: str | torch.device) -> list[dict]:
    """The shipped digits teacher with classifier-free guidance at each w (DPM-Solver++(2M)), balanced labels:
    class accuracy under the digits classifier and the digits Fréchet distance."""
    from ..classifier import DIGITS_FD_N, balanced_labels
    from ..guidance import cfg as guide
    from ..samplers import generate
    from ..teachers import load_teacher

    n = pick(mode, smoke=40, laptop=DIGITS_FD_N, full=DIGITS_FD_N)
    steps = pick(mode, smoke=2, laptop=16, full=64)
    teacher = load_teacher("digits", device=device)
    y = balanced_labels(n).to(device)
    rows = []
    for w in GUIDANCE_WEIGHTS:
        x, sec = timed(lambda: generate(guide(teacher, w, 10), teacher.process, (n, 1, 16, 16), "dpmpp2m", steps,
                                        generator=torch.Generator().manual_seed(seed + 6), y=y, device=device), device)
        common = dict(nfe=nfe("dpmpp2m", steps, guided=True), steps=steps, device=device, w=w, sampler="dpmpp2m", n=n)
        rows.append(row("digits", "teacher", "class_acc", digits_acc(x, y), sec, **common))
        rows.append(row("digits", "teacher", "digits_fd", digits_fd(x), sec, **common))
    return rows
