"""Checkers of notebook 11 (Hyper-SD): the segment start of a time, the TSCD loss (the teacher's step, then the
target network's jump to the segment start of t_next, stop-gradient), the reward-feedback loss (a reward on the one-step prediction of x0,
its gradient into the student), the unified sampler (TCD's gamma sampler on the trailing grid). Cases run on tiny
random 2D models under several processes."""
from __future__ import annotations

from typing import Callable

import torch

from .. import steps
from ..distill.consistency import cm_grid
from ..distill.hypersd import refl_loss, sample, segment_start, tscd_loss_at
from ..distill.tcd import tcf
from ..processes import RectifiedFlow, VPCosine
from ..samplers import tcd
from .core import (accept, checker, close, explain_exception, fall_back, first_look, fresh_generator, max_diff,
                   named_slip, param_grads, quiet, run_check, same_grads, tiny_model)

T_MIN = 0.002
SAMPLER_ATOL, SAMPLER_RTOL = 1e-6, 1e-5    # float64 cases; a sampler building its times in float32 differs by ~1e-7


def segment_start_ref(t: torch.Tensor, k: int, t_min: float) -> torch.Tensor:
    """The reference of exercise 11.1: hypersd.segment_start on [t_min, 1]."""
    return segment_start(t, k, t_min=t_min)


def _edges_times(g: torch.Generator, k: int, t_min: float) -> torch.Tensor:
    """Times for 11.1: random ones, every inner edge, t_min and 1 (float64)."""
    w = (1 - t_min) / k
    edges = t_min + w * torch.arange(1, k + 1, dtype=torch.float64)
    return torch.cat([t_min + (1 - t_min) * torch.rand(10, generator=g, dtype=torch.float64), edges,
                      torch.tensor([t_min], dtype=torch.float64)])


