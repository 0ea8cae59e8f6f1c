"""Affine Gaussian noising processes, with one time convention for the whole course.

    x_t = alpha(t) * x0 + sigma(t) * eps,     eps ~ N(0, I),     t in [0, 1]

t = 0 is data and t = 1 is noise (the diffusers convention). Every process here is a pair of
scalar functions (alpha, sigma); samplers, losses and conversions only ever ask for those, their
time derivatives, and the network's time input. The rectified-flow paper runs time the other way
(t = 0 noise); notebook 03 converts once, in a callout.

    process      alpha(t)               sigma(t)               used by
    vp-cosine    cos(a t + b)           sin(a t + b)           PD, guided distillation (log-SNR in [-20, 20])
    sd           sqrt(abar(1000t - 1))  sqrt(1 - abar(...))    Stable Diffusion's scaled-linear DDPM schedule
    rf           1 - t                  t                      rectified flow / flow matching
    edm          1                      sigma_max * t          EDM / VE (Karras et al. 2022), sigma = 80 t
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def bcast(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample times (B,) so they broadcast against x (B, ...)."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype times are kept in for data of `dtype`: never below float32 (bf16 has 8 bits of mantissa, so
    timestep 749 would reach the network as 748)."""
    return torch.promote_types(dtype, torch.float32)


