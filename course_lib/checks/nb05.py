"""Checkers of notebook 05 (consistency models): the boundary-condition parameterisation on the paper's noise level
s = sigma / alpha, the consistency-distillation loss (teacher step, stop-gradient target), multistep consistency
sampling, and iCT's pieces (pseudo-Huber's c, the lognormal index distribution, the doubling N(k)).
Each checker runs all its cases before it prints one verdict."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..data2d import exact_denoiser
from ..distill.consistency import (cd_loss_at, cm_grid, consistency_fn, consistency_model, default_t_min,
                                   lognormal_index_probs, multistep_sample, n_doubling)
from ..distances import ICT_HUBER_C
from ..processes import EDM, RectifiedFlow, VPCosine
from .core import (accept, checker, clone_tensors, close, dtype_tol, explain_exception, fall_back, first_look,
                   fresh_generator, max_diff, param_grads, run_check, tiny_model)


def _tiny_cm(proc, g: torch.Generator):
    """A tiny random consistency model (float64) under `proc`, with the process's default t_min."""
    return consistency_model(tiny_model(proc, g), default_t_min(proc))


def _cm_cases(g: torch.Generator, processes=(VPCosine(), EDM(), RectifiedFlow())):
    """(tiny consistency model, process) under several processes."""
    for proc in processes:
        yield _tiny_cm(proc, g), proc


def _vp_sigma_fn(model, x, t, t_min, sigma_data):
    """The first edition's mistake: the consistency scalings at the VP sigma(t) (at most 1) on x0_hat."""
    sig = model.process.sigma(t)[:, None]
    d = sig - model.process.sigma(torch.full_like(t, t_min))[:, None]
    return sigma_data**2 / (d * d + sigma_data**2) * x + sigma_data * d / torch.sqrt(sigma_data**2 + sig**2) * model(x, t).x0


