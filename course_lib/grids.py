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


def default_grid(n: int, process: AffineProcess) -> Tensor:
    """The grid the course uses unless told otherwise: Karras for EDM, SD's trailing spacing for the
    discrete SD schedule, uniform in t for the cosine and rectified-flow processes."""
    if isinstance(process, EDM):
        return karras(n, process)
    if isinstance(process, SDDiscrete):
        return sd_grid(n, process, "trailing")
    return uniform(n)


GRIDS = {"uniform": uniform, "log-snr": log_snr_uniform, "karras": karras, "sd": sd_grid, "flow-match": flow_match_grid}