@checker("11.1")
def check_segment_start(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 11.1: student(t, k, t_min) -> s(t) (B,): the start of t's segment when [t_min, 1] is split into k
    equal segments (e_m, e_{m+1}]; an edge belongs to the segment BELOW it (at e_{m+1} the student maps to e_m) and
    t_min is its own start. Checked on random times, every edge and t_min, for several k."""
    g = fresh_generator(seed)
    ref = segment_start_ref
    cases = [((_edges_times(g, k, T_MIN), k, T_MIN), f"for k = {k} on [t_min, 1]") for k in (8, 4, 2, 1)]
    cases.append(((_edges_times(g, 4, 0.0), 4, 0.0), "for k = 4 on [0, 1]"))
    args0, where0 = cases[1]
    problem = first_look(student, args0, ref(*args0), where0,
                         zeros="Only times in the first segment start at t_min; the others start higher.")
    if problem:
        return fall_back("11.1", ref, problem)
    try:
        for (t, k, t_min), where in cases:
            got, want = student(t.clone(), k, t_min), ref(t, k, t_min)
            if close(got, want):
                continue
            w = (1 - t_min) / k
            m = torch.floor((t - t_min) / w + 1e-9).clamp(max=k - 1)
            slips = [
                (t_min + m * w, "an edge e_m is mapped to itself (floor): the segments are (e_m, e_{m+1}], so a "
                                "point ON an edge belongs to the segment below it and is mapped to the previous edge "
                                "(at its own start the boundary condition would make the loss zero). Use "
                                "ceil((t - t_min) / w) - 1, clamped to [0, k - 1]."),
                (torch.minimum(want + w, torch.ones_like(t)), "you return the END of the segment: the student maps "
                                                               "x_t DOWN, towards data, to the segment's start."),
                (torch.full_like(t, t_min), "every time maps to t_min: that is consistency distillation's end (k = 1); "
                                            "with k segments the target is the start of t's own segment."),
                (ref(t, k, 0.0), "your segments split [0, 1], not [t_min, 1]: the width is (1 - t_min) / k and "
                                 "the edges start at t_min."),
            ]
            why = named_slip(got, slips)
            if why:
                return fall_back("11.1", ref, f"{why} ({where})")
            return fall_back("11.1", ref, f"your segment starts differ from the reference by up to "
                                          f"{max_diff(got, want):.3g} {where}: w = (1 - t_min) / k, "
                                          "s = t_min + w (ceil((t - t_min) / w) - 1) clamped to the first segment.")
    except Exception as e:  # noqa: BLE001
        return fall_back("11.1", ref, explain_exception(e))
    return accept("11.1", student, f"correct on {len(cases)} sets of times (random ones, every edge, t_min).")


def tscd_loss_ref(student, target, teacher, x0, eps, t_next, t_cur, k, process):
    """The reference of exercise 11.2: the TSCD loss per sample with s = segment_start(t_next, k, t_min = 0.002), one
    DDIM step of the teacher, the target network's jump to s, squared L2 (hypersd.tscd_loss_at)."""
    return tscd_loss_at(student, target, teacher, x0, eps, t_next, t_cur, segment_start(t_next, k, t_min=T_MIN),
                        process)


def _loss_with_target(student, x0, eps, t_next, s, process, tgt):
    x_next = process.marginal(x0, t_next, eps)
    return (tcf(student, x_next, t_next, s, process) - tgt).pow(2).mean(1)


@checker("11.2")
def check_tscd_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 11.2: student(student_model, target_model, teacher, x0, eps, t_next, t_cur, k, process) -> the TSCD
    loss per sample (B,): s = the segment start of t_next (k segments of [0.002, 1]); x_next = alpha x0 + sigma eps at
    t_next; the target = one DDIM step of the teacher to t_cur, then the TARGET network's DDIM jump (tcd.tcf) to s,
    under stop-gradient; the student's jump from (x_next, t_next) to s; squared L2 averaged over the data dimensions.
    Checked on adjacent points of a 17-point grid whose every edge is a grid point, with a target network distinct
    from the student (values) and with the student as its own target (gradient)."""
    g = fresh_generator(seed)
    ref = tscd_loss_ref

    def cases():
        for proc in (VPCosine(), RectifiedFlow()):
            online, target, teacher = tiny_model(proc, g), tiny_model(proc, g), tiny_model(proc, g)
            for p in online.parameters():
                p.requires_grad_(True)
            grid = cm_grid(17, proc, T_MIN)
            n = torch.cat([torch.tensor([1, 4, 5, 8, 9, 16]), torch.randint(1, 17, (6,), generator=g)])
            x0 = 2 * torch.randn(12, 2, generator=g, dtype=torch.float64)
            eps = torch.randn(12, 2, generator=g, dtype=torch.float64)
            for k in (4, 2):
                yield (online, target, teacher, x0, eps, grid[n], grid[n - 1], k, proc), \
                    f"for the {proc.name} process with k = {k}"

    all_cases = list(cases())
    args0, where0 = all_cases[0]
    problem = first_look(student, args0, ref(*args0), where0,
                         zeros="The student and the target jump from different points, so their squared distance is "
                               "positive.")
    if problem:
        return fall_back("11.2", ref, problem)
    for args, where in all_cases:
        online, target, teacher, x0, eps, t_next, t_cur, k, proc = args
        want = ref(*args)
        try:
            got = student(*args)
        except Exception as e:  # noqa: BLE001
            return fall_back("11.2", ref, explain_exception(e, where))
        if not close(got, want):
            s = segment_start(t_next, k, t_min=T_MIN)
            w = (1 - T_MIN) / k
            with torch.no_grad():
                x_next = proc.marginal(x0, t_next, eps)
                x_cur = steps.ddim(teacher, x_next, t_next, t_cur, proc)
                s_cur = segment_start(t_cur, k, t_min=T_MIN)
                end = torch.minimum(s + w, torch.ones_like(s))
                lose = lambda tgt, ss=s: _loss_with_target(online, x0, eps, t_next, ss, proc, tgt)
                slips = [
                    (lose(tcf(target, x_cur, t_cur, s_cur, proc), s_cur),
                     "your segment start is that of t_cur: where t_cur is itself an edge the jump leaves the segment "
                     "for the one below (crossing a segment). Both sides jump to the start of t_next's segment."),
                    (lose(tcf(target, x_cur, t_cur, s_cur, proc)),
                     "your target jumps to the segment start of t_cur: where t_cur is an edge that crosses into the "
                     "segment below. Use t_next's segment start for both sides."),
                    (lose(tcf(target, x_cur, t_cur, torch.full_like(s, T_MIN), proc), torch.full_like(s, T_MIN)),
                     "both sides jump to t_min (consistency distillation's end, the wrong boundary): TSCD maps to the "
                     "start of t_next's segment."),
                    (lose(tcf(target, x_cur, t_cur, end, proc), end),
                     "both sides jump to the segment's END (the wrong boundary): they map down to its start."),
                    (lose(tcf(online, x_cur, t_cur, s, proc)),
                     "your target side uses the online student, not the target network theta^- (target_model)."),
                    (lose(tcf(target, x_next, t_next, s, proc)),
                     "your target skips the teacher's ODE step: jump from the teacher's point at t_cur, not from "
                     "x_next."),
                ]
            why = named_slip(got, slips)
            if why:
                return fall_back("11.2", ref, f"{why} ({where})")
            return fall_back("11.2", ref, f"your loss differs from the reference by up to {max_diff(got, want):.3g} "
                                          f"{where}: s = segment start of t_next; x_hat = steps.ddim(teacher, x_next, "
                                          "t_next, t_cur, process); compare tcf(student, x_next, t_next, s) with "
                                          "tcf(target, x_hat, t_cur, s); squared error averaged over the data "
                                          "dimensions.")
        if not got.requires_grad:
            return fall_back("11.2", ref, f"the loss has no gradient {where}: compute the student's side outside "
                                          "torch.no_grad() (only the teacher step and the target's side go inside).")
        params = list(online.parameters())
        own = (online, online) + args[2:]
        try:
            got_g = param_grads(student(*own), params)
        except Exception as e:  # noqa: BLE001
            return fall_back("11.2", ref, explain_exception(e, where + " with the student as its own target"))
        if not same_grads(got_g, param_grads(ref(*own), params)):
            return fall_back("11.2", ref, f"the values are right but the gradient is not {where} when the target is "
                                          "the student itself (mu = 0): the gradient flows through the target side. "
                                          "Compute the teacher step and the target's jump under torch.no_grad().")
    return accept("11.2", student, "correct: the teacher's step, the target network's jump to the segment start of "
                                   "t_next (no crossing), a stop-gradient target and the student's gradient.")


def _reward_cases(g: torch.Generator):
    """(student model, x_t, t, process, reward_fn) with a reward that 'decodes' x0 by a fixed map first."""
    for proc in (VPCosine(), RectifiedFlow()):
        model = tiny_model(proc, g)
        for p in model.parameters():
            p.requires_grad_(True)
        dec = torch.randn(2, 3, generator=g, dtype=torch.float64)
        c = torch.randn(3, generator=g, dtype=torch.float64)
        reward = lambda x0, cond, dec=dec, c=c: -(torch.tanh(x0 @ dec) - c).pow(2).mean(1)
        x = 1.5 * torch.randn(8, 2, generator=g, dtype=torch.float64)
        t = 0.05 + 0.3 * torch.rand(8, generator=g, dtype=torch.float64)
        yield (model, x, t, proc, reward), f"for the {proc.name} process"


def refl_loss_ref(student, x_t, t, process, reward_fn):
    """The reference of exercise 11.3: hypersd.refl_loss (-r of the one-step prediction)."""
    return refl_loss(student, x_t, t, process, reward_fn)


@checker("11.3")
def check_refl_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 11.3: student(student_model, x_t, t, process, reward_fn) -> the reward-feedback loss (B,): minus the
    reward of the one-step prediction x0_hat = student_model(x_t, t).x0, with its gradient flowing through reward_fn
    (the 'decoder' and the reward model) and the prediction into the student's parameters."""
    g = fresh_generator(seed)
    ref = refl_loss_ref
    all_cases = list(_reward_cases(g))
    args0, where0 = all_cases[0]
    problem = first_look(student, args0, ref(*args0), where0,
                         zeros="The reward of a prediction off the preferred point is below zero, so its negative "
                               "is positive.")
    if problem:
        return fall_back("11.3", ref, problem)
    for args, where in all_cases:
        model, x, t, proc, reward = args
        want = ref(*args)
        try:
            got = student(*args)
        except Exception as e:  # noqa: BLE001
            return fall_back("11.3", ref, explain_exception(e, where))
        if not close(got, want):
            with torch.no_grad():
                slips = [(-reward(x, None), "you scored x_t, the noisy input: the reward is on the PREDICTION "
                                            "x0_hat = student_model(x_t, t).x0 (a reward model has never seen noisy "
                                            "inputs, and x_t does not depend on the student)."),
                         (-want, "your loss is the reward itself: minimising it would LOWER the reward. The loss is "
                                 "minus the reward.")]
            why = named_slip(got, slips)
            if why:
                return fall_back("11.3", ref, f"{why} ({where})")
            return fall_back("11.3", ref, f"your loss differs from the reference by up to {max_diff(got, want):.3g} "
                                          f"{where}: -reward_fn(student_model(x_t, t).x0, None).")
        params = list(model.parameters())
        if not getattr(got, "requires_grad", False):
            return fall_back("11.3", ref, f"the loss has no gradient {where}: compute the prediction and the reward "
                                          "outside torch.no_grad() and without .detach(), so that the reward's "
                                          "gradient flows back through the decoder and the prediction into the "
                                          "student.")
        got_g, want_g = param_grads(got, params), param_grads(want, params)
        if not same_grads(got_g, want_g):
            return fall_back("11.3", ref, f"the values are right but the gradient is not {where}: part of the path "
                                          "(the decoder inside reward_fn, or the prediction) is detached.")
    return accept("11.3", student, "correct: minus the reward of the one-step prediction, its gradient through the "
                                   "reward and the prediction into the student.")


def unified_sample_ref(model, x, n, process, gamma, noises):
    """The reference of exercise 11.4: hypersd.sample (samplers.tcd on the trailing grid 1, ..., 1/n, 0)."""
    return sample(model, x, n, process, gamma=gamma, noises=noises)


@checker("11.4")
def check_unified_sampler(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 11.4: student(model, x, n, process, gamma, noises) -> samples (B, D): n steps of TCD's gamma sampler
    on the trailing grid 1, (n-1)/n, ..., 1/n, 0 (each step: jump to (1 - gamma) t', re-noise to t' with the
    process's kernel but on the last step), noises (n - 1, B, D) the fresh z."""
    g = fresh_generator(seed)
    ref = unified_sample_ref
    near = lambda a, b: close(a, b, atol=SAMPLER_ATOL, rtol=SAMPLER_RTOL)

    def cases():
        for proc in (VPCosine(), RectifiedFlow()):
            model = tiny_model(proc, g)
            for n, gamma in ((1, 1.0), (2, 0.7), (4, 0.5), (8, 0.3), (4, 0.0)):
                x = proc.prior((6, 2), generator=g, dtype=torch.float64)
                noises = torch.randn(max(n - 1, 1), 6, 2, generator=g, dtype=torch.float64)[: n - 1]
                yield (model, x, n, proc, gamma, noises), f"for the {proc.name} process, {n} steps, gamma = {gamma}"

    all_cases = list(cases())
    args0, where0 = all_cases[2]
    problem = first_look(student, args0, ref(*args0), where0)
    if problem:
        return fall_back("11.4", ref, problem)
    try:
        for (model, x, n, proc, gamma, noises), where in all_cases:
            if n < 2:
                continue
            got = student(model, x.clone(), n, proc, gamma, noises)
            if near(got, ref(model, x, n, proc, gamma, noises)):
                continue
            slips = [
                (tcd(model, x, torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64), proc, gamma=1 - gamma,
                     noises=noises), "your sampler uses gamma the wrong way round: the jump goes to (1 - gamma) t'."),
                (tcd(model, x, torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64), proc, gamma=0.0, noises=noises),
                 "your sampler ignores gamma (DDIM, gamma = 0): jump to (1 - gamma) t' and re-noise to t'."),
                (tcd(model, x, torch.linspace(1.0, 0.0, n, dtype=torch.float64), proc, gamma=gamma,
                     noises=noises[: max(n - 2, 0)]),
                 "your grid has n points including 0, so the sampler takes n - 1 steps: the grid of n steps has "
                 "n + 1 points, 1, (n-1)/n, ..., 1/n, 0."),
            ]
            why = named_slip(got, slips, lambda a, b: a.shape == b.shape and near(a, b))
            if why:
                return fall_back("11.4", ref, f"{why} ({where})")
    except Exception as e:  # noqa: BLE001
        return fall_back("11.4", ref, explain_exception(e))
    fn, verdict = quiet(run_check, "11.4", student, ref, all_cases, atol=SAMPLER_ATOL, rtol=SAMPLER_RTOL,
                        hint="the grid is grids.trailing(n) (1, (n-1)/n, ..., 1/n, 0); at each step t -> t' jump with "
                             "the DDIM/TCF to s' = (1 - gamma) t', then (not on the last step) re-noise from s' to "
                             "t' with samplers.renoise and the next of `noises`.")
    print(verdict, end="")
    return fn