@checker("5.1")
def check_consistency_fn(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 5.1: student(model, x, t, t_min, sigma_data) -> f(x, t) (B, D), the consistency function on the
    paper's noise level s = sigma / alpha (x_ve = x / alpha, F the EDM output recovered from x0_hat), times
    alpha(t_min), with its boundary condition f(x, t_min) = x."""
    g = fresh_generator(seed)
    cases = []
    for cmodel, proc in _cm_cases(g):
        x = 1.5 * torch.randn(6, 2, generator=g, dtype=torch.float64)
        t_min = cmodel.t_min
        cases.append(((cmodel.model, x, torch.full((6,), t_min, dtype=torch.float64), t_min, 0.5),
                      f"at t = t_min for the {proc.name} process", True))
        t = t_min + (1 - t_min) * torch.rand(6, generator=g, dtype=torch.float64)
        cases.append(((cmodel.model, x, t, t_min, 0.5), f"at random t for the {proc.name} process", False))
    found = []                                                      # (order, problem): the first one is reported
    for args, where, at_boundary in cases:
        model, x, t, t_min, sd = args
        want = consistency_fn(model, x, t, t_min, sd)
        problem = first_look(student, clone_tensors(args), want, where,
                             zeros="f(x, t) is the model's estimate of the clean sample, spread like the data; at "
                                   "t = t_min it is x itself.")
        if problem:
            return fall_back("5.1", consistency_fn, problem)
        f = student(*clone_tensors(args))
        if not torch.isfinite(f).all():
            found.append((1, f"f contains inf or nan {where}."))
        elif at_boundary and not close(f, x):
            found.append((2, f"the boundary condition does not hold: f(x, t_min) differs from x by up to "
                             f"{max_diff(f, x):.3g} {where}. c_skip must be exactly 1 and c_out exactly 0 at "
                             "t = t_min: measure the noise level from the end, s - s_min with s_min = s(t_min), in "
                             "both (not s alone, as EDM's denoiser does)."))
        elif not at_boundary and not close(f, want):
            err = max_diff(f, want)
            if close(f, _vp_sigma_fn(model, x, t, t_min, sd)):
                found.append((3, f"f differs from the reference by up to {err:.3g} {where}: you used the VP sigma(t) "
                                 "(at most 1) on x0_hat. The paper's noise level is s = sigma(t) / alpha(t) on "
                                 "x_ve = x / alpha(t) and the raw network F: with sigma <= 1 c_skip(1) is 0.2, and a "
                                 "student started from its teacher would not start as the teacher."))
            else:
                found.append((4, f"f differs from the reference by up to {err:.3g} {where}. f = alpha(t_min) "
                                 "(c_skip(s) x_ve + c_out(s) F) with s = sigma(t) / alpha(t), s_min = s(t_min), "
                                 "x_ve = x / alpha(t), F = (x0_hat - c_skip^EDM(s) x_ve) / c_out^EDM(s) "
                                 "(precond.edm(s, sigma_data)[:2]), c_skip = sd^2 / ((s - s_min)^2 + sd^2), "
                                 "c_out = sd (s - s_min) / sqrt(sd^2 + s^2); bcast the (B,) scalings."))
    if found:
        return fall_back("5.1", consistency_fn, min(found, key=lambda p: p[0])[1])
    return accept("5.1", student, f"correct on {len(cases)} random cases, the boundary condition included.")


@checker("5.2")
def check_cd_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 5.2: student(student_model, target_model, teacher, x0, eps, t_next, t_cur, process) -> per-sample
    consistency-distillation loss (B,): one Heun step of the teacher from t_next to t_cur, the student's f at
    (x_{t_next}, t_next), the target's f at the teacher's point, stop-gradient on the target, squared L2 (mean).

    Besides the values, the gradient with respect to the student's parameters must equal the reference's, also
    when target_model IS the student (mu = 0: theta^- = stopgrad theta): a loss that lets the gradient through the
    target is rejected."""
    g = fresh_generator(seed)

    def cases():
        for k, (cm, proc) in enumerate(_cm_cases(g, (VPCosine(), EDM()))):
            teacher = exact_denoiser("gmm", proc)
            other = _tiny_cm(proc, g)
            grid = cm_grid(8, proc, cm.t_min)
            n = torch.randint(7, (8,), generator=g)
            x0 = 2 * torch.randn(8, 2, generator=g, dtype=torch.float64)
            eps = torch.randn(8, 2, generator=g, dtype=torch.float64)
            args = (x0, eps, grid[n + 1], grid[n], proc)
            yield (cm, other, teacher) + args, f"for the {proc.name} process with a separate target network"
            yield (cm, cm, teacher) + args, (f"for the {proc.name} process with the student as its own target "
                                             "(mu = 0)")

    def reference(s, tgt, teacher, x0, eps, t_next, t_cur, proc):
        return cd_loss_at(s, tgt, teacher, x0, eps, t_next, t_cur, proc, solver="heun")

    found = []                                                      # (order, problem): the first one is reported
    n = 0
    for args, where in cases():
        n += 1
        s = args[0]
        params = [p for p in s.parameters()]
        for p in params:
            p.requires_grad_(True)
        want = reference(*args)
        want_g = param_grads(want, params)
        problem = first_look(student, args, want, where,
                             zeros="The student's f and the target's are taken at different points, so their squared "
                                   "distance is positive, and its gradient is what trains the student.")
        if problem:
            return fall_back("5.2", reference, problem)
        got = student(*args)
        tol = dtype_tol(got, want)                                  # fits the answer's dtype
        if not got.requires_grad:
            found.append((0, f"the loss has no gradient {where}: compute the student's f outside torch.no_grad() "
                             "(only the teacher step and the target go inside). The student's parameters must "
                             "receive a gradient."))
            continue
        if not close(got, want):
            found.append((1, f"the loss differs from the reference by up to {max_diff(got, want):.3g} {where}. "
                             "Noise x0 to t_next (process.marginal), take ONE Heun step of the teacher to t_cur "
                             "(steps.heun), compare student(x_next, t_next).x0 with target(x_teacher, t_cur).x0, "
                             "squared error averaged over the data dimensions."))
            continue
        got_g = param_grads(got, params)
        if not all(torch.allclose(a.to(b.dtype), b, **tol) for a, b in zip(got_g, want_g)):
            found.append((2, f"the loss values are right but its gradient is not {where}: the gradient flows through "
                             "the target f_{theta^-} too. The target is a constant (stop-gradient): compute the "
                             "teacher step and target(x_teacher, t_cur) under torch.no_grad() (or .detach() them)."))
    if found:
        return fall_back("5.2", reference, min(found, key=lambda p: p[0])[1])
    return accept("5.2", student, f"correct on {n} random cases: the values and the student's gradient (a stop-gradient "
                                  "target, also when the target is the student itself) match the reference.")


@checker("5.3")
def check_multistep(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 5.3: student(model, x, ts, process, t_min, noises) -> samples (B, D): multistep consistency sampling
    (Algorithm 1) with the fresh noises given, noises (len(ts) - 1, B, D)."""
    g = fresh_generator(seed)

    def reference(model, x, ts, process, t_min, noises):
        return multistep_sample(model, x, ts, process, t_min, noises=noises)

    def cases():
        for cm, proc in _cm_cases(g):
            for ts in ([1.0], [1.0, 0.5], [1.0, 0.7, 0.3]):
                x = proc.prior((6, 2), generator=g, dtype=torch.float64)
                noises = torch.randn(max(len(ts) - 1, 1), 6, 2, generator=g, dtype=torch.float64)[: len(ts) - 1]
                yield (cm, x, ts, proc, cm.t_min, noises), f"for the {proc.name} process and step times {ts}"

    args0, where0 = next(iter(cases()))
    problem = first_look(student, clone_tensors(args0), reference(*args0), where0,
                         zeros="A sample is the model's last estimate x0, spread like the data, one per row of x.")
    if problem:
        return fall_back("5.3", reference, problem)
    return run_check("5.3", student, reference, cases(), atol=1e-8, rtol=1e-6,
                     hint="x0 = model(x, 1).x0; then for each later time tau: re-noise x0 from t_min to tau with "
                          "the process's own scales, x_tau = (alpha_tau / alpha_min) x0 + sqrt(sigma_tau^2 - "
                          "(alpha_tau / alpha_min)^2 sigma_min^2) z (samplers.renoise does it; a variance-preserving "
                          "process scales x0 by alpha_tau, so x0 + sigma_tau z is wrong there), and x0 = "
                          "model(x_tau, tau).x0. Return the last x0.")


# --- Exercise 5.4: iCT's pieces ------------------------------------------------------------------------------------

def ict_pieces_ref(k: int, K: int, process, t_min: float, d: int, s0: int = 10, s1: int = 1280
                   ) -> tuple[int, torch.Tensor, float]:
    """iCT's pieces at update k of K (Song & Dhariwal 2024): (N(k), p (N(k) - 1,), c) with N(k) = min(s0
    2^floor(k / K'), s1) + 1 grid points, K' = floor(K / (log2 floor(s1 / s0) + 1)) (Sec. 3.4); p(n) iCT's lognormal
    index distribution over the intervals of cm_grid(N(k)) (Sec. 3.5, P_mean = -1.1, P_std = 2 in ln s, s = sigma /
    alpha); c = 0.00054 sqrt(d) the pseudo-Huber constant for d data dimensions (Sec. 3.3)."""
    N = n_doubling(k, K, s0, s1)
    return N, lognormal_index_probs(cm_grid(N, process, t_min), process), ICT_HUBER_C * math.sqrt(d)


def _vp_lognormal(grid, process):
    z = (torch.log(process.sigma(grid)) + 1.1) / (math.sqrt(2.0) * 2.0)
    p = torch.erf(z[1:]) - torch.erf(z[:-1])
    return p / p.sum()


@checker("5.4")
def check_ict_pieces(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 5.4: student(k, K, process, t_min, d, s0, s1) -> (N, p, c): iCT's doubling N(k) (grid points), the
    lognormal index distribution p (N - 1,) over the intervals of cm.cm_grid(N, process, t_min), and pseudo-Huber's
    c = 0.00054 sqrt(d). Rejects, among others, a c without sqrt(d), a uniform p, p in the VP sigma instead of s,
    and N(k) off the doubling stages."""
    g = fresh_generator(seed)
    cases = []
    for proc in (VPCosine(), EDM()):
        t_min = default_t_min(proc)
        for K, s0, s1 in ((1000, 10, 1280), (400, 4, 32), (300, 2, 150)):
            Kp = K // (int(math.log2(s1 // s0)) + 1)                   # the length of one doubling stage
            for k in (int(torch.randint(K, (1,), generator=g)), Kp, 3 * Kp + 1):   # random, and where stages begin
                d = [2, 256, 3072][int(torch.randint(3, (1,), generator=g))]
                cases.append(((k, K, proc, t_min, d, s0, s1), f"at k = {k} of K = {K} (s0 = {s0}, s1 = {s1}), "
                                                               f"d = {d}, {proc.name} process"))
        cases.append(((K - 1, 1000, proc, t_min, 2, 10, 1280), f"at the last update (k = 999 of K = 1000), "
                                                                  f"{proc.name} process"))
    found = []                                                      # (order, problem): the first one is reported
    for args, where in cases:
        N, p, c = ict_pieces_ref(*args)
        try:
            out = student(*args)
            gN, gp, gc = out
        except Exception as e:  # noqa: BLE001
            return fall_back("5.4", ict_pieces_ref, explain_exception(e, where))
        k, K, proc, t_min, d, s0, s1 = args
        try:
            gN, gc = int(gN), float(gc)
        except (TypeError, ValueError):
            found.append((0, f"N must be an int and c a float {where}."))
            continue
        if gN != N:
            if gN < 2:
                found.append((1, f"N(k) = {gN} {where}: N counts grid points, at least 2 (one interval)."))
            else:
                found.append((3, f"N(k) = {gN} {where}, expected {N}: iCT's N(k) = min(s0 2^floor(k / K'), s1) + 1 "
                                 "grid points with K' = floor(K / (log2 floor(s1 / s0) + 1)): the number of "
                                 "intervals doubles in equal stages from s0 to s1 (+1: points, not intervals)."))
            continue
        if not isinstance(gp, torch.Tensor) or gp.shape != p.shape:
            shape = tuple(gp.shape) if isinstance(gp, torch.Tensor) else type(gp).__name__
            found.append((2, f"p must hold one probability per interval, shape ({N - 1},) for N = {N} grid points; "
                             f"got {shape} {where}."))
            continue
        gp = gp.detach().to(torch.float64)
        if not torch.isfinite(gp).all() or bool((gp < 0).any()) or abs(float(gp.sum()) - 1) > 1e-5:
            found.append((2, f"p is not a probability distribution (non-negative, sum 1; sum {float(gp.sum()):.4g}) "
                             f"{where}."))
        elif not torch.allclose(gp, p, atol=1e-6, rtol=1e-4):
            if torch.allclose(gp, torch.full_like(p, 1 / len(p)), atol=1e-6):
                found.append((4, f"p is uniform {where}: iCT draws n from a lognormal in the noise level, "
                                 "p(n) proportional to erf((ln s_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_n - "
                                 "P_mean) / (sqrt 2 P_std)), P_mean = -1.1, P_std = 2, s = sigma / alpha at the grid."))
            elif torch.allclose(gp, _vp_lognormal(cm_grid(N, proc, t_min), proc), atol=1e-6, rtol=1e-4):
                found.append((4, f"p differs from the reference {where}: you used ln sigma(t), the VP sigma; iCT's "
                                 "lognormal is in the paper's noise level s = sigma / alpha."))
            else:
                found.append((4, f"p differs from the reference by up to {(gp - p).abs().max().item():.3g} {where}: "
                                 "p(n) proportional to erf((ln s_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_n - "
                                 "P_mean) / (sqrt 2 P_std)) over the intervals of cm.cm_grid(N, process, t_min), "
                                 "normalised, P_mean = -1.1, P_std = 2, s = sigma / alpha."))
        elif not math.isclose(gc, c, rel_tol=1e-6):
            why = (" (0.00054 alone: c grows with sqrt(d), so it stays small against ||a - b||, which grows with "
                   "sqrt(d) too)" if math.isclose(gc, ICT_HUBER_C, rel_tol=1e-6) else "")
            found.append((5, f"c = {gc:.4g} {where}, expected 0.00054 sqrt(d) = {c:.4g}{why}."))
    if found:
        return fall_back("5.4", ict_pieces_ref, min(found, key=lambda p: p[0])[1])
    return accept("5.4", student, f"correct on {len(cases)} cases: N(k), the lognormal p(n) and c.")
