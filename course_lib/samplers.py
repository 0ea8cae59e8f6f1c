"""Training-free ODE samplers as pure functions `sampler(model, x, ts, process) -> x_0`.

`model(x, t) -> Pred(x0, eps)` with t of shape (B,); `ts` is a grid from `course_lib.grids` (n + 1 times,
decreasing). No sampler keeps state between calls. With `return_path=True` a sampler returns the states
at every grid time, shape (n + 1, B, ...), for trajectory figures and straightness.

    sampler     order   NFE for n steps   reads like
    euler       1       n                 x_s = x_t + (s - t) u(x_t, t)
    ddim        1       n                 Song et al. 2021, Eq. 12 with eta = 0
    heun        2       2n - 1            Karras et al. 2022, Algorithm 1 (no correction on the last step to 0)
    dpmpp2m     2       n                 Lu et al. 2022b, DPM-Solver++(2M), Algorithm 2
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from .predictions import Pred, velocity
from .processes import AffineProcess, as_times, bcast


class Model(Protocol):
    def __call__(self, x: Tensor, t: Tensor) -> Pred: ...


def _finish(path: list[Tensor], return_path: bool) -> Tensor:
    return torch.stack(path) if return_path else path[-1]


def _coef(f: Callable[[Tensor], Tensor], t: Tensor, x: Tensor) -> Tensor:
    return bcast(f(t), x)


def ddim_step(pred: Pred, t: Tensor, s: Tensor, process: AffineProcess) -> Tensor:
    """One deterministic DDIM step t -> s (Song et al. 2021, Eq. 12, eta = 0):
    x_s = alpha_s x0_hat + sigma_s eps_hat. Shapes: pred fields (B, ...), t and s (B,)."""
    x0, eps = pred
    return _coef(process.alpha, s, x0) * x0 + _coef(process.sigma, s, x0) * eps


@torch.no_grad()
def ddim(model: Model, x: Tensor, ts: Tensor, process: AffineProcess, return_path: bool = False) -> Tensor:
    path = [x]
    for i in range(len(ts) - 1):
        t, s = as_times(ts[i], x), as_times(ts[i + 1], x)
        x = ddim_step(model(x, t), t, s, process)
        path.append(x)
    return _finish(path, return_path)


@torch.no_grad()
def euler(model: Model, x: Tensor, ts: Tensor, process: AffineProcess, return_path: bool = False) -> Tensor:
    """Euler on the probability-flow ODE dx/dt = u(x, t); exact in one step when paths are straight lines."""
    path = [x]
    for i in range(len(ts) - 1):
        t, s = as_times(ts[i], x), as_times(ts[i + 1], x)
        x = x + bcast(s - t, x) * velocity(model(x, t), t, process)
        path.append(x)
    return _finish(path, return_path)


@torch.no_grad()
def heun(model: Model, x: Tensor, ts: Tensor, process: AffineProcess, return_path: bool = False) -> Tensor:
    """Heun's second-order method, Karras et al. (2022) Algorithm 1 with t in place of sigma."""
    path = [x]
    n = len(ts) - 1
    for i in range(n):
        t, s = as_times(ts[i], x), as_times(ts[i + 1], x)
        h = bcast(s - t, x)
        d = velocity(model(x, t), t, process)           # 1. slope at the start
        x_euler = x + h * d                              # 2. Euler predictor
        if float(ts[i + 1]) == 0.0 and i == n - 1:
            x = x_euler                                  # 3. last step to t = 0: no correction (Alg. 1, line 8)
        else:
            d_next = velocity(model(x_euler, s), s, process)
            x = x + h * 0.5 * (d + d_next)               # 3. trapezoidal corrector
        path.append(x)
    return _finish(path, return_path)


@torch.no_grad()
def dpm_solver_pp_2m(model: Model, x: Tensor, ts: Tensor, process: AffineProcess,
                     return_path: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), data-prediction form with lambda = log(alpha / sigma):

        h_i = lambda_s - lambda_t
        D_i = x0_i                                          first step, and the last step into t = 0
        D_i = (1 + 1/(2 r)) x0_i - 1/(2 r) x0_{i-1},        r = h_{i-1} / h_i, otherwise
        x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h_i) - 1) D_i

    Matches diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2).
    """
    path = [x]
    x0_prev, h_prev = None, None
    n = len(ts) - 1
    for i in range(n):
        t, s = as_times(ts[i], x), as_times(ts[i + 1], x)
        pred = model(x, t)
        x0 = pred.x0
        a_s, s_t, s_s = _coef(process.alpha, s, x), _coef(process.sigma, t, x), _coef(process.sigma, s, x)
        if float(ts[i + 1]) == 0.0:
            x = a_s * x0 + s_s * pred.eps                 # last step: first order (DDIM); = x0 where sigma(0) = 0
        else:
            lam_t = 0.5 * _coef(process.log_snr, t, x)
            lam_s = 0.5 * _coef(process.log_snr, s, x)
            h = lam_s - lam_t
            D = x0
            if x0_prev is not None:
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = (s_s / s_t) * x - a_s * torch.expm1(-h) * D
            h_prev = h
        x0_prev = x0
        path.append(x)
    return _finish(path, return_path)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler, "ddim": ddim, "heun": heun, "dpmpp2m": dpm_solver_pp_2m,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations for `steps` steps (on a grid that ends at t = 0)."""
    get_sampler(sampler)
    return 2 * steps - 1 if sampler == "heun" else steps


def steps_for_nfe(sampler: str, budget: int) -> int:
    """The most steps whose NFE fits in `budget` (>= 1)."""
    get_sampler(sampler)
    if budget < 1:
        raise ValueError(f"NFE budget must be >= 1, got {budget}")
    return (budget + 1) // 2 if sampler == "heun" else budget


@torch.no_grad()
def generate(model: Callable[..., Pred], process: AffineProcess, shape: tuple[int, ...], sampler: str = "dpmpp2m",
             steps: int = 32, generator: torch.Generator | None = None, y: Tensor | None = None,
             ts: Tensor | None = None, device: torch.device | str = "cpu", return_path: bool = False) -> Tensor:
    """Draw x_1 from the prior and solve to t = 0: `generate(teacher, teacher.process, (1000, 2), "ddim", 8)`.

    model(x, t[, y]) -> Pred; y (B,) fixes class labels for a conditional model. ts defaults to
    grids.default_grid(steps, process).
    """
    from .grids import default_grid

    run = get_sampler(sampler)
    x1 = process.prior(shape, generator=generator, device=device)
    m = model if y is None else (lambda x, t: model(x, t, y))
    return run(m, x1, default_grid(steps, process) if ts is None else ts, process, return_path=return_path)
