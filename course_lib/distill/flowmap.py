"""Flow maps: models that jump along the probability-flow ODE from any time t to any earlier time s in one call.

The flow map of the ODE dx/dt = v(x, t) is X(x_t, t -> s) = x_s, the ODE's solution at s started from x_t at t; a
diffusion model's ODE solver approximates it with many small steps, consistency models learn only s = t_min
(notebook 05), progressive distillation a fixed grid (notebook 01). The methods here learn X for every pair s <= t:

    MeanFlow         Geng, Deng, Bai, Kolter & He 2025, "Mean Flows for One-step Generative Modeling" (2505.13447)
    shortcut models  Frans, Hafner, Levine & Abbeel 2024, "One Step Diffusion via Shortcut Models" (2410.12557)
    sCM              Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models"
                     (2410.11081): the map to s = 0 only (a consistency model), trained in continuous time

A flow-map model is a course model called the one way, model(x, t, cond) -> Pred, with its end time s in the
conditioning, cond.s (`conditioning.with_end_time`; backbones built with flow_map=True embed the step t - s,
`models.flow_map_student`). Its Pred is chosen so that ONE DDIM step from t to s is the jump (`steps.flow_map`):

    X(x_t, t -> s) = alpha_s x0_hat + sigma_s eps_hat                  x0_hat, eps_hat = model(x_t, t, cond.s = s)

On the rectified-flow process x_t = (1 - t) x0 + t eps (t = 1 noise, t = 0 data, the papers' own convention for
MeanFlow) this is MeanFlow's average velocity:

    u(x_t, s, t) = eps_hat - x0_hat = (1 / (t - s)) int_s^t v(x_tau, tau) dtau,     X(x_t, t -> s) = x_t - (t - s) u

and at s = t, u is the instantaneous velocity v (a student copied from its teacher starts there, for every s).
Sampling: `samplers.flow_map` (1, 2, 4 steps from one network). The exact flow map of a 2D Gaussian mixture,
`exact_flow_map`, is the ground truth every learned map is measured against (`flow_map_error` over a grid of
(t, s) pairs, for flow maps and for any other model's one-step jump).

MeanFlow and sCM differentiate the network in t with a forward-mode JVP. The course's backbones embed the timestep
1000 t; sCM diverges there (its Sec. 4.1) and learns with time_scale=0.01 (models.MLP2D, models.UNet: 10 t).
Each method: targets, losses (per sample, (B,)), a method step for train.train_networks and a driver
(`train_meanflow`, `train_shortcut`, `train_scm`).

JVPs through diffusers' attention (`directional_derivative`). torch.func.jvp runs through the course UNet and
diffusers' UNet2DConditionModel (the mini SD's, with or without its peft LoRA; the tiny test pipeline's) only with
attention on PyTorch's "math" SDPA kernel or diffusers' classic AttnProcessor: the fused kernels (flash attention,
on CPU too) have no forward-mode derivative (NotImplementedError). The exact path (fd_h None) therefore runs under
the math kernel. The SD path takes the finite-difference tangent, `SD_FD_H` (TiM's choice): it runs with whatever
attention kernel diffusers picks (fused ones at scale), and on the mini SD it is cheaper and accurate enough; with
its LoRA at batch 32 on a loaded 2-core CPU one update took 3.0 s with the JVP, 1.8 s with the finite difference
(two forward calls without a graph) and 0.8 s for a plain forward and backward, and the float32 FD tangent at
FD_H was 1.2e-3 from the float64 JVP (relative), far below the spread of a stochastic regression target
(docs/results/flowmap_fd_tangent.json; at h >= 1e-3 it is off by 0.1 to 1: the backbones embed 1000 t).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import steps
from ..conditioning import Cond, check, unpack, with_end_time
from ..data2d import Data2D, get_mixture, sample_2d
from ..models import is_flow_map
from ..predictions import Pred, from_pred, velocity
from ..processes import AffineProcess, RectifiedFlow, VPCosine, as_times, bcast
from ..samplers import model_device
from ..train import Network, StepContext, Target, Trained, TrainConfig, train_networks
from .reflow import RFView

MF_RATIO = 0.25              # MeanFlow: fraction of samples with r != t (Table 1a, ImageNet)
MF_TIME_MEAN, MF_TIME_STD = -0.4, 1.0   # logit-normal times lognorm(-0.4, 1.0) (Table 1d)
MF_P, MF_C = 1.0, 1e-3       # adaptive loss weight 1 / (||err||^2 + c)^p (Sec. 4.3, Table 1e)
SC_M = 128                   # shortcut models: M = 128 smallest steps of 1/128 (Sec. 3.2)
SC_FRACTION = 0.25           # shortcut models: batch fraction k of self-consistency targets (paper 1/4; code 1/8)
SCT_TIME, SCD_TIME = (-1.0, 1.4), (-0.8, 1.6)   # sCM: log tan(phi) ~ N(mean, std^2) for sCT and sCD
SCM_C, SCM_WARMUP = 0.1, 10_000                # sCM: tangent normalisation constant c, warm-up updates
FD_H = 1e-4                  # the finite-difference tangent's step h in course time (`directional_derivative`):
                             # float32 against the float64 JVP, 1e-3 to 7e-3 relative error on the course's small
                             # models (docs/results/flowmap_fd_tangent.json); at 1e-3 and above 0.1 to 1, because
                             # the backbones embed 1000 t, whose fastest sinusoid turns in dt ~ 1e-3
SD_FD_H = FD_H               # the tangent of the mini SD path: a finite difference (module docstring: why)


# --- the jump and its prediction -----------------------------------------------------------------------------------

def jump_pred(x: Tensor, X: Tensor, t: Tensor, s: Tensor, process: AffineProcess, at_t: Pred | None = None) -> Pred:
    """The Pred whose DDIM step t -> s lands on X: the (x0, eps) with alpha_t x0 + sigma_t eps = x (it is a Pred at
    x_t) and alpha_s x0 + sigma_s eps = X, the 2x2 solve

        x0 = (sigma_s x - sigma_t X) / det,   eps = (alpha_t X - alpha_s x) / det,   det = alpha_t sigma_s - sigma_t alpha_s

    (on rf det = s - t and eps - x0 = (x - X) / (t - s), the average velocity). Where s = t the system is singular
    and `at_t` (the instantaneous prediction there) is returned. Shapes: x, X (B, ...); t, s (B,)."""
    a_t, s_t = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    a_s, s_s = bcast(process.alpha(s), x), bcast(process.sigma(s), x)
    det = a_t * s_s - s_t * a_s
    same = bcast(s == t, x)
    det = torch.where(same, torch.ones_like(det), det)
    x0, eps = (s_s * x - s_t * X) / det, (a_t * X - a_s * x) / det
    if at_t is None:
        if bool(same.any()):
            raise ValueError("jump_pred at s = t needs the instantaneous prediction there (at_t)")
        return Pred(x0, eps)
    return Pred(torch.where(same, at_t.x0, x0), torch.where(same, at_t.eps, eps))


def average_velocity(model: Callable[..., Pred], z: Tensor, t: Tensor, r: Tensor, cond: Cond | None = None) -> Tensor:
    """MeanFlow's u(z_t, r, t) = eps_hat - x0_hat of a flow-map model on the rectified-flow process (its jump
    z_r = z_t - (t - r) u). Shapes: z (B, ...); t, r (B,)."""
    pred = model(z, t, with_end_time(cond, r))
    return pred.eps - pred.x0


def _process_of(model, kind: type, needs: str):
    """model.process, refused unless it is a `kind` (`needs`: the method and the process it is written on)."""
    process = getattr(model, "process", None)
    if not isinstance(process, kind):
        raise ValueError(f"{needs}; this model's process is {process!r}")
    return process


def _rf(model) -> RectifiedFlow:
    return _process_of(model, RectifiedFlow, "MeanFlow is written on the rectified-flow process (x_t = (1 - t) x0 "
                                             "+ t eps, velocity eps - x0)")


def directional_derivative(f: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...],
                           fd_h: float | None = None, fd_back: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(f(*primals), the derivative of f along `tangents`): the product J_f v that MeanFlow's and sCM's targets need.

        fd_h None:  torch.func.jvp, exact, in one forward-mode pass (attention through the plain "math" kernel: the
                    fused attention kernels have no forward-mode derivative)
        fd_h = h:   the central finite difference (f(p + h v) - f(p - h v)) / 2h, as TiM does (Wang et al. 2025,
                    "Transition Models"), for networks that forward-mode AD does not run through; error O(h^2) from
                    the difference, O(eps_float / h) from rounding (float32: `FD_H` = 1e-4). Two extra forward
                    calls without a graph; f(*primals) keeps its graph.

    fd_back (B,), each in [0, h]: a per-sample backward step h' in place of h, (f(p + h v) - f(p - h' v)) / (h + h')
    (one-sided at h' = 0), for a map undefined past a boundary (MeanFlow's u(z, r, t) at t < r). Every primal and
    tangent is batch-first (B, ...). Returns (f(*primals), J_f v), the second without a graph for fd_h."""
    if fd_h is None:
        with sdpa_kernel([SDPBackend.MATH]):
            return torch.func.jvp(f, primals, tangents)
    out = f(*primals)
    with torch.no_grad():
        plus = f(*(p + fd_h * v for p, v in zip(primals, tangents)))
        if fd_back is None:
            return out, (plus - f(*(p - fd_h * v for p, v in zip(primals, tangents)))) / (2 * fd_h)
        minus = f(*(p - bcast(fd_back, v) * v for p, v in zip(primals, tangents)))
        return out, (plus - minus) / bcast(fd_h + fd_back, plus)


