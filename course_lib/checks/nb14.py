"""Checkers of notebook 14 (flow maps): MeanFlow's target (the MeanFlow identity with a forward-mode JVP), the
shortcut models' self-consistency target (two jumps of d as the target of one jump of 2d) and sCM's tangent in
TrigFlow (with its normalisation). Each checker runs all its cases before it prints one verdict; a du/dt (or a
dF/dt) that matches none of the named slips is compared with a central finite difference along the trajectory."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from ..config import seeded
from ..distill.flowmap import (SC_M, SCM_C, average_velocity, meanflow_target, scm_tangent, shortcut_target,
                               trigflow_velocity)
from ..models import flow_map_student
from ..processes import RectifiedFlow, VPCosine, bcast
from .. import steps
from .core import (accept, checker, clone_tensors, close, draw_seed, fall_back, first_look,
                   fresh_generator, max_diff, named_slip, param_grads, tiny_model)

RF = RectifiedFlow()
FD_STEP = 1e-6          # central finite differences in float64 (the course's backbones embed 1000 t)


def meanflow_target_ref(model, z: Tensor, t: Tensor, r: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The reference of Exercise 14.1 in the exercise's signature (`meanflow_target` without conditioning)."""
    return meanflow_target(model, z, t, r, v)


def shortcut_target_ref(target, z: Tensor, t: Tensor, d: Tensor, process, d_min: float) -> Tensor:
    """The reference of Exercise 14.2 in the exercise's signature (`shortcut_target` without conditioning)."""
    return shortcut_target(target, z, t, d, process, None, d_min)


def scm_tangent_ref(model, x: Tensor, t: Tensor, dxdphi: Tensor, warmup: float, c: float) -> tuple[Tensor, Tensor]:
    """The reference of Exercise 14.3 in the exercise's signature (`scm_tangent` without conditioning)."""
    return scm_tangent(model, x, t, dxdphi, None, warmup, c)


def _tiny_flow_map(process, g: torch.Generator, kind: str = "velocity") -> nn.Module:
    """A tiny float64 flow-map model whose output depends on its end time s (a random step embedding)."""
    teacher = tiny_model(process, g, kind)
    with seeded(draw_seed(g)):                                 # the new step embedding's init: not the global RNG
        model = flow_map_student(teacher).double()
        nn.init.normal_(model.net.step_emb.mlp[2].weight, std=0.3)
    return model


def _grads_reach(out: Tensor, params: list[Tensor]) -> bool:
    """out (any dtype) carries a graph to at least one of `params` with a non-zero gradient."""
    if not (isinstance(out, Tensor) and out.requires_grad):
        return False
    return any(float(gr.abs().max()) > 0 for gr in param_grads(out.double(), params))


# --- 14.1 MeanFlow's target ----------------------------------------------------------------------------------------

def _meanflow_variant(model, z, t, r, v, tangent=(1.0, 0.0, 1.0), sign=-1.0, factor=True):
    """u_tgt = v + sign (t - r) du/dt with du/dt a JVP of u(z, r, t) along (tangent[0] v, tangent[1], tangent[2])."""
    u_of = lambda z_, r_, t_: average_velocity(model, z_, t_, r_)
    _, dudt = torch.func.jvp(u_of, (z, r, t), (tangent[0] * v, tangent[1] * torch.ones_like(r),
                                               tangent[2] * torch.ones_like(t)))
    scale = bcast(t - r, v) if factor else 1.0
    return (v + sign * scale * dudt).detach()


def meanflow_dudt_fd(model, z, t, r, v, h: float = FD_STEP) -> Tensor:
    """du/dt along the trajectory through z (dz/dt = v, r fixed) by a central finite difference (float64); where
    r = t (there (t - r) du/dt = 0) r is moved to t - 2h, so that every evaluation keeps s <= t."""
    r = torch.minimum(r, t - 2 * h)
    with torch.no_grad():
        return (average_velocity(model, z + h * v, t + h, r) - average_velocity(model, z - h * v, t - h, r)) / (2 * h)


