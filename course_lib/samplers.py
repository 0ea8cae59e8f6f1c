"""Samplers as pure functions `sampler(model, x, ts, process, return_path=False, generator=None, cond=None) -> x_0`.

`model(x, t, cond) -> Pred(x0, eps)` with t of shape (B,) and cond a conditioning.Cond or None, passed to every
model call unchanged (k-diffusion's extra_args): the one way to sample a conditional model. `ts` is a grid from
`course_lib.grids` (n + 1 times, decreasing). No sampler keeps state between calls. With `return_path=True` a sampler returns the states
at every grid time, shape (n + 1, B, ...), for trajectory figures and straightness. `generator` drives the
fresh noise of the stochastic samplers (deterministic ones ignore it); noise is drawn on the generator's device
(the CPU without one) and moved to x's device, so a seed gives the same samples on every device.

    sampler      order   NFE for n steps   reads like
    euler        1       n                 x_s = x_t + (s - t) u(x_t, t)                      (steps.euler)
    ddim         1       n                 Song et al. 2021, Eq. 12 with eta = 0              (steps.ddim)
    heun         2       2n - 1            Karras et al. 2022, Algorithm 1 (no correction on the last step to 0)
    dpmpp2m      2       n                 Lu et al. 2022b, DPM-Solver++(2M), Algorithm 2
    tcd          -       n                 Zheng et al. 2024, strategic stochastic sampling (gamma = 0.3)
    consistency  -       n                 Song et al. 2023, Algorithm 1 (multistep consistency sampling)
    flow_map     -       n                 a flow map's jumps X(x, t -> s) along the grid (`steps.flow_map`)

tcd and consistency are members of `multistep`, the one "denoise, then re-noise" sampler of the few-step methods
(consistency models, LCM, TCD, ADD, DMD), whose named options (gamma, where the denoised point sits) cover each.

With classifier-free guidance (`guidance.cfg`) every evaluation is a conditional/unconditional pair: twice the NFE.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from . import steps
from .conditioning import Cond
from .grids import default_grid
from .predictions import Pred
from .processes import AffineProcess, as_times, bcast
from .steps import ddim_step  # noqa: F401  (re-exported: exercise checkers and distill.pd use samplers.ddim_step)


class Model(Protocol):
    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Pred: ...


def _finish(path: list[Tensor], return_path: bool) -> Tensor:
    return torch.stack(path) if return_path else path[-1]


def _coef(f: Callable[[Tensor], Tensor], t: Tensor, x: Tensor) -> Tensor:
    return bcast(f(t), x)


def _run(step: Callable[..., Tensor], model: Model, x: Tensor, ts: Tensor, process: AffineProcess,
         return_path: bool, cond: Cond | None) -> Tensor:
    """Apply a per-sample step (course_lib.steps) along the grid ts."""
    path = [x]
    for i in range(len(ts) - 1):
        x = step(model, x, as_times(ts[i], x), as_times(ts[i + 1], x), process, cond)
        path.append(x)
    return _finish(path, return_path)


@torch.no_grad()
def ddim(model: Model, x: Tensor, ts: Tensor, process: AffineProcess, return_path: bool = False,
         generator: torch.Generator | None = None, cond: Cond | None = None) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, Eq. 12, eta = 0) on the grid ts: `steps.ddim` at every step."""
    return _run(steps.ddim, model, x, ts, process, return_path, cond)


@torch.no_grad()
def flow_map(model: Model, x: Tensor, ts: Tensor, process: AffineProcess, return_path: bool = False,
             generator: torch.Generator | None = None, cond: Cond | None = None) -> Tensor:
    """A flow-map model (MeanFlow, shortcut models, sCM; models.flow_map_student) along the grid ts: at each step the
    model is told the next grid time as its end time (cond.s = ts[i + 1]) and its DDIM step is the jump,
    x_{ts[i+1]} = X(x, ts[i] -> ts[i + 1]) (`steps.flow_map`). 1, 2, 4, ... steps from one network; n NFE.
    Not in SAMPLERS: it needs a flow-map model (a plain model refuses cond.s)."""
    return _run(steps.flow_map, model, x, ts, process, return_path, cond)


@torch.no_grad()
def euler(model: Model, x: Tensor, ts: Tensor, process: AffineProcess, return_path: bool = False,
          generator: torch.Generator | None = None, cond: Cond | None = None) -> Tensor:
    """Euler on the probability-flow ODE dx/dt = u(x, t); exact in one step when paths are straight lines."""
    return _run(steps.euler, model, x, ts, process, return_path, cond)