def fd_tangent_error(f: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...],
                     hs: tuple[float, ...], exact: Tensor | None = None) -> dict[float, float]:
    """The relative error ||FD_h - J v|| / ||J v|| of the finite-difference tangent (`directional_derivative` with
    fd_h = h) for every h in hs, against `exact` (J v computed elsewhere, e.g. the float64 JVP of a float64 copy of
    the model) or, without it, f's own torch.func.jvp. What picks `FD_H`."""
    if exact is None:
        exact = directional_derivative(f, primals, tangents)[1]
    exact = exact.detach().to(torch.float64)
    with torch.no_grad():
        return {h: float((directional_derivative(f, primals, tangents, h)[1].to(torch.float64) - exact).norm()
                         / exact.norm()) for h in hs}


class RFFlowMap(RFView):
    """A vp-cosine flow-map model (models.flow_map_student of a vp teacher) read in rectified-flow time, so that
    MeanFlow (written on rf) can train it: reflow.RFView maps the start time t and x, and here the end time cond.s
    too, each to the vp time of the same SNR. (x0_hat, eps_hat) do not depend on the process, so the rf jump
    (1 - s) x0_hat + s eps_hat is the vp jump divided by sqrt(alpha_s^2 + sigma_s^2) in rf's alpha, sigma: the
    same flow map, and u = eps_hat - x0_hat its average velocity. A copied student therefore starts as the
    teacher's DDIM step for every (t, s), in rf time. Its weights are the inner model's (state-dict keys "model.")."""

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None):
        if cond is not None and cond.s is not None:
            cond = with_end_time(cond, self.vp_time(as_times(cond.s, x)).to(x.dtype))
        return super().forward(x, t, cond)


