"""Preconditioning in one place: the named scalings c_skip, c_out (c_in) of the course's methods, and the one wrapper
that imposes a boundary condition on any course model.

    D = c_skip x + c_out F                                   the shared form: F a network output, x the noisy input

    edm           EDM (Karras et al. 2022, Eq. 7 and Table 1), F the backbone's raw output (models.EDMPrecond)
                      c_skip = sd^2 / (sigma^2 + sd^2),   c_out = sigma sd / sqrt(sigma^2 + sd^2),
                      c_in = 1 / sqrt(sigma^2 + sd^2)      (c_noise = log(sigma) / 4: the edm process's `timestep`)
    consistency   Consistency Models (Song et al. 2023, Eq. 3 and Appendix C) on the paper's variables: the
                  variance-exploding noise level s = sigma_t / alpha_t, x_ve = x / alpha_t, F the EDM network output
                  recovered from x0_hat, sigma_min = s(t_min):
                      c_skip = sd^2 / ((s - sigma_min)^2 + sd^2),  c_out = sd (s - sigma_min) / sqrt(sd^2 + s^2)
                      f = alpha(t_min) (c_skip x_ve + c_out F)  (the paper's f lands on x_ve(t_min); times alpha(t_min)
                      it is the course's point x_{t_min}, so f(x, t_min) = x; alpha = 1 for edm: the paper's f)
    lcm           LCM (Luo et al. 2023, Eq. 9; diffusers' LCMScheduler.get_scalings_for_boundary_condition_discrete),
                  on integer timesteps tau with timestep_scaling s (10), F = x0_hat: the consistency scalings at
                  sigma = s tau, sigma_min = 0, WITHOUT the sd factor in c_out (diffusers#8547)
                      c_skip = sd^2 / ((s tau)^2 + sd^2),  c_out = s tau / sqrt((s tau)^2 + sd^2)
    gdd           GDD's GDDPrecond (Zheng & Yang 2024, Zyriix/GDD): the consistency scalings with sigma_min = eps
                  (0.002), in EDM's variance-exploding variables (sigma = sigma_t / alpha_t, x_ve = x / alpha_t), on
                  F the backbone's EDM output recovered from x0_hat: D = c_skip x_ve + c_out F. "consistency" and "gdd"
                  are one formula (`ve_coefficients`): they differ in sigma_min (s(t_min) or eps) and in the output's
                  scale (alpha(t_min) or 1: GDD's generator returns x0_hat)

Each of edm / consistency / lcm / gdd is a plain function of the noise level (elementwise, any shape, in the dtype
it is given). A boundary condition (c_skip = 1, c_out = 0 at the trajectory's end) holds exactly in each of the last
three. `boundary` applies one of them, by name, to a model's x0_hat at (x, t), and `Boundary` is the nn.Module
wrapper (models.ConsistencyModel, gdd.GDDPrecond are it with their kind fixed; the LCM students call `boundary`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .conditioning import Cond
from .predictions import Pred, edm_scalings as edm
from .processes import AffineProcess, bcast, time_dtype

SIGMA_DATA = 0.5             # sd of Consistency Models, LCM and GDD (EDM's sigma_data)
KINDS = ("consistency", "lcm", "gdd")

__all__ = ["KINDS", "SIGMA_DATA", "Boundary", "boundary", "coefficients", "consistency", "edm", "gdd", "lcm",
           "ve_coefficients"]


def consistency(sigma: Tensor, sigma_min: Tensor | float, sigma_data: float = SIGMA_DATA, sd_in_c_out: bool = True
                ) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of Consistency Models (Song et al. 2023, Appendix C) at noise levels sigma (any shape):
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = sd (sigma - sigma_min) / sqrt(sd^2 + sigma^2); c_skip = 1
    and c_out = 0 at sigma = sigma_min. sd_in_c_out=False drops the sd factor of c_out (LCM's choice, `lcm`)."""
    sd, d = sigma_data, sigma - sigma_min
    c_out = (sd * d if sd_in_c_out else d) / torch.sqrt(sd**2 + sigma * sigma)
    return sd**2 / (d * d + sd**2), c_out