@torch.no_grad()
def heun(model: Model, x: Tensor, ts: Tensor, process: AffineProcess, return_path: bool = False,
         generator: torch.Generator | None = None, cond: Cond | None = None) -> Tensor:
    """Heun's second-order method, Karras et al. (2022) Algorithm 1 with t in place of sigma (`steps.heun`:
    no correction on a step into t = 0)."""
    return _run(steps.heun, model, x, ts, process, return_path, cond)


@torch.no_grad()
def dpm_solver_pp_2m(model: Model, x: Tensor, ts: Tensor, process: AffineProcess,
                     return_path: bool = False, generator: torch.Generator | None = None,
                     cond: Cond | None = None) -> Tensor:
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
        pred = model(x, t, cond)
        x0 = pred.x0
        a_s, s_t, s_s = _coef(process.alpha, s, x), _coef(process.sigma, t, x), _coef(process.sigma, s, x)
        if float(ts[i + 1]) == 0.0:
            x = (a_s * x0 + s_s * pred.eps).to(x.dtype)  # last step: first order (DDIM); = x0 where sigma(0) = 0
        else:
            lam_t = 0.5 * _coef(process.log_snr, t, x)
            lam_s = 0.5 * _coef(process.log_snr, s, x)
            h = lam_s - lam_t
            D = x0
            if x0_prev is not None:
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = ((s_s / s_t) * x - a_s * torch.expm1(-h) * D).to(x.dtype)
            h_prev = h
        x0_prev = x0
        path.append(x)
    return _finish(path, return_path)