# --- MeanFlow ------------------------------------------------------------------------------------------------------

def _logit_normal(n: int, generator: torch.Generator, mean: float, std: float) -> Tensor:
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=generator.device))


def meanflow_times(n: int, generator: torch.Generator, ratio: float = MF_RATIO, mean: float = MF_TIME_MEAN,
                   std: float = MF_TIME_STD) -> tuple[Tensor, Tensor]:
    """MeanFlow's (t, r) (Sec. 4.3, Table 1a, 1d): two logit-normal times sigmoid(mean + std n), t the larger and r the
    smaller; then r = t for a fraction 1 - ratio of the samples (there the loss is flow matching). Returns t, r (n,)
    float32 on the generator's device, r <= t (t = 1 noise)."""
    a, b = _logit_normal(n, generator, mean, std), _logit_normal(n, generator, mean, std)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = torch.rand(n, generator=generator, device=generator.device) >= ratio
    return t, torch.where(same, t, r)


def meanflow_target(model: Callable[..., Pred], z: Tensor, t: Tensor, r: Tensor, v: Tensor,
                    cond: Cond | None = None, fd_h: float | None = None) -> tuple[Tensor, Tensor]:
    """The MeanFlow identity (Eq. 6) as a regression target (Eq. 10): differentiating (t - r) u(z_t, r, t) =
    int_r^t v(z_tau, tau) dtau in t, along the trajectory through z_t, with r fixed,

        u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t)
        d/dt u = v . d_z u + 0 . d_r u + d_t u                           (Eq. 8: dz_t/dt = v, dr/dt = 0, dt/dt = 1)
        u_tgt  = v - (t - r) sg(du/dt)                                   (Eq. 10)

    du/dt is one forward-mode product, torch.func.jvp of u on (z, r, t) with tangent (v, 0, 1) (Eq. 9), computed with
    the model's u in the same pass (attention through its plain "math" kernel, which has a forward-mode derivative);
    with fd_h, a central finite difference of step fd_h instead (`directional_derivative`; its backward step
    min(fd_h, t - r), never to t < r where the map is undefined: one-sided on the flow-matching samples r = t, whose
    du/dt the factor t - r = 0 drops).
    Signs in the course's convention (t = 1 noise, data at t = 0, as in the paper):
    z_t = (1 - t) x0 + t eps, v = eps - x0, and time runs from t down to r <= t. Returns (u (B, ...) with its graph,
    u_tgt (B, ...) without)."""
    def u_of(z_, r_, t_):
        return average_velocity(model, z_, t_, r_, cond)

    back = None if fd_h is None else (t - r).clamp(0.0, fd_h)        # never past the diagonal t = r (one-sided)
    u, dudt = directional_derivative(u_of, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)), fd_h, back)
    return u, (v - bcast(t - r, v) * dudt).detach()