_MF_SLIPS = [
    (dict(sign=+1.0), "your target is v + (t - r) du/dt: the sign of the (t - r) term is flipped. Differentiating "
                      "(t - r) u = integral of v from r to t in t gives u + (t - r) du/dt = v, so u_tgt = v - (t - r) "
                      "du/dt."),
    (dict(factor=False), "your target is v - du/dt: the (t - r) factor is missing (it is what makes u = v at r = t)."),
    (dict(tangent=(0.0, 0.0, 1.0)), "your JVP's tangent is (0, 0, 1): that is the partial derivative in t at a "
                                    "fixed z. Along the trajectory z moves too, dz/dt = v: the tangent is (v, 0, 1)."),
    (dict(tangent=(1.0, 0.0, 0.0)), "your JVP's tangent is (v, 0, 0): it moves z but not t. The time itself moves, "
                                    "dt/dt = 1: the tangent of (z, r, t) is (v, 0, 1)."),
    (dict(tangent=(1.0, 1.0, 1.0)), "your JVP's tangent moves r with t (tangent (v, 1, 1)): r is the fixed start "
                                    "of the interval, dr/dt = 0, so the tangent of (z, r, t) is (v, 0, 1)."),
    (dict(tangent=(1.0, 1.0, 0.0)), "your JVP's tangent is (v, 1, 0): the 1 is on r, not on t (check the order of "
                                    "the inputs of your u and of the tangents you pass torch.func.jvp)."),
    (dict(tangent=(-1.0, 0.0, 1.0)), "your JVP's tangent is (-v, 0, 1): z moves along +v as t grows (dz/dt = v)."),
]