def renoise(x: Tensor, s_from: Tensor | None, s_to: Tensor, process: AffineProcess, noise: Tensor) -> Tensor:
    """Noise x forward from s_from to s_to >= s_from with the process's own transition kernel:

        x_to = (alpha_to / alpha_from) x_from + sqrt(sigma_to^2 - (alpha_to / alpha_from)^2 sigma_from^2) z

    which maps x_from = alpha_from x0 + sigma_from eps to a sample of x_to = alpha_to x0 + sigma_to eps'. For the
    discrete SD schedule this is DDPM's q(x_to | x_from), variance 1 - abar_to / abar_from. s_from None: x is a clean
    sample, x_to = alpha_to x + sigma_to z (process.marginal). Shapes: x, noise (B, ...), s_from, s_to (B,)."""
    if s_from is None:
        return (bcast(process.alpha(s_to), x) * x + bcast(process.sigma(s_to), x) * noise).to(x.dtype)
    r = process.alpha(s_to) / process.alpha(s_from)
    var = (process.sigma(s_to) ** 2 - (r * process.sigma(s_from)) ** 2).clamp_min(0)
    return (bcast(r, x) * x + bcast(var.sqrt(), x) * noise).to(x.dtype)


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) of x's shape drawn on the generator's device (CPU without one) in float32 or wider, then moved."""
    device = generator.device if generator is not None else "cpu"
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.randn(x.shape, generator=generator, device=device, dtype=dtype).to(device=x.device, dtype=x.dtype)


def _grid(ts: Tensor | list) -> Tensor:
    """ts as a tensor: a list of ints becomes int64 (diffusers' timesteps), other lists float64 (course times)."""
    if isinstance(ts, Tensor):
        return ts
    ts = list(ts)
    return torch.tensor(ts, dtype=torch.int64 if all(isinstance(v, int) for v in ts) else torch.float64)


def _discrete_kernel(process: AffineProcess, tau_from: int | None, tau_to: int) -> tuple[float, float]:
    """(a, b) of DDPM's q(x_to | x_from) = N(a x_from, b^2 I) on integer timesteps: a = sqrt(r), b = sqrt(1 - r),
    r = abar_to / abar_from, read from the process's table (tau_from None or -1: the clean sample, abar = 1)."""
    abar = lambda tau: 1.0 if tau is None or tau < 0 else float(process.alphas_cumprod[tau])
    r = abar(tau_to) / abar(tau_from)
    return r ** 0.5, (1 - r) ** 0.5


@torch.no_grad()
def multistep(model: Model, x: Tensor, ts: Tensor | list, process: AffineProcess, *, cond: Cond | None = None,
              gamma: float = 1.0, denoised: str | float = "jump", noises: Tensor | None = None,
              generator: torch.Generator | None = None, return_path: bool = False) -> Tensor:
    """The "denoise, then re-noise" family of few-step samplers (consistency models, LCM, TCD, ADD, DMD) on the
    grid ts (n + 1,), decreasing: n evaluations, at ts[0..n-1]. Each step t = ts[i] -> s = ts[i + 1]:

        x0_hat, eps_hat = model(x_t, t, cond)
        x'  = the denoised point, at s' (`denoised`):
              "jump"   s' = (1 - gamma) s,  x' = alpha_s' x0_hat + sigma_s' eps_hat       TCD's jump (Zheng et al. 2024)
              "clean"  s' = clean,          x' = x0_hat                                    a clean sample (LCM, ADD)
              t_min    s' = t_min,          x' = x0_hat     a consistency function's end (Song et al. 2023, Alg. 1)
        not the last step: x_s = a x' + b z, z ~ N(0, I) fresh: the forward process from s' to s (`renoise`;
              from clean a = alpha_s, b = sigma_s), skipped when x' is already at s (gamma = 0)
        the last step returns x' (at (1 - gamma) ts[n] for "jump", x0_hat otherwise).

    gamma = 1 with "jump" jumps to ts[n] = 0 with the process's alpha(0), sigma(0) (vp-cosine: sigma(0) = 4.5e-5)
    and re-noises from there; "clean" takes x0_hat itself (re-noised with q(x_s | x0)): the two differ only where
    sigma(0) > 0. gamma = 0 is DDIM.

    ts: course times (float), or diffusers' integer timesteps (int64; grids.lcm_timesteps) of an SDDiscrete process:
    then the model sees t = (tau + 1) / T, the jump goes to tau_s = floor((1 - gamma) tau') (diffusers'
    TCDScheduler arithmetic, float32) and every coefficient is read from the abar table, as diffusers computes it
    (timestep -1 is the clean sample). The model is called model(x, t, cond). noises (n - 1, B, ...) fixes
    the fresh z (noises[i] at step i); otherwise they are drawn from `generator` (on its device, then moved).
    With return_path the states at ts[0..n-1] and the result, (n + 1, B, ...)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD's gamma must be in [0, 1] (0: DDIM, 1: multistep consistency sampling); got {gamma}")
    gamma = float(gamma)
    if not (denoised in ("jump", "clean") or isinstance(denoised, float)):
        raise ValueError(f"denoised is 'jump', 'clean' or a time t_min (float); got {denoised!r}")
    ts = _grid(ts)
    discrete = not ts.is_floating_point()
    path, n = [x], len(ts) - 1
    for i in range(n):
        t = as_times(process.t_of_timestep(ts[i]) if discrete else ts[i], x)
        pred = model(x, t, cond)
        if denoised != "jump":                                   # x' = x0_hat, at t_min or clean
            x, s_mid = pred.x0, (None if denoised == "clean" else as_times(denoised, x))
        elif discrete:                                           # TCD on diffusers' timesteps
            s_mid = int(torch.floor((1 - gamma) * ts[i + 1]))
            a, b = _discrete_kernel(process, None, s_mid)
            x = (a * pred.x0 + b * pred.eps).to(x.dtype)
        else:
            s_mid = (1.0 - gamma) * as_times(ts[i + 1], x)
            x = steps.ddim_step(pred, t, s_mid, process).to(x.dtype)
        if i < n - 1 and not (denoised == "jump" and gamma == 0):
            z = _noise_like(x, generator) if noises is None else noises[i].to(x)
            if discrete:
                a, b = _discrete_kernel(process, s_mid, int(ts[i + 1]))
                x = (a * x + b * z).to(x.dtype)
            else:
                x = renoise(x, s_mid, as_times(ts[i + 1], x), process, z)
        path.append(x)
    return _finish(path, return_path)


def tcd(model: Model, x: Tensor, ts: Tensor, process: AffineProcess, return_path: bool = False,
        generator: torch.Generator | None = None, gamma: float = 0.3, noises: Tensor | None = None,
        cond: Cond | None = None) -> Tensor:
    """TCD's strategic stochastic sampling (Zheng et al. 2024, Sec. 4.3; diffusers' TCDScheduler with eta = gamma):
    `multistep` with TCD's jump. Each step t -> s of the grid:

        x0_hat, eps_hat = model(x_t, t)
        s'   = (1 - gamma) s                                             a time at or below s
        x_s' = alpha_s' x0_hat + sigma_s' eps_hat                        deterministic DDIM jump t -> s'
        x_s  = (alpha_s / alpha_s') x_s' + sqrt(sigma_s^2 - (alpha_s / alpha_s')^2 sigma_s'^2) z,   z ~ N(0, I)

    The last line is the forward process from s' to s with fresh noise (`renoise`; for the SD schedule its variance
    is 1 - abar_s / abar_s'). gamma = 0 is DDIM; gamma = 1 jumps to t = 0 and re-noises: multistep consistency
    sampling. No noise is drawn on the last step of the grid nor when gamma = 0, as in diffusers.

    On course times this differs from diffusers' TCDScheduler: it floors the integer timestep, floor((1 - gamma) i),
    where the course uses (1 - gamma) s (equal when (1 - gamma)(i + 1) is an integer), and its last step lands on
    timestep 0 (abar_0 = 0.99915) where the course grid ends at t = 0, the clean sample. Given integer timesteps
    (grids.lcm_timesteps(n, end=0)) `multistep` is TCDScheduler step for step (tcd.sss).

    noises (len(ts) - 2, B, ...) fixes the fresh z of the re-noising steps (noises[i] at step i); otherwise they are
    drawn from `generator`.
    """
    return multistep(model, x, ts, process, cond=cond, gamma=gamma, noises=noises, generator=generator,
                     return_path=return_path)


def consistency(model: Model, x: Tensor, ts: Tensor, process: AffineProcess, return_path: bool = False,
                generator: torch.Generator | None = None, cond: Cond | None = None) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) on a grid ending at t = 0: at each grid time t,
    x0 = f(x_t, t) (the model's x0, e.g. a `models.ConsistencyModel`), then x_s = alpha_s x0 + sigma_s z with fresh
    z, and the last step returns x0. This is `tcd` with gamma = 1 (`multistep`'s jump to t = 0: alpha(0) x0 +
    sigma(0) eps_hat, x0 itself where sigma(0) = 0)."""
    return multistep(model, x, ts, process, cond=cond, gamma=1.0, generator=generator, return_path=return_path)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler, "ddim": ddim, "heun": heun, "dpmpp2m": dpm_solver_pp_2m, "tcd": tcd, "consistency": consistency,
}
STOCHASTIC = ("tcd", "consistency")


def get_sampler(name: str) -> Callable[..., Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def nfe(sampler: str, steps: int, guided: bool = False) -> int:
    """Network evaluations per sample for `steps` steps (on a grid that ends at t = 0). guided: every evaluation is
    a classifier-free-guided pair (conditional and unconditional), which counts 2."""
    get_sampler(sampler)
    n = 2 * steps - 1 if sampler == "heun" else steps
    return 2 * n if guided else n


def steps_for_nfe(sampler: str, budget: int, guided: bool = False) -> int:
    """The most steps whose NFE fits in `budget` (>= 1 step; a guided budget counts each pair as 2)."""
    get_sampler(sampler)
    per = 2 if guided else 1
    if budget < per:
        raise ValueError(f"NFE budget must be >= {per}{' (guided)' if guided else ''}, got {budget}")
    budget //= per
    return (budget + 1) // 2 if sampler == "heun" else budget


class CountingModel:
    """Wrap a model and count its network evaluations: `nfe` = rows evaluated / batch_size.

    Wrap the network itself, inside any guidance wrapper: `cfg(CountingModel(model, B), w, null)` sees 2B rows per
    guided call, which counts 2. batch_size is the sampler's batch; without it, the batch of the first call is used
    (right for an unguided model, wrong inside cfg). Heun's per-sample correction counts fractionally."""

    def __init__(self, model: Callable[..., Pred], batch_size: int | None = None):
        self.model, self.batch_size, self.rows, self.calls = model, batch_size, 0, 0

    def __call__(self, x: Tensor, t: Tensor, *args, **kwargs) -> Pred:
        if self.batch_size is None:
            self.batch_size = len(x)
        self.rows += len(x)
        self.calls += 1
        return self.model(x, t, *args, **kwargs)

    @property
    def nfe(self) -> float:
        return self.rows / self.batch_size if self.batch_size else 0.0

    def reset(self) -> None:
        self.rows, self.calls = 0, 0


def model_device(model: object) -> torch.device:
    """The device of a model's first parameter; the CPU for a model without parameters (a function)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        p = next(iter(params()), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def generate(model: Callable[..., Pred], process: AffineProcess, shape: tuple[int, ...], sampler: str = "dpmpp2m",
             steps: int = 32, generator: torch.Generator | None = None, cond: Cond | None = None,
             ts: Tensor | None = None, device: torch.device | str | None = None, return_path: bool = False) -> Tensor:
    """Draw x_1 from the prior and solve to t = 0: `generate(teacher, teacher.process, (1000, 2), "ddim", 8)`.

    model(x, t, cond) -> Pred; cond (a conditioning.Cond, e.g. conditioning.labels(y, num_classes)) conditions every
    call. ts defaults to
    grids.default_grid(steps, process). device defaults to the model's (`model_device`). The prior noise is drawn
    with `generator` on its device (the CPU by default) and moved, so one seed gives the same samples on every
    device; the generator also drives the fresh noise of stochastic samplers (tcd, consistency).
    """
    run = get_sampler(sampler)
    device = model_device(model) if device is None else device
    x1 = process.prior(shape, generator=generator, device=device)
    cond = None if cond is None else cond.to(device)
    return run(model, x1, default_grid(steps, process) if ts is None else ts, process, return_path=return_path,
               generator=generator, cond=cond)