def meanflow_loss(model: Callable[..., Pred], x0: Tensor, eps: Tensor, t: Tensor, r: Tensor, cond: Cond | None = None,
                  teacher: Callable[..., Pred] | None = None, p: float = MF_P, c: float = MF_C,
                  fd_h: float | None = None) -> Tensor:
    """MeanFlow's loss (Eq. 9 - 10, Algorithm 1) with its adaptive weight (Sec. 4.3): per sample (B,),

        z_t  = (1 - t) x0 + t eps
        v    = eps - x0                       the conditional velocity (from scratch, Algorithm 1)
             = v_teacher(z_t, t)              a teacher's velocity (distillation; the teacher gets cond without s)
        err  = u_theta(z_t, r, t) - sg(u_tgt)                                   `meanflow_target`
        L    = sg(w) ||err||^2,   w = 1 / (||err||^2 + c)^p                     (p = 0: the plain squared error)

    ||.||^2 sums over the data dimensions, as the paper's (and its c = 1e-3) does. Where r = t the target is v:
    flow matching. fd_h: du/dt by a finite difference (`directional_derivative`). Shapes: x0, eps (B, ...); t, r (B,), r <= t. The model's process must be rf."""
    process = _rf(model)
    z = process.marginal(x0, t, eps)
    if teacher is None:
        v = eps - x0
    else:
        with torch.no_grad():
            v = velocity(teacher(z, t, with_end_time(cond, None)), t, process).to(z)
    u, u_tgt = meanflow_target(model, z, t.to(z.dtype), r.to(z.dtype), v, cond, fd_h)
    sq = (u - u_tgt).pow(2).flatten(1).sum(1)                                          # (B,)
    return sq / (sq.detach() + c) ** p


# --- shortcut models ---------------------------------------------------------------------------------------------

def shortcut_times(n: int, generator: torch.Generator, M: int = SC_M, fraction: float = SC_FRACTION
                   ) -> tuple[Tensor, Tensor]:
    """Shortcut models' (t, d) (Sec. 3.2, Algorithm 1), t = 1 noise: the first round(fraction n) samples get a
    self-consistency step d > 0, the jump 2d a power of two in {2/M, 4/M, ..., 1} (uniform over the log2(M) levels)
    and t on that jump's grid, t in {2d, 4d, ..., 1} (so t - 2d >= 0); the rest get d = 0 (flow matching) and
    t ~ U(0, 1]. Returns t, d (n,) float32 on the generator's device."""
    levels = M.bit_length() - 1
    if M < 2 or 2 ** levels != M:
        raise ValueError(f"M, the number of smallest steps, is a power of two >= 2; got {M}")
    g, dev = generator, generator.device
    k = round(fraction * n)
    jump = 2.0 ** -torch.randint(levels, (k,), generator=g, device=dev).float()      # 2d in {1, 1/2, ..., 2/M}
    t_sc = (torch.floor(torch.rand(k, generator=g, device=dev) / jump) + 1) * jump     # a multiple of 2d in (0, 1]
    t_fm = 1.0 - torch.rand(n - k, generator=g, device=dev)                           # (0, 1]
    return torch.cat([t_sc.clamp(max=1.0), t_fm]), torch.cat([jump / 2, torch.zeros(n - k, device=dev)])


def shortcut_target(target: Callable[..., Pred], z: Tensor, t: Tensor, d: Tensor, process: AffineProcess,
                    cond: Cond | None = None, d_min: float = 1.0 / SC_M) -> Tensor:
    """The self-consistency target of one jump of 2d (Sec. 3, Algorithm 1): two jumps of d of the stopped-gradient network,

        x'    = X(z_t, t -> t - d)
        X_tgt = sg X(x', t - d -> t - 2d)

    (on rf, in the paper's velocities: s_tgt = (s(x_t, t, d) + s(x', t - d, d)) / 2). A jump of the smallest step
    d <= d_min is taken with the instantaneous prediction (the model at s = t, trained by the flow-matching term,
    d = 0 in the paper; a DDIM step, Euler on rf), so every level rests on flow matching. Shapes: z (B, ...); t, d
    (B,). Returns X_tgt (B, ...) without a graph."""
    smallest = d <= d_min * (1 + 1e-6)

    def jump(x, a):                                          # X(x, a -> a - d), or a DDIM step of the model at s = a
        pred = target(x, a, with_end_time(cond, torch.where(smallest, a, a - d)))
        return steps.ddim_step(pred, a, a - d, process)

    with torch.no_grad():
        return jump(jump(z, t), t - d).to(z.dtype)


