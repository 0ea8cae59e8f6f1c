"""Time grids: pure functions returning n + 1 decreasing times, from the start time to the end time.

Length contract: `grid(n, ...)` has n + 1 entries for n sampler steps; entry 0 is where sampling starts
(usually t = 1, pure noise) and entry n is where it ends (t = 0, data). Values are float64 tensors.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .processes import AffineProcess, EDM, SDDiscrete, VPCosine


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a time grid needs n >= 1 steps (an int); got {n!r}")


def uniform(n: int, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """n equal steps in t from t_start down to t_end."""
    _check_n(n)
    return torch.linspace(t_start, t_end, n + 1, dtype=torch.float64)


def log_snr_uniform(n: int, process: VPCosine, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """Steps equally spaced in log-SNR lambda (Lu et al. 2022's choice for DPM-Solver); ends exactly at t_end."""
    _check_n(n)
    lam0 = process.log_snr(torch.tensor(t_start, dtype=torch.float64))
    lam1 = process.log_snr(torch.tensor(max(t_end, 1e-6), dtype=torch.float64))
    ts = process.t_from_log_snr(torch.linspace(float(lam0), float(lam1), n + 1, dtype=torch.float64))
    ts[0], ts[-1] = t_start, t_end
    return ts


def karras(n: int, process: EDM, sigma_min: float = 0.002, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022), Eq. 5: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho for
    i < n, then sigma_n = 0; returned as times t = sigma / sigma_max. For n = 1 the grid is [1, 0]."""
    _check_n(n)
    s_max = process.sigma_max
    if n == 1:
        return torch.tensor([1.0, 0.0], dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    sig = (s_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return torch.cat([sig / s_max, torch.zeros(1, dtype=torch.float64)])


def sd_timesteps(n: int, spacing: str = "leading", num_train_timesteps: int = 1000, steps_offset: int = 0) -> Tensor:
    """The integer timesteps diffusers' schedulers visit for n steps (no final 0 -> clean step).

    spacing: "leading" and "trailing" as DDIMScheduler defines them ("trailing" starts at T-1; Lin et al. 2024),
    "linspace" as DPMSolverMultistepScheduler defines it (DDIMScheduler's own "linspace" differs).
    """
    _check_n(n)
    T = num_train_timesteps
    if n > T:
        raise ValueError(f"{n} steps cannot be placed on {T} discrete timesteps")
    # numpy, exactly as diffusers computes them: torch's arange/linspace differ in the last bit, which flips
    # the rounding of values that land on x.5
    if spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    else:
        raise ValueError(f"unknown spacing {spacing!r}; valid: leading, trailing, linspace")
    return torch.from_numpy(ts.astype(np.float64).copy())


def sd_grid(n: int, process: SDDiscrete, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
    """`sd_timesteps` as course times t = (i + 1) / T, followed by t = 0 (the clean image)."""
    ts = process.t_of_timestep(sd_timesteps(n, spacing, process.T, steps_offset))
    return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])


def flow_match_grid(n: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """diffusers' FlowMatchEulerDiscreteScheduler grid: n times evenly from 1 to shift(1/T), passed through
    shift(t) = shift t / (1 + (shift - 1) t) (SD3's resolution shift), then the final 0."""
    _check_n(n)
    shifted = lambda t: shift * t / (1 + (shift - 1) * t)
    t_min = shifted(1.0 / num_train_timesteps)  # diffusers spaces down to the already shifted smallest sigma...
    t = shifted(torch.linspace(1.0, t_min, n, dtype=torch.float64))  # ...then shifts again
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def trailing(n: int, t_first: float = 1.0) -> Tensor:
    """A few-step generator's grid: t_first (1 - i/n) for i = 0..n-1, then the final 0 (for t_first = 1, SD's
    trailing timesteps 999, 749, 499, 249 for n = 4: ADD's T_student, DMD2's `denoising_step_list`). Its values are
    exactly the Python floats t_first * (1 - i / n)."""
    _check_n(n)
    if not 0.0 < t_first <= 1.0:
        raise ValueError(f"t_first must be in (0, 1]; got {t_first}")
    return torch.tensor([t_first * (1.0 - i / n) for i in range(n)] + [0.0], dtype=torch.float64)


# --- diffusers' integer timesteps (int64 grids, decreasing; samplers take them for an SDDiscrete process) ------------

def skipping_step(original_steps: int = 50, T: int = 1000) -> int:
    """LCM's skipping step k = T // N (20 for N = 50)."""
    if not 1 <= original_steps <= T:
        raise ValueError(f"the DDIM grid needs 1 <= N <= T = {T} points; got N = {original_steps}")
    return T // original_steps


def ddim_timesteps(original_steps: int = 50, T: int = 1000) -> Tensor:
    """LCM's training grid tau_i = i k - 1, i = 1..N (increasing), int64 (N,)."""
    k = skipping_step(original_steps, T)
    return torch.arange(1, original_steps + 1, dtype=torch.int64) * k - 1


def lcm_timesteps(n: int, original_steps: int = 50, T: int = 1000, end: int | None = None) -> Tensor:
    """The n timesteps diffusers' LCMScheduler.set_timesteps(n) (and TCDScheduler's) visits: evenly spaced entries
    (floor of linspace(0, N, n, endpoint=False)) of the reversed training grid. int64 (n,), decreasing: n = 4 gives
    999, 759, 499, 259. end: an end timestep appended (the length contract n + 1 of a sampler's grid): -1 is the
    clean sample (t = 0; LCM), 0 is diffusers' last previous timestep (TCD)."""
    if not 1 <= n <= original_steps:
        raise ValueError(f"LCM samples 1 to {original_steps} steps (a subset of its training grid); got {n}")
    grid = ddim_timesteps(original_steps, T).flip(0)
    idx = np.floor(np.linspace(0, original_steps, num=n, endpoint=False)).astype(np.int64)
    taus = grid[torch.from_numpy(idx)]
    return taus if end is None else torch.cat([taus, torch.tensor([end], dtype=torch.int64)])


def default_grid(n: int, process: AffineProcess) -> Tensor:
    """The grid the course uses unless told otherwise: Karras for EDM, SD's trailing spacing for the
    discrete SD schedule, uniform in t for the cosine and rectified-flow processes."""
    if isinstance(process, EDM):
        return karras(n, process)
    if isinstance(process, SDDiscrete):
        return sd_grid(n, process, "trailing")
    return uniform(n)
