"""The digits rows of `bench flowmap`: 1- and 2-step students of MeanFlow (from scratch and distilling the shipped
teacher), shortcut models, sCD and sCT (recipes.flowmap_digits) beside the course's CD and PD digits students at the
same step counts (bench cd's and bench pd's own digits code) and the teacher's DPM-Solver++ at 16 steps, whose
held-out KID spread over the evaluation seeds is the target of the best one-step student."""
from __future__ import annotations

from typing import Sequence

import torch

from ..config import default_device
from ..plotting import table
from ..recipes import flowmap_digits as recipe
from ..teachers import load_teacher
from .cd import cm_budget
from .cd import digits_rows as cd_digits_rows
from .core import (Evaluation, digit_labels, digits_floor, digits_n, digits_teacher, prior, score_digits, side_by_side,
                   timed)
from .pd import digits_pd_rows

STUDENT_STEPS = (1, 2)
TEACHER_STEPS = 16


def _keep_students(rows: list[dict], model: str) -> list[dict]:
    return [r for r in rows if r["model"] == model and r["steps"] in STUDENT_STEPS]


def digits_rows(mode: str, seed: int, device, models: Sequence[str] = recipe.MODELS, baselines: bool = True,
                budget: dict | None = None, n_students: int | None = None) -> tuple[list[dict], dict]:
    """Schema-3 digits rows: every flow-map student of `models` at 1 and 2 steps (kid_heldout with its se,
    kid_train, fd_heldout, class_acc of the requested labels; train_updates, train_seconds, teacher_evals), the
    16-step teacher (DPM-Solver++; its class_acc too) and the data floor, over the evaluation seeds; with
    `baselines`, bench cd's CD and bench pd's PD digits students at 1 and 2 steps (their own code, their own
    budgets). `budget`: digits_budget(mode) overridden (a budget sweep); n_students: generated digits per seed and
    student in place of core.digits_n's. Returns (rows, meta)."""
    device = torch.device(device) if device is not None else default_device()
    b = {**recipe.digits_budget(mode), **(budget or {})}
    teacher = load_teacher("digits", device=device)
    ev = Evaluation(seed, device)
    students = {name: recipe.train_student(name, teacher, b, seed, progress=mode != "smoke") for name in models}
    big, small = n_students or digits_n(mode, cheap=True), digits_n(mode, cheap=False)
    for s in ev.seeds:
        digits_floor(ev, s)
        digits_teacher(ev, teacher, s, small, TEACHER_STEPS, device, with_labels=True)
        cond = digit_labels(big, device)
        for name, (student, cost) in students.items():
            x1 = prior(student.process, (big, 1, 16, 16), s + 6, device)
            for k in STUDENT_STEPS:
                x, sec = timed(lambda: recipe.sample(name, student, x1, k, cond, s + 7), device)
                score_digits(ev, name, x, sec, nfe=k, steps=k, y=cond.y, sampler=recipe.SAMPLER[name], **cost)
    rows = ev.rows()
    meta = {"flowmap_digits_budget": b, "flowmap_digits_models": list(models), "digits_n_students": big,
            "digits_n_teacher": small, "teacher_steps": TEACHER_STEPS}
    if baselines:
        cd_ev, pd_ev = Evaluation(seed, device), Evaluation(seed, device)
        cd_digits_rows("cd", cd_ev, mode, cm_budget(mode), seed, device, references=False)
        meta.update(digits_pd_rows(pd_ev, mode, seed, device, references=False))
        rows += _keep_students(cd_ev.rows(), "cd") + _keep_students(pd_ev.rows(), "pd")
    print(summary(rows))
    return rows, meta


def best_one_step(rows: list[dict]) -> tuple[dict | None, dict | None]:
    """(the flow-map student's 1-step kid_heldout row of lowest mean, the 16-step teacher's kid_heldout row)."""
    kid = [r for r in rows if r["metric"] == "kid_heldout"]
    best = min((r for r in kid if r["model"] in recipe.MODELS and r["steps"] == 1), key=lambda r: r["value"],
               default=None)
    teacher = next((r for r in kid if r["model"] == "teacher" and r["steps"] == TEACHER_STEPS), None)
    return best, teacher


def verdict(rows: list[dict]) -> str:
    """Whether the best one-step flow-map student's held-out KID is within the spread (mean + std over the seeds)
    of the 16-step teacher's."""
    best, teacher = best_one_step(rows)
    if best is None or teacher is None:
        return "no one-step student or no 16-step teacher row"
    top = teacher["value"] + (teacher.get("std") or 0.0)
    ok = best["value"] <= top
    return (f"best one-step student {best['model']}: kid_heldout {best['value']:.4f} ± {best.get('std') or 0:.4f}; "
            f"the {TEACHER_STEPS}-step teacher's {teacher['value']:.4f} ± {teacher.get('std') or 0:.4f}: "
            + ("within" if ok else "outside") + " its spread")


def summary(rows: list[dict]) -> str:
    lines = side_by_side([r for r in rows if r["dataset"] == "digits"], ("dataset", "model", "nfe"))
    return table(lines, ["dataset", "model", "nfe", "kid_heldout", "kid_train", "fd_heldout", "class_acc"]) \
        + "\n" + verdict(rows)