def shortcut_loss(model: Callable[..., Pred], x0: Tensor, eps: Tensor, t: Tensor, d: Tensor, cond: Cond | None = None,
                  target: Callable[..., Pred] | None = None, d_min: float = 1.0 / SC_M) -> Tensor:
    """Shortcut models' loss (Sec. 3, Algorithm 1), per sample (B,), the mean over the data dimensions of

        d = 0 (flow matching):       || v_theta(z_t, t) - (alpha'_t x0 + sigma'_t eps) ||^2        (rf: eps - x0)
        d > 0 (self-consistency):    || X_theta(z_t, t -> t - 2d) - X_tgt ||^2 / (2d)^2           `shortcut_target`

    with z_t = alpha_t x0 + sigma_t eps, v_theta the velocity of the model's prediction at s = t, and X_tgt from
    `target` (the model itself without gradient, or its EMA). Divided by (2d)^2, the second is the paper's squared
    error between average velocities on rf. Shapes: x0, eps (B, ...); t, d (B,) (`shortcut_times`)."""
    process = model.process
    target = model if target is None else target
    z = process.marginal(x0, t, eps)
    t = t.to(z.dtype)
    d = d.to(z.dtype)
    fm = d == 0
    s = torch.where(fm, t, t - 2 * d)
    pred = model(z, t, with_end_time(cond, s))
    out = torch.empty(len(z), dtype=z.dtype, device=z.device)
    if bool(fm.any()):
        v_tgt = bcast(process.d_alpha(t), x0) * x0 + bcast(process.d_sigma(t), x0) * eps
        err = velocity(Pred(pred.x0[fm], pred.eps[fm]), t[fm], process) - v_tgt[fm]
        out = out.index_put((fm.nonzero().squeeze(1),), err.pow(2).flatten(1).mean(1))
    sc = ~fm
    if bool(sc.any()):
        idx = sc.nonzero().squeeze(1)
        X_tgt = shortcut_target(target, z[idx], t[idx], d[idx], process, None if cond is None else cond[idx], d_min)
        X = steps.ddim_step(Pred(pred.x0[idx], pred.eps[idx]), t[idx], s[idx], process)
        out = out.index_put((idx,), (X - X_tgt).pow(2).flatten(1).mean(1) / (2 * d[idx]) ** 2)
    return out


# --- sCM: continuous-time consistency in TrigFlow ------------------------------------------------------------------

def _trigflow(model) -> VPCosine:
    return _process_of(model, VPCosine, "sCM is written in TrigFlow, the course's vp-cosine process (alpha = cos "
                                        "phi, sigma = sin phi, phi = a t + b)")


def scm_times(n: int, generator: torch.Generator, process: VPCosine, mean: float = SCT_TIME[0],
              std: float = SCT_TIME[1]) -> Tensor:
    """sCM's proposal of times (Sec. 4.2 / 5): tan(phi) = exp(tau) / sigma_d, tau ~ N(mean, std^2) (sCT: (-1.0, 1.4),
    sCD: (-0.8, 1.6), `SCD_TIME`), sigma_d = 1; returned as course times t = (phi - b) / a in [0, 1], (n,) float32 on
    the generator's device."""
    tau = mean + std * torch.randn(n, generator=generator, device=generator.device)
    return ((torch.atan(torch.exp(tau)) - process.b) / process.a).clamp(0.0, 1.0)


