"""`bench guided`: guided distillation (Meng et al. 2023) of the shipped gmm-overlap and digits teachers."""
from __future__ import annotations

import torch

from ..classifier import balanced_labels
from ..conditioning import labels
from ..config import default_device, pick
from ..grids import uniform
from ..guidance import cfg as guide
from ..plotting import table
from ..recipes.guided import guided_2d_budget, guided_2d_students
from ..samplers import ddim, dpm_solver_pp_2m, generate
from ..teachers import load_teacher
from . import register
from .core import (Evaluation, conditional_reference, digits_floor, digits_n, fidelity_to_teacher, fresh, nfe, prior,
                   score_digits, score_fidelity, side_by_side, timed, train_fields)

GUIDANCE_WEIGHTS = (0.0, 1.0, 2.0, 4.0)


@register("guided", "guided distillation (Meng et al. 2023) on gmm-overlap, w = 0..4, and the guided digits teacher")
def bench_guided(mode: str, seed: int = 0, device: str | torch.device | None = None) -> tuple[list[dict], dict]:
    """Guided distillation (Meng et al. 2023) of the shipped gmm-overlap teacher, w in {0, 1, 2, 4}.

    Rows per (model, steps, w), extra fields "w" and "sampler", each over the evaluation seeds (students trained
    once). A guided student is measured against what it distils, the guided teacher at the same w:
    "swd_teacher" (SWD against the teacher's samples from fresh noise; the teacher's own row is that metric's
    floor) and "flow_map_err_teacher" (RMS distance to the teacher's output from the same noise); "class_acc" is the
    fraction of samples the exact mixture's Bayes classifier assigns to the requested class (labels balanced over
    the 8 classes); "swd_data" (context only) is the SWD against exact samples of the requested classes, which the
    guided teacher moves away from by design as w grows. Models: "data" (exact class-conditional samples: the
    swd_data floor and the Bayes accuracy of the data itself), "teacher" (classifier-free guidance,
    DPM-Solver++(2M); each step costs TWO network evaluations, cond + uncond, batched: nfe = 2 steps),
    "guided-student-stage1" (stage 1 sampled with n_start DDIM steps, one evaluation per step) and
    "guided-student" at 4 and 1 steps. Digits: the shipped digits teacher with guidance (class_acc from the digits
    classifier, kid_heldout, kid_train, fd_heldout)."""
    device = torch.device(device) if device is not None else default_device()
    b = guided_2d_budget(mode)
    n, ds = pick(mode, smoke=200, laptop=4000, full=25_000), "gmm-overlap"     # per evaluation seed
    teacher = load_teacher(f"{ds}-vp", device=device)
    stage1, students, secs = guided_2d_students(teacher, b, seed=seed, progress=mode != "smoke")
    trained = {("guided-student-stage1", b["n_start"]): train_fields(secs["stage1"], b["stage1_steps"])}
    trained.update({("guided-student", N): train_fields(secs[N], b["stage1_steps"] + b["pd_steps"]
                                                        * ((b["n_start"] // N).bit_length() - 1)) for N in students})
    ev = Evaluation(seed, device)
    samples = []                                  # per seed: {(w, name, steps): (x, seconds, sampler, guided)}
    for s in ev.seeds:
        mix, y_cpu, swd_data, acc = conditional_reference(ev, ds, n, s)
        y, x1 = labels(y_cpu.to(device), mix.num_classes), prior(teacher.process, (n, 2), s + 3, device)
        mine = {}
        for w in GUIDANCE_WEIGHTS:
            runs = [("teacher", b["teacher_steps"], "dpmpp2m", True,
                     lambda: dpm_solver_pp_2m(guide(teacher, w), x1, uniform(b["teacher_steps"]), teacher.process,
                                              cond=y)),
                    ("guided-student-stage1", b["n_start"], "ddim", False,
                     lambda: ddim(stage1, x1, uniform(b["n_start"]), teacher.process, cond=y.with_w(w)))]
            runs += [("guided-student", N, "ddim", False,
                      lambda N=N: ddim(students[N], x1, uniform(N), teacher.process, cond=y.with_w(w)))
                     for N in (4, 1) if N in students]
            for name, steps, sampler, guided, fn in runs:
                x, sec = timed(fn, device)
                mine[(w, name, steps)] = (x, sec, sampler, guided)
                common = dict(nfe=nfe(sampler, steps, guided), steps=steps, w=w, sampler=sampler, n=n,
                              **trained.get((name, steps), {}))
                ev.add(ds, name, "class_acc", acc(x), sec, **common)
                ev.add(ds, name, "swd_data", swd_data(x), sec, **common)
        samples.append(mine)
    for i, mine in enumerate(samples):            # fidelity to the guided teacher: needs every seed's teacher samples
        for (w, name, steps), (x, sec, sampler, guided) in mine.items():
            teacher_x = mine[(w, "teacher", b["teacher_steps"])][0]
            score_fidelity(ev, ds, name, x, None if name == "teacher" else teacher_x,
                           fresh(samples, i)[(w, "teacher", b["teacher_steps"])][0], sec,
                           nfe=nfe(sampler, steps, guided), steps=steps, w=w, sampler=sampler, n=n,
                           **trained.get((name, steps), {}))
    guided_digits_rows(ev, mode, device)
    rows = ev.rows()
    print(guided_summary(rows))
    return rows, {**b, "n": n, "w_range": [0.0, 4.0], "swd_projections": 256, "eval_seeds": ev.seeds}


def guided_summary(rows: list[dict]) -> str:
    """One line per (dataset, model, steps, w) with the metrics side by side (mean ± std over seeds), and the
    students' fidelity to the teacher: swd_teacher over the teacher's own (its floor) and the class accuracy
    difference in points, both per seed (same noise and reference), then mean ± std."""
    out = side_by_side(rows, ("dataset", "model", "steps", "nfe", "w"))
    teach = {(d["dataset"], d["w"]): d["rows"] for d in out if d["model"] == "teacher"}
    for d in out:
        t = teach.get((d["dataset"], d["w"]))
        if t is not None and d["model"].startswith("guided-student"):
            fidelity_to_teacher(d, t)
    return table(out, ["dataset", "model", "steps", "nfe", "w", "class_acc", "swd_teacher", "flow_map_err_teacher",
                       "swd_data", "kid_heldout", "swd_teacher / teacher's", "acc - teacher (points)"])


def guided_digits_rows(ev: Evaluation, mode: str, device: str | torch.device) -> None:
    """The shipped digits teacher with classifier-free guidance at each w (DPM-Solver++(2M)), balanced labels:
    class accuracy under the digits classifier and classifier.digits_scores, beside the data floor."""
    n = digits_n(mode, cheap=False)
    steps = pick(mode, smoke=2, laptop=16, full=64)
    teacher = load_teacher("digits", device=device)
    y = balanced_labels(n).to(device)
    for s in ev.seeds:
        digits_floor(ev, s)
        for w in GUIDANCE_WEIGHTS:
            x, sec = timed(lambda: generate(guide(teacher, w), teacher.process, (n, 1, 16, 16), "dpmpp2m", steps,
                                            generator=torch.Generator().manual_seed(s + 6),
                                            cond=labels(y, teacher.net.num_classes), device=device),
                           device)
            score_digits(ev, "teacher", x, sec, y=y, nfe=nfe("dpmpp2m", steps, guided=True), steps=steps, w=w,
                         sampler="dpmpp2m")