def lcm(timesteps: Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """LCM's (c_skip, c_out) at integer timesteps tau (B,), in float64 (LCMScheduler's
    get_scalings_for_boundary_condition_discrete): the consistency scalings at sigma = s tau with sigma_min = 0 and
    no sd factor in c_out, c_skip = sd^2 / ((s tau)^2 + sd^2), c_out = s tau / sqrt((s tau)^2 + sd^2)."""
    return consistency(timesteps.to(torch.float64) * timestep_scaling, 0.0, sigma_data, sd_in_c_out=False)


def gdd(sigma: Tensor, eps: float = 0.002, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor]:
    """GDD's GDDPrecond (c_skip, c_out) at EDM noise levels sigma: the consistency scalings with sigma_min = eps."""
    return consistency(sigma, eps, sigma_data)


def ve_coefficients(t: Tensor, process: AffineProcess, x: Tensor, sigma_min: Tensor | float, sd: float,
                    scale: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """(a, b) (B,) with scale (c_skip x_ve + c_out F) = a x + b x0_hat: the consistency scalings at the
    variance-exploding level s = sigma_t / alpha_t (x_ve = x / alpha_t), on F the EDM network output that x0_hat
    carries, x0_hat = c_skip^EDM(s) x_ve + c_out^EDM(s) F (Karras et al. 2022, Eq. 7):

        b = r scale,  r = c_out(s) / c_out^EDM(s),    a = (c_skip(s) - r c_skip^EDM(s)) / (alpha_t / scale)

    In float64, cast to x's dtype. At s = sigma_min: c_skip = 1, c_out = 0, so a = scale / alpha_t and b = 0 exactly.
    With c_out -> c_out^EDM and c_skip -> c_skip^EDM (sigma_min -> 0) f = scale x0_hat: a network started from the
    teacher starts as the teacher's denoiser."""
    alpha, sig = process.alpha(t).double(), process.sigma(t).double()
    s_ve = sig / alpha                                                                   # (B,) EDM's sigma
    cs_g, co_g = consistency(s_ve, sigma_min, sd)
    cs_e, co_e = edm(s_ve, sd)[:2]
    r = co_g / co_e                                                                      # -> 1 as sigma grows
    a, b = (cs_g - r * cs_e) / (alpha / scale), r * scale                               # coefficients of x, x0_hat
    if bool((alpha == 0).any()):                        # s = inf (rf at t = 1): the limit a = 0, b = scale, f = x0_hat
        a, b = torch.where(alpha == 0, 0.0, a), torch.where(alpha == 0, scale * torch.ones_like(b), b)
    return a.to(x.dtype), b.to(x.dtype)


def coefficients(kind: str, t: Tensor, process: AffineProcess, x: Tensor, **params: Any) -> tuple[Tensor, Tensor]:
    """(a, b) (B,) with the wrapper's output f = a x + b x0_hat at course times t (B,), for the scalings `kind`:

        consistency   `ve_coefficients` with sigma_min = s(t_min) = sigma(t_min) / alpha(t_min) and scale
                      alpha(t_min): f = alpha(t_min) (c_skip(s) x_ve + c_out(s) F); f(x, t_min) = x exactly
        lcm           c_skip, c_out at the integer timestep round(T t - 1) (float64), cast to x's dtype
        gdd           `ve_coefficients` with sigma_min = eps, scale 1; for an edm model (alpha = 1) the paper's
                      D = c_skip x + c_out F

    params: t_min (consistency), timestep_scaling (lcm), eps (gdd), sigma_data (all)."""
    sd = params.get("sigma_data", SIGMA_DATA)
    if kind == "consistency":
        t_min = torch.full_like(t, params["t_min"])                  # in t's dtype, as t: s(t) = s_min bitwise at t_min
        alpha_min = process.alpha(t_min).double()
        return ve_coefficients(t, process, x, process.sigma(t_min).double() / alpha_min, sd, alpha_min)
    if kind == "lcm":
        tau = torch.round(process.timestep(t.to(torch.float64)))        # the integer timestep (float times round)
        return tuple(c.to(x) for c in lcm(tau, sd, params["timestep_scaling"]))
    if kind == "gdd":
        return ve_coefficients(t, process, x, params["eps"], sd)
    raise ValueError(f"unknown scalings {kind!r}; valid: {', '.join(KINDS)}")


def boundary(kind: str, x: Tensor, t: Tensor, x0_hat: Tensor, process: AffineProcess, **params: Any) -> Pred:
    """Pred(f, eps) with f = a x + b x0_hat (`coefficients` of `kind`) and eps = (x - alpha_t f) / sigma_t, so
    x = alpha f + sigma eps still holds. x, x0_hat (B, ...), t (B,) in time_dtype(x.dtype)."""
    a, b = coefficients(kind, t, process, x, **params)
    f = (bcast(a, x) * x + bcast(b, x) * x0_hat).to(x.dtype)
    al, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    return Pred(f, ((x - al * f) / s).to(x.dtype))


class Boundary(nn.Module):
    """A course model with a boundary condition imposed by named scalings (`KINDS`, `coefficients`):

        f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)           returned as Pred(f, eps consistent with x_t)

    forward(x, t, cond=None) calls the wrapped model(x, t, cond), the one model call.
    The config is {"kind": kind, **params, "model": the wrapped model's config}; models.build_model rebuilds it."""

    def __init__(self, model: nn.Module, kind: str, **params: Any):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown scalings {kind!r}; valid: {', '.join(KINDS)}")
        self.model, self.kind, self.params = model, kind, {k: float(v) for k, v in params.items()}

    @property
    def process(self) -> AffineProcess:
        return self.model.process

    def scalings(self, t: Tensor, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(a(t), b(t)), each (B,): the coefficients of x and x0_hat (`coefficients`), in x's dtype (t's without x)."""
        return coefficients(self.kind, t, self.process, t if x is None else x, **self.params)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Pred:
        t = t.to(time_dtype(x.dtype))
        return boundary(self.kind, x, t, self.model(x, t, cond).x0, self.process, **self.params)

    def config(self) -> dict:
        return {"kind": self.kind, **self.params, "model": self.model.config()}