def trigflow_velocity(model: Callable[..., Pred], x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
    """F(x_t, t) = dx_t/dphi of a model's prediction: its v = cos(phi) eps_hat - sin(phi) x0_hat (the "v" target,
    `predictions.from_pred`). For a vp-cosine model x0_hat = cos(phi) x_t - sin(phi) F exactly: TrigFlow's
    consistency function with sigma_d = 1 (Lu & Song 2024, Sec. 3)."""
    return from_pred(model(x, t, cond), t, model.process, "v")


def scm_tangent(model: Callable[..., Pred], x: Tensor, t: Tensor, dxdphi: Tensor, cond: Cond | None = None,
                warmup: float = 1.0, c: float | None = SCM_C, fd_h: float | None = None) -> tuple[Tensor, Tensor]:
    """sCM's tangent g (Lu & Song 2024, Sec. 4, the simplified objective), in TrigFlow with sigma_d = 1 (phi = a t + b):

        f   = cos(phi) x_t - sin(phi) F                     the consistency function (x0_hat), F = `trigflow_velocity`
        df/dphi = -cos(phi) (F - dx_t/dphi) - sin(phi) (x_t + dF/dphi)        along the ODE, F at theta^- = sg(theta)
        g   = -cos^2(phi) (F - dx_t/dphi) - r cos(phi) sin(phi) (x_t + dF/dphi)      (= cos(phi) df/dphi at r = 1)
        g  <- g / (||g|| + c)                                tangent normalisation, c = 0.1 (per sample, all dims)

    r in [0, 1] is the warm-up factor (`scm_warmup`). cos(phi) sin(phi) dF/dphi is one forward-mode product,
    torch.func.jvp of F on (x_t, t) with tangent (cos sin dx_t/dphi, cos sin / a) (the paper scales the tangent so, for
    stability; 1 / a because dphi/dt = a), in the same pass as F (fd_h: a finite difference,
    `directional_derivative`). c None: no normalisation. Shapes: x, dxdphi (B, ...);
    t (B,). Returns (F with its graph, g without)."""
    process = _trigflow(model)
    phi = process.a * t + process.b
    cos, sin = bcast(torch.cos(phi), x), bcast(torch.sin(phi), x)
    cs = torch.cos(phi) * torch.sin(phi)                                                 # (B,)

    def F_of(x_, t_):
        return trigflow_velocity(model, x_, t_, cond)

    F, cs_dF = directional_derivative(F_of, (x, t), (bcast(cs, x) * dxdphi, cs / process.a), fd_h)
    g = -cos ** 2 * (F.detach() - dxdphi) - warmup * (cos * sin * x + cs_dF.detach())
    if c is not None:
        g = g / (bcast(g.flatten(1).norm(dim=1), g) + c)
    return F, g.detach()


def scm_warmup(step: int, steps: int = SCM_WARMUP) -> float:
    """The warm-up factor r of sCM's tangent: linear from 0 to 1 over the first `steps` updates (10k in the paper)."""
    return min(1.0, step / steps) if steps > 0 else 1.0


def scm_loss(model: Callable[..., Pred], x0: Tensor, noise: Tensor, t: Tensor, cond: Cond | None = None,
             teacher: Callable[..., Pred] | None = None, warmup: float = 1.0, c: float | None = SCM_C,
             logw: Tensor | None = None, fd_h: float | None = None) -> Tensor:
    """sCM's continuous-time consistency loss (Lu & Song 2024, Sec. 4), per sample (B,):

        x_t     = cos(phi) x0 + sin(phi) z
        dx/dphi = cos(phi) z - sin(phi) x0                  sCT: the conditional velocity
                = F_teacher(x_t, t)                        sCD: the teacher's (a plain model, cond without s)
        L       = mean_dims || F_theta - F_theta^- - g ||^2                     g = `scm_tangent`, F^- = sg(F_theta)
        with logw (B,), the adaptive weighting exp(logw) L - logw (logw = w_phi(t), a learned function of t)

    whose gradient is -2 g . grad F_theta: F moves along the normalised tangent. The model's process must be
    vp-cosine (sigma_d = 1); x0_hat of its Pred is the consistency function, sampled with samplers.consistency."""
    process = _trigflow(model)
    x_t = process.marginal(x0, t, noise)
    t = t.to(x_t.dtype)
    phi = process.a * t + process.b
    if teacher is None:
        dxdphi = bcast(torch.cos(phi), x0) * noise - bcast(torch.sin(phi), x0) * x0
    else:
        with torch.no_grad():
            dxdphi = trigflow_velocity(teacher, x_t, t, with_end_time(cond, None)).to(x_t)
    F, g = scm_tangent(model, x_t, t, dxdphi, cond, warmup, c, fd_h)
    mse = (F - F.detach() - g).pow(2).flatten(1).mean(1)
    return mse if logw is None else torch.exp(logw) * mse - logw


# --- method steps and drivers for train.train_networks --------------------------------------------------------------

@dataclass
class FlowMapConfig:
    """The optimizer settings every flow-map run shares (the engine's TrainConfig holds steps, batch, seed)."""
    lr: float = 1e-4                # the papers' (MeanFlow, sCM: 1e-4 with Adam; shortcut models: 1e-4 AdamW)
    lr_schedule: str = "constant"
    warmup: int = 0                 # linear learning-rate warm-up updates
    ema_decay: float = 0.999        # the sampling EMA (the papers: 0.9999 at far more updates)
    fd_h: float | None = None       # MeanFlow, sCM: None the exact JVP; h a finite-difference tangent of step h

    def network(self, module: nn.Module) -> Network:
        return Network(module, lr=self.lr, lr_schedule=self.lr_schedule, warmup=self.warmup, ema_decay=self.ema_decay)


@dataclass
class MeanFlowConfig(FlowMapConfig):
    ratio: float = MF_RATIO         # fraction of samples with r != t
    time_mean: float = MF_TIME_MEAN
    time_std: float = MF_TIME_STD
    p: float = MF_P                 # adaptive weight power (0: plain squared error)
    c: float = MF_C
    t_max: float = 1.0              # times scaled into (0, t_max]: a process read in rf time whose noise end is
                                    # below 1 (Stable Diffusion's, reflow.RFView.rf_time of its t = 1)


@dataclass
class ShortcutConfig(FlowMapConfig):
    M: int = SC_M                   # smallest step 1 / M
    fraction: float = SC_FRACTION   # batch fraction with self-consistency targets
    target_decay: float = 0.999     # the targets' network: an EMA of the student (0: the student itself, a copy)


@dataclass
class SCMConfig(FlowMapConfig):
    time_mean: float = SCT_TIME[0]  # sCD: SCD_TIME
    time_std: float = SCT_TIME[1]
    c: float = SCM_C                # tangent normalisation
    tangent_warmup: int = SCM_WARMUP   # updates over which the warm-up factor r goes from 0 to 1


def _noise(x0: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)


def meanflow_step(cfg: MeanFlowConfig) -> Callable[[StepContext, Any], Tensor]:
    """MeanFlow's method step: net "student" (a flow-map model on rf); with a frozen "teacher", its velocity is v.
    Draws (t, r) (`meanflow_times`), then the noise, from ctx.generator."""
    def step(ctx: StepContext, batch: Any) -> Tensor:
        x0, cond = unpack(batch)
        t, r = (v.to(x0.device) for v in meanflow_times(len(x0), ctx.generator, cfg.ratio, cfg.time_mean,
                                                         cfg.time_std))
        if cfg.t_max != 1.0:
            t, r = t * cfg.t_max, r * cfg.t_max
        return meanflow_loss(ctx.nets["student"], x0, _noise(x0, ctx.generator), t, r, cond, ctx.nets.get("teacher"),
                             cfg.p, cfg.c, cfg.fd_h)
    return step


def shortcut_step(cfg: ShortcutConfig) -> Callable[[StepContext, Any], Tensor]:
    """The shortcut models' method step: nets "student" and "target" (its EMA, for the self-consistency targets).
    Draws (t, d) (`shortcut_times`), then the noise."""
    def step(ctx: StepContext, batch: Any) -> Tensor:
        x0, cond = unpack(batch)
        t, d = (v.to(x0.device) for v in shortcut_times(len(x0), ctx.generator, cfg.M, cfg.fraction))
        return shortcut_loss(ctx.nets["student"], x0, _noise(x0, ctx.generator), t, d, cond, ctx.nets["target"],
                             1.0 / cfg.M)
    return step


def scm_step(cfg: SCMConfig) -> Callable[[StepContext, Any], Tensor]:
    """sCM's method step: net "student" (a vp-cosine model); with a frozen "teacher", sCD. Draws t (`scm_times`),
    then the noise; the warm-up factor follows ctx.step."""
    def step(ctx: StepContext, batch: Any) -> Tensor:
        x0, cond = unpack(batch)
        student = ctx.nets["student"]
        t = scm_times(len(x0), ctx.generator, student.process, cfg.time_mean, cfg.time_std).to(x0.device)
        return scm_loss(student, x0, _noise(x0, ctx.generator), t, cond, ctx.nets.get("teacher"),
                        scm_warmup(ctx.step, cfg.tangent_warmup), cfg.c, fd_h=cfg.fd_h)
    return step


def _train(name: str, model: nn.Module, step, data, cfg: FlowMapConfig, run: TrainConfig, teacher, targets,
           ckpt_dir, accelerator, progress) -> tuple[nn.Module, Trained]:
    frozen = None if teacher is None else {"teacher": copy.deepcopy(teacher).requires_grad_(False).eval()}
    done = train_networks({"student": cfg.network(model.requires_grad_(True).train())}, step, data, run,
                          targets=targets, frozen=frozen, ckpt_dir=ckpt_dir, progress=progress,
                          accelerator=accelerator,
                          extra_config={"method": name, "distilled": teacher is not None, **cfg.__dict__})
    return done.best("student").eval().requires_grad_(False), done


def train_meanflow(model: nn.Module, data: Callable[[int, torch.Generator], Any], cfg: MeanFlowConfig, *,
                   run: TrainConfig, teacher: nn.Module | None = None, ckpt_dir=None, accelerator=None,
                   progress: bool = True) -> tuple[nn.Module, Trained]:
    """MeanFlow: `model` (a flow-map model on rf: fresh, or models.flow_map_student(teacher)) learns the average
    velocity; from scratch with the conditional velocity, or distilling `teacher`'s velocity. Returns (the student to
    sample with samplers.flow_map: its EMA when ema_decay > 0, eval mode, no grad; the engine's Trained)."""
    return _train("meanflow", model, meanflow_step(cfg), data, cfg, run, teacher, None, ckpt_dir, accelerator,
                  progress)


def train_shortcut(model: nn.Module, data: Callable[[int, torch.Generator], Any], cfg: ShortcutConfig, *,
                   run: TrainConfig, ckpt_dir=None, accelerator=None, progress: bool = True
                   ) -> tuple[nn.Module, Trained]:
    """A shortcut model from scratch: `model` (a flow-map model, any process) learns flow matching at d = 0 and
    self-consistency of its jumps, the targets from an EMA of itself (train.Target, cfg.target_decay)."""
    return _train("shortcut", model, shortcut_step(cfg), data, cfg, run, None,
                  {"target": Target("student", decay=cfg.target_decay)}, ckpt_dir, accelerator, progress)


def train_scm(model: nn.Module, data: Callable[[int, torch.Generator], Any], cfg: SCMConfig, *, run: TrainConfig,
              teacher: nn.Module | None = None, ckpt_dir=None, accelerator=None, progress: bool = True
              ) -> tuple[nn.Module, Trained]:
    """sCT (no teacher) or sCD (`teacher`'s velocity; initialise `model` as a copy of it, as the paper does) of a
    vp-cosine model whose x0_hat becomes the consistency function (sample with samplers.consistency)."""
    return _train("scm", model, scm_step(cfg), data, cfg, run, teacher, None, ckpt_dir, accelerator, progress)


# --- the exact flow map of a Gaussian mixture --------------------------------------------------------------------

EXACT_STEPS = 128            # Heun steps per (t, s) pair (255 evaluations of the exact denoiser)


def exact_flow_map(dataset: Data2D, process: AffineProcess, x: Tensor, t: float | Tensor, s: float | Tensor,
                   cond: Cond | None = None, n: int = EXACT_STEPS) -> Tensor:
    """X*(x, t -> s), the exact probability-flow ODE dx/dt = v*(x, t) of a Gaussian-mixture dataset (v* the velocity
    of its exact denoiser, data2d) solved from t to s <= t: n steps of Heun's trapezoidal rule (Karras et al. 2022,
    Algorithm 1, the corrector on every step: the exact v* is finite at t = 0) on a grid uniform in t from t to s,
    every sample with its own pair (t_i, s_i). Computed in float64 (the exact denoiser's precision). Shapes: x (B, D);
    t, s floats or (B,); cond: labels of a class-conditional map. Returns (B, D) in x's dtype."""
    denoiser = get_mixture(dataset).denoiser(process)
    xw = x.to(torch.float64)
    tt, ss = as_times(t, xw).to(torch.float64), as_times(s, xw).to(torch.float64)
    if bool((ss > tt).any()):
        raise ValueError("the flow map runs from t down to s <= t")
    cond = with_end_time(check(cond), None)
    v = lambda y, a: velocity(denoiser(y, a, cond), a, process)                         # (B, D)
    h = bcast((ss - tt) / n, xw)
    for i in range(n):
        a, b = tt + (ss - tt) * (i / n), tt + (ss - tt) * ((i + 1) / n)
        d = v(xw, a)
        xw = xw + 0.5 * h * (d + v(xw + h * d, b))
    return xw.to(x.dtype)


class ExactFlowMap:
    """The exact flow map of a Gaussian-mixture dataset as a flow-map model: model(x, t, cond) -> the Pred whose DDIM
    step t -> cond.s is `exact_flow_map` (`jump_pred`; at s = t the exact denoiser's own prediction). A ground truth
    for the targets of every method (a target computed from it equals its own jump) and for error maps over (t, s)."""

    def __init__(self, dataset: Data2D, process: AffineProcess, n: int = EXACT_STEPS):
        self.dataset, self.process, self.n = dataset, process, n
        self.denoiser = get_mixture(dataset).denoiser(process)

    def __call__(self, x: Tensor, t: float | Tensor, cond: Cond | None = None) -> Pred:
        if check(cond) is None or cond.s is None:
            raise ValueError("a flow map needs its end time s: call model(x, t, cond) with cond.s set")
        t, s = as_times(t, x), as_times(cond.s, x)
        plain = with_end_time(cond, None)
        X = exact_flow_map(self.dataset, self.process, x, t, s, plain, self.n)
        return jump_pred(x, X, t, s, self.process, self.denoiser(x, t, plain))


def jump(model: Callable[..., Pred], x: Tensor, t: Tensor, s: Tensor, process: AffineProcess,
         cond: Cond | None = None) -> Tensor:
    """Any course model's one-call jump t -> s: a flow map's X(x, t -> s) (`steps.flow_map`), a plain model's DDIM
    step (a consistency model's: alpha_s f + sigma_s eps_hat; a diffusion model's first-order step). What an error
    map over (t, s) compares with the exact flow map."""
    flow = is_flow_map(model) or isinstance(model, ExactFlowMap)
    return (steps.flow_map if flow else steps.ddim)(model, x, t, s, process, cond)


def flow_map_error(model: Callable[..., Pred], dataset: Data2D, process: AffineProcess, ts: Tensor, n: int,
                   generator: torch.Generator, exact_steps: int = EXACT_STEPS) -> Tensor:
    """The mean error of a model's jumps over a grid of time pairs: E[||jump(x_t, t -> s) - X*(x_t, t -> s)||] (the
    Euclidean norm per sample) for every t = ts[i] > s = ts[j], x_t = alpha_t x0 + sigma_t eps from n exact samples x0
    of the dataset (the same x0 and eps for every pair). ts: (K,) times; returns (K, K) float64 with entry [i, j] the
    error from ts[i] to ts[j], NaN where ts[j] >= ts[i]. Every pair in one batch (K (K - 1) / 2 n samples)."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    pairs = [(i, j) for i in range(len(ts)) for j in range(len(ts)) if ts[j] < ts[i]]
    x0 = sample_2d(dataset, n, generator)[0].to(torch.float64)
    eps = torch.randn(n, x0.shape[1], generator=generator, dtype=torch.float64)
    t = torch.cat([ts[i].expand(n) for i, _ in pairs])
    s = torch.cat([ts[j].expand(n) for _, j in pairs])
    x_t = process.marginal(x0.repeat(len(pairs), 1), t, eps.repeat(len(pairs), 1))
    exact = exact_flow_map(dataset, process, x_t, t, s, n=exact_steps)
    device = model_device(model)
    dtype = next(iter(model.parameters())).dtype if isinstance(model, nn.Module) else torch.float64
    with torch.no_grad():
        got = jump(model, x_t.to(device, dtype), t.to(device), s.to(device), process).to("cpu", torch.float64)
    err = (got - exact).norm(dim=1).reshape(len(pairs), n).mean(1)
    out = torch.full((len(ts), len(ts)), float("nan"), dtype=torch.float64)
    for (i, j), e in zip(pairs, err):
        out[i, j] = e
    return out