@checker("14.1")
def check_meanflow_target(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 14.1: student(model, z, t, r, v) -> (u, u_tgt): u = u(z, r, t) of a flow-map model (with its graph)
    and the MeanFlow target u_tgt = v - (t - r) sg(du/dt), du/dt the JVP of u on (z, r, t) with tangent (v, 0, 1),
    stopped (no graph). Checked on tiny random flow-map models against distill.flowmap.meanflow_target, the
    reference itself against a central finite difference; the slips named: the sign, the missing (t - r), the
    tangents (0, 0, 1), (v, 0, 0), (v, 1, 1), (v, 1, 0), (-v, 0, 1), a target with a graph, a u without one."""
    g = fresh_generator(seed)
    cases = []
    for k in range(3):
        model = _tiny_flow_map(RF, g)
        n = 8
        t = 0.3 + 0.65 * torch.rand(n, generator=g, dtype=torch.float64)
        r = (t - 0.1 - 0.2 * torch.rand(n, generator=g, dtype=torch.float64)).clamp_min(0.0)
        if k == 2:
            r[:2] = t[:2]                                                         # r = t: flow matching
        z = 1.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
        v = torch.randn(n, 2, generator=g, dtype=torch.float64)
        cases.append(((model, z, t, r, v), f"on random (z, t, r, v), case {k + 1}"))
    for (model, z, t, r, v), where in cases:
        args = (model, z, t, r, v)
        u_ref, tgt_ref = meanflow_target(*args)
        fd = v - bcast(t - r, v) * meanflow_dudt_fd(*args)
        if not close(tgt_ref, fd, atol=1e-5, rtol=1e-5):                          # the reference's own check
            raise AssertionError(f"meanflow_target differs from a finite difference by {max_diff(tgt_ref, fd):.2g}")
        problem = first_look(student, clone_tensors(args), (u_ref.detach(), tgt_ref), where,
                             zeros="u and v are velocities of order one here, and u_tgt = v where r = t.")
        if problem:
            return fall_back("14.1", meanflow_target_ref, problem)
        u, tgt = student(*clone_tensors(args))
        params = [p for p in model.parameters()]
        if not close(u, u_ref):
            return fall_back("14.1", meanflow_target_ref, f"u differs from the model's average velocity {where} "
                                                      f"(max difference {max_diff(u, u_ref):.2g}): u(z, r, t) = "
                                                      "eps_hat - x0_hat of model(z, t, cond with s = r) "
                                                      "(`fm.average_velocity(model, z, t, r)`).")
        if not close(tgt, tgt_ref):
            for kw, why in _MF_SLIPS:
                if close(tgt, _meanflow_variant(*args, **kw)):
                    return fall_back("14.1", meanflow_target_ref, f"{why} ({where})")
            dudt = (v - tgt.detach().to(v.dtype)) / bcast((t - r).clamp_min(1e-12), v)
            fd_dudt = meanflow_dudt_fd(*args)
            return fall_back("14.1", meanflow_target_ref,
                             f"u_tgt differs from the reference {where} (max difference {max_diff(tgt, tgt_ref):.2g}). "
                             f"The du/dt your target implies, (v - u_tgt) / (t - r), differs from a central finite "
                             f"difference of u along the trajectory, (u(z + h v, r, t + h) - u(z - h v, r, t - h)) "
                             f"/ 2h, by {max_diff(dudt[t > r], fd_dudt[t > r]):.2g}.")
        if tgt.requires_grad:
            return fall_back("14.1", meanflow_target_ref, f"u_tgt carries a graph {where}: the target must be a "
                                                      "constant, u_tgt = v - (t - r) sg(du/dt) (detach it), or the "
                                                      "loss would also differentiate through the JVP (the paper's "
                                                      "stop-gradient, Eq. 10).")
        if not _grads_reach(u, params):
            return fall_back("14.1", meanflow_target_ref, f"u has no gradient to the model's parameters {where}: return "
                                                      "the u of the JVP's primal output (with its graph), not a "
                                                      "detached copy; the loss trains the model through it.")
    return accept("14.1", student, f"correct on {len(cases)} random cases (u with its graph; the target, checked "
                                   "against a finite difference, without one).")


# --- 14.2 the shortcut target ----------------------------------------------------------------------------------

def _shortcut_variant(target, z, t, d, process, d_min, mode):
    with torch.no_grad():
        if mode == "one jump":
            return steps.flow_map(target, z, t, t - 2 * d, process)
        if mode == "one d":
            return steps.flow_map(target, z, t, t - d, process)
        if mode == "no smallest rule":
            x = steps.flow_map(target, z, t, t - d, process)
            return steps.flow_map(target, x, t - d, t - 2 * d, process)
    raise ValueError(mode)


@checker("14.2")
def check_shortcut_target(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 14.2: student(target, z, t, d, process, d_min) -> X_tgt (B, D): two jumps of d of the target network,
    X_tgt = sg X(X(z, t -> t - d), t - d -> t - 2d), where a jump of the smallest step d <= d_min is one DDIM step
    of the model's instantaneous prediction (the model at s = t). Checked on tiny random flow-map models under rf and
    vp-cosine against distill.flowmap.shortcut_target; the slips named: one jump of 2d, one jump of d, the smallest
    step taken with the jump, a target with a graph."""
    g = fresh_generator(seed)
    d_min = 1.0 / SC_M
    cases = []
    for process in (RF, VPCosine()):
        model = _tiny_flow_map(process, g, "velocity" if process is RF else "v")
        levels = torch.tensor([1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, d_min, d_min, 1 / 64], dtype=torch.float64)
        k = torch.randint(1, 4, (8,), generator=g).double()
        t = (2 * levels * k).clamp(max=1.0)
        t = torch.maximum(t, 2 * levels)
        z = 1.5 * torch.randn(8, 2, generator=g, dtype=torch.float64)
        cases.append(((model, z, t, levels, process, d_min), f"under the {process.name} process"))
    for args, where in cases:
        model, z, t, d, process, dm = args
        want = shortcut_target(model, z, t, d, process, None, dm)
        problem = first_look(student, clone_tensors(args), want, where,
                             zeros="X_tgt is a point on the way from z towards the data, of the size of z.")
        if problem:
            return fall_back("14.2", shortcut_target_ref, problem)
        got = student(*clone_tensors(args))
        if not close(got, want):
            slips = [("one jump", "your target is one jump of 2d of the target network: that is the very thing the "
                                  "student is asked to match, so the loss teaches nothing. The target is TWO jumps of "
                                  "d: x' = X(z, t -> t - d), then X(x', t - d -> t - 2d)."),
                     ("one d", "your target is one jump of d, to t - d: the student's jump goes to t - 2d. Take a "
                               "second jump of d from x' = X(z, t -> t - d), to t - 2d."),
                     ("no smallest rule", "your jumps of the smallest step d_min are the model's jumps to s = t - d: "
                                          "at the smallest step the paper queries the model at d = 0, its "
                                          "instantaneous prediction (cond.s = t), with one DDIM step to t - d; that "
                                          "is where the flow-matching term anchors every level.")]
            why = named_slip(got, [(partial(_shortcut_variant, *args, mode), why) for mode, why in slips])
            if why:
                return fall_back("14.2", shortcut_target_ref, f"{why} ({where})")
            return fall_back("14.2", shortcut_target_ref,
                             f"X_tgt differs from the reference {where} (max difference {max_diff(got, want):.2g}): "
                             "x' = one DDIM step t -> t - d of target(z, t, cond.s = t - d) (cond.s = t at the "
                             "smallest step), then the same from x' at t - d to t - 2d (`steps.ddim_step`).")
        if got.requires_grad:
            return fall_back("14.2", shortcut_target_ref, f"X_tgt carries a graph {where}: the self-consistency target "
                                                      "is a constant (compute it under torch.no_grad()); with a "
                                                      "graph the loss would also move the two jumps towards the one.")
    return accept("14.2", student, f"correct on {len(cases)} random cases (two jumps of d, the smallest step on the "
                                   "instantaneous prediction, no graph).")


# --- 14.3 sCM's tangent --------------------------------------------------------------------------------------------

def _scm_variant(model, x, t, dxdphi, warmup, c, mode):
    process = model.process
    phi = process.a * t + process.b
    cos, sin = bcast(torch.cos(phi), x), bcast(torch.sin(phi), x)
    cs = torch.cos(phi) * torch.sin(phi)
    F_of = lambda x_, t_: trigflow_velocity(model, x_, t_)
    a_t = 1.0 if mode == "dt without 1/a" else 1.0 / process.a
    F, cs_dF = torch.func.jvp(F_of, (x, t), (bcast(cs, x) * dxdphi, cs * a_t))
    F, cs_dF = F.detach(), cs_dF.detach()
    g = -cos ** 2 * (F - dxdphi) - warmup * (cos * sin * x + cs_dF)
    if mode == "no normalisation":
        return g
    if mode == "batch norm":
        return g / (g.norm() + c)
    if mode == "squared norm":
        return g / (bcast(g.flatten(1).pow(2).sum(1), g) + c)
    if mode == "warmup on all":
        g_full = -cos ** 2 * (F - dxdphi) - (cos * sin * x + cs_dF)
        g = warmup * g_full
    return g / (bcast(g.flatten(1).norm(dim=1), g) + c)


def scm_dFdt_fd(model, x, t, dxdphi, h: float = FD_STEP) -> Tensor:
    """cos(phi) sin(phi) dF/dphi along x(phi) (dx/dphi given) by a central finite difference in phi (float64)."""
    process = model.process
    phi = process.a * t + process.b
    with torch.no_grad():
        dF = (trigflow_velocity(model, x + h * dxdphi, t + h / process.a)
              - trigflow_velocity(model, x - h * dxdphi, t - h / process.a)) / (2 * h)
    return bcast(torch.cos(phi) * torch.sin(phi), x) * dF


@checker("14.3")
def check_scm_tangent(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 14.3: student(model, x, t, dxdphi, warmup, c) -> (F, g): F = trigflow_velocity(model, x, t) with its
    graph and sCM's normalised tangent g = G / (||G|| + c) per sample, G = -cos^2(phi) (sg F - dx/dphi) - r cos(phi)
    sin(phi) (x + sg dF/dphi), dF/dphi the JVP of F on (x, t) along (dx/dphi, 1/a), without a graph. Checked on tiny
    random vp-cosine models against distill.flowmap.scm_tangent (its dF/dphi against a central finite difference);
    the slips named: no normalisation, one norm for the batch, the squared norm, the JVP's time tangent without
    1/a, the warm-up on the whole tangent, a tangent with a graph."""
    g = fresh_generator(seed)
    vp = VPCosine()
    cases = []
    for k, (warmup, c) in enumerate(((1.0, SCM_C), (0.5, SCM_C), (1.0, 0.5))):
        model = tiny_model(vp, g, "v", time_scale=0.01)
        x = 1.5 * torch.randn(8, 2, generator=g, dtype=torch.float64)
        t = 0.05 + 0.9 * torch.rand(8, generator=g, dtype=torch.float64)
        dxdphi = 1.5 * torch.randn(8, 2, generator=g, dtype=torch.float64)
        cases.append(((model, x, t, dxdphi, warmup, c), f"with warm-up r = {warmup:g} and c = {c:g}"))
    for args, where in cases:
        model, x, t, dxdphi, warmup, c = args
        F_ref, g_ref = scm_tangent(model, x, t, dxdphi, None, warmup, c)
        # the reference's JVP against a finite difference (un-normalised tangent at r = 1)
        _, g_raw = scm_tangent(model, x, t, dxdphi, None, 1.0, None)
        phi = vp.a * t + vp.b
        want_raw = (-bcast(torch.cos(phi) ** 2, x) * (F_ref.detach() - dxdphi)
                    - (bcast(torch.cos(phi) * torch.sin(phi), x) * x + scm_dFdt_fd(model, x, t, dxdphi)))
        if not close(g_raw, want_raw, atol=1e-5, rtol=1e-5):
            raise AssertionError(f"scm_tangent differs from a finite difference by {max_diff(g_raw, want_raw):.2g}")
        problem = first_look(student, clone_tensors(args), (F_ref.detach(), g_ref), where,
                             zeros="F is the model's TrigFlow velocity, of order one, and g a normalised tangent "
                                   "(each row's norm just below one).")
        if problem:
            return fall_back("14.3", scm_tangent_ref, problem)
        F, gt = student(*clone_tensors(args))
        if not close(F, F_ref):
            return fall_back("14.3", scm_tangent_ref, f"F differs from the model's TrigFlow velocity {where} (max "
                                                  f"difference {max_diff(F, F_ref):.2g}): F = "
                                                  "`fm.trigflow_velocity(model, x, t)`, the v-prediction.")
        if not close(gt, g_ref):
            slips = [("no normalisation", "your tangent is not normalised: divide each sample's g by its norm plus c, "
                                          "g / (||g|| + c) (sCM's tangent normalisation, c = 0.1): it bounds the "
                                          "update where the JVP is large, which is what keeps continuous-time "
                                          "training stable."),
                     ("batch norm", "your tangent is divided by the norm of the whole batch: the normalisation is "
                                    "per sample, g_i / (||g_i|| + c), over that sample's dimensions."),
                     ("squared norm", "your tangent is divided by its squared norm plus c: divide by the norm "
                                      "itself, g / (||g|| + c)."),
                     ("dt without 1/a", "your JVP moves t at the rate of phi: with phi = a t + b a step dphi is a "
                                        "step dt = dphi / a, so the tangent of (x, t) is (cos sin dx/dphi, "
                                        "cos sin / a)."),
                     ("warmup on all", "your warm-up factor r multiplies the whole tangent: it multiplies only the "
                                       "second term, r cos(phi) sin(phi) (x + dF/dphi); the first, -cos^2(phi) "
                                       "(F - dx/dphi), is always on.")]
            why = named_slip(gt, [(partial(_scm_variant, model, x, t, dxdphi, warmup, c, mode), why)
                                  for mode, why in slips])
            if why:
                return fall_back("14.3", scm_tangent_ref, f"{why} ({where})")
            return fall_back("14.3", scm_tangent_ref,
                             f"g differs from the reference {where} (max difference {max_diff(gt, g_ref):.2g}). "
                             "The reference's cos(phi) sin(phi) dF/dphi agrees with a central finite difference "
                             "(F(x + h dx/dphi, t + h / a) - F(x - h dx/dphi, t - h / a)) / 2h; compare yours.")
        if gt.requires_grad:
            return fall_back("14.3", scm_tangent_ref, f"g carries a graph {where}: the tangent is a constant direction "
                                                  "(sg F, sg dF/dphi: detach it); the loss moves F along it.")
        if not _grads_reach(F, list(model.parameters())):
            return fall_back("14.3", scm_tangent_ref, f"F has no gradient to the model's parameters {where}: return the "
                                                  "JVP's primal output with its graph.")
    return accept("14.3", student, f"correct on {len(cases)} random cases (the tangent checked against a finite "
                                   "difference, normalised per sample, without a graph).")