def as_times(t: float | Tensor, x: Tensor) -> Tensor:
    """A float or 0-d tensor becomes a (B,) tensor on x's device, in x's dtype or float32 if x is narrower
    (bf16 / fp16 data keeps float32 times)."""
    t = torch.as_tensor(t, dtype=time_dtype(x.dtype), device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


class AffineProcess:
    """x_t = alpha(t) x0 + sigma(t) eps. Subclasses define alpha and sigma (elementwise on t)."""

    name = "affine"

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        """d alpha / dt (autograd by default; subclasses give it in closed form)."""
        return _elementwise_grad(self.alpha, t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return _elementwise_grad(self.sigma, t)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2)."""
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def timestep(self, t: Tensor) -> Tensor:
        """What a backbone receives as its time input. Default 1000 t, the range diffusers' embeddings expect."""
        return 1000.0 * t

    def marginal(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Sample x_t given x0 and the noise eps; t has shape (B,)."""
        return bcast(self.alpha(t), x0) * x0 + bcast(self.sigma(t), x0) * eps

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """A sample of x_1 ~ N(0, sigma(1)^2 I), where every sampler starts (alpha(1) x0 is neglected).

        The noise is drawn on the generator's device (CPU without one) and then moved to `device`, so one seed
        gives the same x_1 on every device."""
        s1 = float(self.sigma(torch.ones((), dtype=torch.float64)))
        g_device = generator.device if generator is not None else "cpu"
        return s1 * torch.randn(shape, generator=generator, dtype=dtype, device=g_device).to(device)

    def config(self) -> dict:
        """JSON-serialisable description, stored beside checkpoints; `make_process(**config)` rebuilds it."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


def _elementwise_grad(f: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    with torch.enable_grad():
        tt = t.detach().clone().requires_grad_(True)
        y = f(tt)
        if not y.requires_grad:  # f does not depend on t
            return torch.zeros_like(t)
        (g,) = torch.autograd.grad(y.sum(), tt)
    return g.to(t.dtype)


class VPCosine(AffineProcess):
    """Variance-preserving cosine schedule in the log-SNR form of Salimans & Ho (2022), Sec. 2:
    lambda(t) = -2 log tan(a t + b), clipped to [lambda_min, lambda_max]; alpha = cos(a t + b), sigma = sin(a t + b)."""

    name = "vp-cosine"

    def __init__(self, log_snr_min: float = -20.0, log_snr_max: float = 20.0):
        self.log_snr_min, self.log_snr_max = log_snr_min, log_snr_max
        self.b = math.atan(math.exp(-0.5 * log_snr_max))
        self.a = math.atan(math.exp(-0.5 * log_snr_min)) - self.b

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(self.a * t + self.b)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(self.a * t + self.b)

    def d_alpha(self, t: Tensor) -> Tensor:
        return -self.a * torch.sin(self.a * t + self.b)

    def d_sigma(self, t: Tensor) -> Tensor:
        return self.a * torch.cos(self.a * t + self.b)

    def log_snr(self, t: Tensor) -> Tensor:
        return -2.0 * torch.log(torch.tan(self.a * t + self.b))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of log_snr: t = (arctan(exp(-lambda/2)) - b) / a."""
        return (torch.atan(torch.exp(-0.5 * lam)) - self.b) / self.a

    def config(self) -> dict:
        return {"name": self.name, "log_snr_min": self.log_snr_min, "log_snr_max": self.log_snr_max}


class RectifiedFlow(AffineProcess):
    """Straight interpolation x_t = (1 - t) x0 + t eps (Liu et al. 2022; Lipman et al. 2023), velocity eps - x0.

    timestep_map names the backbone's time input: "1000t" (the course default, 1000 t), or "sd" (1000 t - 1,
    Stable Diffusion's own map, SDDiscrete.timestep: a UNet from SD read as a flow, InstaFlow, sees t = 1 (pure
    noise) as timestep 999, where SD's weights saw pure noise)."""

    name = "rf"
    TIMESTEP_MAPS = ("1000t", "sd")

    def __init__(self, timestep_map: str = "1000t"):
        if timestep_map not in self.TIMESTEP_MAPS:
            raise ValueError(f"unknown timestep_map {timestep_map!r}; valid: {', '.join(self.TIMESTEP_MAPS)}")
        self.timestep_map = timestep_map

    def timestep(self, t: Tensor) -> Tensor:
        return 1000.0 * t - 1.0 if self.timestep_map == "sd" else 1000.0 * t

    def config(self) -> dict:
        return {"name": self.name} if self.timestep_map == "1000t" else {"name": self.name,
                                                                          "timestep_map": self.timestep_map}

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class EDM(AffineProcess):
    """Variance-exploding EDM process (Karras et al. 2022): x_sigma = x0 + sigma eps, with sigma = sigma_max t."""

    name = "edm"

    def __init__(self, sigma_max: float = 80.0, sigma_data: float = 0.5):
        self.sigma_max, self.sigma_data = sigma_max, sigma_data

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_max * t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self.sigma_max)

    def timestep(self, t: Tensor) -> Tensor:
        """EDM's c_noise = log(sigma) / 4, shifted to stay finite at t = 0."""
        return 0.25 * torch.log(self.sigma(t).clamp_min(1e-4))

    def config(self) -> dict:
        return {"name": self.name, "sigma_max": self.sigma_max, "sigma_data": self.sigma_data}


class SDDiscrete(AffineProcess):
    """A discrete DDPM schedule; by default Stable Diffusion's ("scaled_linear": sqrt(beta) linear from
    sqrt(0.00085) to sqrt(0.012), 1000 steps; abar_i = prod_{j<=i} (1 - beta_j)). beta_schedule="linear" with
    beta_start=1e-4, beta_end=0.02 is DDPM's own (Ho et al. 2020), used by google/ddpm-cifar10-32.

    Discrete timestep i in {0..999} sits at t = (i + 1) / 1000; t = 0 is the clean image (abar = 1).
    Between grid points, log abar is interpolated linearly, so continuous-time samplers also work.
    The network's time input is the (fractional) timestep index 1000 t - 1, as diffusers' UNets expect.
    """

    name = "sd"

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                 beta_schedule: str = "scaled_linear"):
        self.beta_start, self.beta_end, self.T, self.beta_schedule = beta_start, beta_end, num_train_timesteps, beta_schedule
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: scaled_linear, linear")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # abar_i, i = 0..T-1 (float64)
        # log abar at tau = -1, 0, ..., T-1 (tau = -1 is the clean image)
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])

    def _log_abar_at(self, t: Tensor) -> Tensor:
        tau = (t.to(torch.float64) * self.T).clamp(0, self.T)  # tau + 1, in [0, T]
        i0 = tau.floor().clamp(max=self.T - 1)
        frac = tau - i0
        table = self._log_abar.to(t.device)
        i0l = i0.long()
        return table[i0l] * (1 - frac) + table[i0l + 1] * frac

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self._log_abar_at(t)).to(t.dtype)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self._log_abar_at(t))).to(t.dtype)

    def timestep(self, t: Tensor) -> Tensor:
        return self.T * t - 1.0

    def t_of_timestep(self, timesteps: Tensor) -> Tensor:
        """Discrete diffusers timestep i -> course time t = (i + 1) / T."""
        return (timesteps.to(torch.float64) + 1.0) / self.T

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of log_snr on the interpolated schedule: log abar = log sigmoid(lambda) (abar = alpha^2, the SNR
        abar / (1 - abar)), then t from the piecewise-linear log abar table (exact between grid points). float64;
        clamped to [0, 1] (lambda above the first grid point's lands between t = 0 and 1 / T, below the last at 1)."""
        log_abar = torch.nn.functional.logsigmoid(lam.to(torch.float64))
        table = self._log_abar.to(lam.device)                                 # decreasing, T + 1 entries
        j = torch.searchsorted(-table, -log_abar).clamp(1, self.T)            # table[j - 1] >= log_abar > table[j]
        lo, hi = table[j - 1], table[j]
        frac = ((lo - log_abar) / (lo - hi)).clamp(0.0, 1.0)
        return ((j - 1).to(torch.float64) + frac) / self.T

    def config(self) -> dict:
        return {"name": self.name, "beta_start": self.beta_start, "beta_end": self.beta_end,
                "num_train_timesteps": self.T, "beta_schedule": self.beta_schedule}


PROCESSES: dict[str, type[AffineProcess]] = {
    "vp-cosine": VPCosine, "sd": SDDiscrete, "rf": RectifiedFlow, "edm": EDM,
}


def make_process(name: str, **kwargs) -> AffineProcess:
    """Build a process by name: make_process("rf"), make_process("vp-cosine", log_snr_min=-15)."""
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; valid processes: {', '.join(PROCESSES)}")
    return PROCESSES[name](**kwargs)
