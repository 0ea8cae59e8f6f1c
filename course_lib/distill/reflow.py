"""Rectified flow and reflow (Liu, Gong & Liu, "Flow Straight and Fast", ICLR 2023, arXiv 2209.03003).

Time direction. The paper runs time from noise to data: X_0 ~ N(0, I) at t = 0, data X_1 at t = 1, and
X_t = t X_1 + (1 - t) X_0 with velocity X_1 - X_0. The course runs it the other way (t = 0 data, t = 1 noise):

    x_t = (1 - t) x0 + t eps,      velocity u = dx_t/dt = eps - x0,      paper t  <->  course 1 - t

so the paper's X_0 is our eps, its X_1 our x0, and its v = X_1 - X_0 is minus our u. Samplers integrate from
t = 1 down to t = 0 (`samplers.euler` with `grids.uniform(n)`).

    rf_loss_at(model, x0, eps, t)       || u_theta(x_t, t) - (eps - x0) ||^2 per sample       Eq. (1)
    rf_loss(model, x0, g, eps=None)     1-RF (independent eps, Eq. 1) or reflow (the coupled eps, Alg. 1)
    generate_pairs(flow, x1, ...)       (eps, x0 = ODE solution from eps): the flow's coupling Z = (Z_0, Z_1)
    cached_pairs(flow, name, ...)       the same, stored as safetensors + JSON, refused if made by another flow
    distill_reflow(flow, data, cfg, run=) (k+1)-rectified flow, initialised from the k-rectified flow (Alg. 1)
    straightness(model, x1, steps)      S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt     (metrics.straightness)
    distill_loss_at / distill_kstep     k-step distillation of a flow into k Euler steps (the paper's distillation)
    RFView(diffusion model)             a vp-cosine diffusion model read in rectified-flow time (its ODE, exactly)

The course's runs of these (the 2D recipe, the shipped digits flows) are in recipes/reflow.py.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .. import paths
from ..checkpoint import CheckpointError, atomic_write, load_tensors
from ..conditioning import BATCHED, Cond
from ..grids import uniform
from ..metrics import straightness as s_of_path
from ..models import Denoiser, build_denoiser
from ..predictions import velocity
from ..processes import AffineProcess, RectifiedFlow, SDDiscrete, VPCosine, bcast
from ..samplers import euler, get_sampler
from ..train import Trained, TrainConfig, train


CACHE_DIR = paths.cache_dir() / "reflow"   # $COURSE_CACHE, the checkout's data/cache (git-ignored), or ~/.cache


class PairCacheError(RuntimeError):
    """A cache of reflow pairs does not belong to the flow asking for it; the message names the file."""


def _fields(cond: Cond | None) -> dict[str, Tensor]:
    """The per-sample tensors of a Cond by field name (what a pair cache hashes and stores)."""
    return {} if cond is None else {k: getattr(cond, k) for k in BATCHED if getattr(cond, k) is not None}


# ----------------------------------------------------------------------------------------------------------------
# 1. The rectified-flow loss (Liu et al. 2022, Eq. 1; Algorithm 1)
# ----------------------------------------------------------------------------------------------------------------

def rf_loss_at(model: Callable, x0: Tensor, eps: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
    """Per-sample rectified-flow loss (B,) on a coupling (x0, eps) at times t (B,):

        x_t = (1 - t) x0 + t eps,      L = || u_theta(x_t, t) - (eps - x0) ||^2    (mean over dimensions)

    The paper's Eq. (1), min_v int_0^1 E || (X_1 - X_0) - v(X_t, t) ||^2 dt, in the course's time direction.
    model(x, t, cond) -> Pred; its velocity is read with `predictions.velocity` under the rf process, so any
    course model works (a velocity-parameterized Denoiser gives back its raw output)."""
    process = RectifiedFlow()
    x_t = process.marginal(x0, t, eps)
    u = velocity(model(x_t, t, cond), t, process)
    return (u - (eps - x0)).pow(2).flatten(1).mean(1)


def rf_loss(model: Callable, x0: Tensor, generator: torch.Generator, eps: Tensor | None = None,
            cond: Cond | None = None, t_min: float = 1e-3) -> Tensor:
    """t ~ U(t_min, 1). eps None: fresh noise, independent of x0 (1-rectified flow from the independent coupling);
    eps given: the paired noise of a reflow coupling (x0 = ODE(eps)), which makes this the reflow loss."""
    B = x0.shape[0]
    t = t_min + (1 - t_min) * torch.rand(B, generator=generator, device=generator.device).to(x0)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
    return rf_loss_at(model, x0, eps, t, cond)


# ----------------------------------------------------------------------------------------------------------------
# 2. Pairs: the coupling a flow induces, Z_1 = ODE(Z_0) (Algorithm 1, step 2)
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_pairs(flow: Callable, x1: Tensor, steps: int = 64, sampler: str = "euler",
                   process: AffineProcess | None = None, cond: Cond | None = None,
                   batch_size: int = 4096, progress: bool = False, ts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Solve the flow's ODE from each noise x1 (N, ...) at t = 1 to t = 0, in batches: returns (eps, x0).

    process: the flow's process (default flow.process); the sampler ("euler", "heun", "dpmpp2m", "ddim") runs on
    grid ts (default uniform(steps)). cond: the conditioning of the N samples (a Cond), sliced with the batch."""
    process = process if process is not None else flow.process
    run = get_sampler(sampler)
    grid = uniform(steps) if ts is None else ts
    out = []
    starts = range(0, len(x1), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"pairs ({sampler}, {steps} steps)", mininterval=0.5)
    for i in starts:
        c = None if cond is None else cond[i:i + batch_size]
        out.append(run(flow, x1[i:i + batch_size], grid, process, cond=c))
    return x1, torch.cat(out)


def fingerprint(model: nn.Module) -> str:
    """sha256 of a model's config and the bytes of every tensor of its state_dict (names included)."""
    h = hashlib.sha256()
    if hasattr(model, "config"):
        h.update(json.dumps(model.config(), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def cached_pairs(flow: nn.Module, name: str, n: int, steps: int = 64, sampler: str = "euler", seed: int = 0,
                 cache_dir: str | os.PathLike = CACHE_DIR, cond: Cond | None = None,
                 noise_shape: tuple[int, ...] | None = None, on_mismatch: str = "error",
                 progress: bool = True, verbose: bool = True) -> tuple[Tensor, Tensor]:
    """Reflow pairs (eps (n, ...), x0 (n, ...)) of `flow`, generated once and cached on disk.

    File: <cache_dir (default data/cache/reflow)>/<name>-<sampler><steps>-n<n>-seed<seed>.safetensors (+ .json).
    The JSON records the flow's `fingerprint`, the solver, the steps, the seed, n and a hash of the conditioning
    (e.g. labels); a cache is reused only if all of them match. A file with
    the same settings made by ANOTHER flow is never reused: on_mismatch="error" raises PairCacheError naming the
    file and how to regenerate it; "regenerate" says so and overwrites it. eps = N(0, I) draws from
    torch.Generator().manual_seed(seed), shape (n, *noise_shape) (default: the flow's data shape (2,)), on CPU, so
    the pairs are the same on every device; they are returned on the flow's device."""
    from safetensors.torch import load_file, save_file

    if on_mismatch not in ("error", "regenerate"):
        raise ValueError(f"on_mismatch must be 'error' or 'regenerate'; got {on_mismatch!r}")
    folder = Path(cache_dir)
    stem = f"{name}-{sampler}{steps}-n{n}-seed{seed}"
    wpath, jpath = folder / f"{stem}.safetensors", folder / f"{stem}.json"     # (a name may contain dots)
    device = next(flow.parameters()).device                  # pairs come back on the flow's device, stored on CPU
    meta = {"fingerprint": fingerprint(flow), "sampler": sampler, "steps": steps, "seed": seed, "n": n,
            "cond": {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
                     for k, v in sorted(_fields(cond).items())}}
    if wpath.exists() and jpath.exists():
        try:
            stored = json.loads(jpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            stored = {}
        diff = [k for k in meta if stored.get(k) != meta[k]]
        if not diff:
            t = load_file(str(wpath))
            if verbose:
                print(f"reflow pairs: loaded {n} cached pairs from {wpath}")
            return t["eps"].to(device), t["x0"].to(device)
        other = ", ".join(f"{k}: {stored.get(k)!r} != {meta[k]!r}" for k in diff if k != "fingerprint")
        what = ("was generated by another flow (its weights or config differ from this one's)" if diff == ["fingerprint"]
                else f"was generated with other settings ({other})")
        msg = (f"reflow pair cache {wpath} {what}; it is never reused for another flow. To regenerate it, delete "
               f"{wpath} and {jpath.name} (or pass on_mismatch='regenerate', or another name).")
        if on_mismatch == "error":
            raise PairCacheError(msg)
        print(f"{msg}\nRegenerating.")
    shape = tuple(noise_shape) if noise_shape is not None else (2,)
    x1 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)   # same noise on any device
    t0 = time.perf_counter()
    eps, x0 = generate_pairs(flow, x1, steps, sampler, cond=cond, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"eps": eps.cpu().contiguous(), "x0": x0.cpu().contiguous(),
               **{f"cond.{k}": v.detach().cpu().contiguous() for k, v in _fields(cond).items()}}
    atomic_write(wpath, lambda tmp: save_file(tensors, str(tmp)))      # a killed run never leaves half a cache
    jpath.write_text(json.dumps({**meta, "seconds": round(time.perf_counter() - t0, 2)}, indent=1))
    if verbose:
        print(f"reflow pairs: generated {n} pairs in {time.perf_counter() - t0:.1f} s, cached in {wpath}")
    return eps, x0


# ----------------------------------------------------------------------------------------------------------------
# 3. Reflow: train the (k+1)-rectified flow on the k-th flow's pairs, starting from its weights (Algorithm 1)
# ----------------------------------------------------------------------------------------------------------------

def pair_batches(eps: Tensor, x0: Tensor, cond: Cond | None = None
                 ) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor, Cond | None]]:
    """sample_batch(n, g) for the training loop: n random rows (with replacement) of the pairs, drawn with g."""
    if eps.shape != x0.shape:
        raise ValueError(f"pairs must have the same shape; got eps {tuple(eps.shape)} and x0 {tuple(x0.shape)}")

    def sample(n: int, g: torch.Generator):
        i = torch.randint(len(x0), (n,), generator=g, device=g.device).cpu()
        return eps[i], x0[i], None if cond is None else cond[i]

    return sample


def load_flow_weights(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Load the weights saved in `folder` (models.save_denoiser / teachers) into `model`, in place.

    A checkpoint written for another architecture raises CheckpointError naming the folder, never a half load."""
    tensors, config = load_tensors(folder)
    if "denoiser" in config and hasattr(model, "config") and config["denoiser"]["net"] != model.config()["net"]:
        raise CheckpointError(f"checkpoint {folder} holds a {config['denoiser']['arch']} with {config['denoiser']['net']}, "
                              f"but the flow to reflow is {model.config()['arch']} with {model.config()['net']}. "
                              "Reflow starts from the previous flow's own weights: pass that flow's folder.")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"the weights in {folder} do not match the flow to reflow ({str(e).splitlines()[0]}). "
                              "Reflow starts from the previous flow's own weights: pass that flow's folder.") from e
    return model


def as_flow(model: Denoiser) -> Denoiser:
    """A copy of `model` relabelled as a rectified flow (process "rf", parameterization "velocity"), same weights.

    For a flow this is a plain copy. For a diffusion model (InstaFlow's initialisation, Liu et al. 2023) the
    backbone's output is re-purposed as the velocity: a starting point for reflow training, not yet a flow."""
    cfg = model.config()
    cfg.update(process={"name": "rf"}, parameterization="velocity")
    flow = build_denoiser(cfg)
    flow.load_state_dict(model.state_dict())
    return flow.to(next(model.parameters()).device)


def split_pairs(data: tuple) -> tuple[Tensor, Tensor, Cond | None]:
    """A reflow-type method's data: pairs (eps, x0) or triplets (eps, x0, cond), cond a Cond or None."""
    if len(data) not in (2, 3):
        raise ValueError(f"data is (eps, x0) or (eps, x0, cond); got a tuple of {len(data)}")
    return (*data, None) if len(data) == 2 else tuple(data)


@dataclasses.dataclass(frozen=True)
class ReflowConfig:
    """p_uncond > 0 (conditional reflow, InstaFlow): each label is replaced by its null value with that probability,
    so the new flow keeps an unconditional velocity for classifier-free guidance."""
    p_uncond: float = 0.0


def distill_reflow(flow: Denoiser | str | os.PathLike, data: tuple, cfg: ReflowConfig, *, run: TrainConfig,
                   init: Denoiser | None = None, ckpt_dir=None, accelerator=None, progress: bool = True
                   ) -> tuple[Denoiser, Trained]:
    """Train the next rectified flow on data = (eps, x0) or (eps, x0, cond) of the previous flow, initialised from
    it (Alg. 1).

    flow: the previous flow (a Denoiser, copied; never modified) or the folder of its checkpoint, in which case
    `init` gives the architecture to load it into (a mismatch is a CheckpointError). cond: the pairs' conditioning
    (a Cond, e.g. conditioning.labels(y, num_classes)). Returns (the new flow: its EMA when run.ema_decay > 0, eval,
    no grad; the engine's Trained)."""
    if not isinstance(flow, nn.Module):
        if init is None:
            raise ValueError("reflow from a checkpoint folder needs init=<a model of the same architecture>")
        flow = load_flow_weights(copy.deepcopy(init), flow)
    p_uncond = cfg.p_uncond
    eps, x0, cond = split_pairs(data)
    if not 0.0 <= p_uncond < 1.0:
        raise ValueError(f"p_uncond is a probability below 1; got {p_uncond}")
    if p_uncond > 0 and (cond is None or cond.y is None):
        raise ValueError("p_uncond > 0 drops class labels: it needs a class-conditional flow and "
                         "cond=conditioning.labels(y, num_classes)")
    student = as_flow(flow).train().requires_grad_(True)

    def loss(model, batch, g):
        e, x, c = batch
        if p_uncond > 0:
            c = c.drop(p_uncond, g)
        return rf_loss(model, x, g, eps=e, cond=c)

    done = train(student, loss, pair_batches(eps, x0, cond), run, ckpt_dir=ckpt_dir, progress=progress,
                 accelerator=accelerator,
                 extra_config={"method": "reflow", **({"p_uncond": p_uncond} if p_uncond else {})})
    return done.best().eval().requires_grad_(False), done


# ----------------------------------------------------------------------------------------------------------------
# 4. Straightness S(Z) (Liu et al. 2022: the measure of how far a flow's paths are from straight lines)
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def straightness(flow: Callable, x1: Tensor, steps: int = 64, cond: Cond | None = None,
                 process: AffineProcess | None = None) -> float:
    """S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt of the flow's ODE from noise x1 (B, ...), measured on its
    Euler path with `steps` steps (metrics.straightness; zero iff every path is a straight line at constant
    speed, then one Euler step is exact)."""
    process = process if process is not None else getattr(flow, "process", RectifiedFlow())
    ts = uniform(steps)
    return s_of_path(euler(flow, x1, ts, process, return_path=True, cond=cond), ts)


# ----------------------------------------------------------------------------------------------------------------
# 5. k-step distillation (the paper's distillation step; the official repository's reflow_t_schedule = "t0" for k = 1, integer k otherwise)
# ----------------------------------------------------------------------------------------------------------------

def distill_times(k: int, B: int, generator: torch.Generator, device=None) -> Tensor:
    """The start times of k Euler steps from t = 1, one drawn per sample: t in {1, (k-1)/k, ..., 1/k}."""
    i = torch.randint(k, (B,), generator=generator, device=generator.device)
    return (1.0 - i.double() / k).float().to(device if device is not None else generator.device)


def distill_loss_at(student: Callable, x0: Tensor, eps: Tensor, t: Tensor, cond: Cond | None = None
                    ) -> Tensor:
    """k-step distillation at grid times t (B,): the reflow loss restricted to the k Euler start times.

    For k = 1 (t = 1, x_t = eps) this is the paper's one-step distillation with the L2 distance,
        min || x0_hat - x0 ||^2,   x0_hat = eps - u_theta(eps, 1)     (paper: || Z_1 - (Z_0 + v(Z_0, 0)) ||^2).
    For general k the student is trained at t = 1, (k-1)/k, ..., 1/k on the straight line between each pair, so
    k Euler steps from eps land exactly on x0 when the regression is exact."""
    return rf_loss_at(student, x0, eps, t, cond)


@dataclasses.dataclass(frozen=True)
class KStepConfig:
    """k-step distillation: the student is trained at the k Euler start times t = 1, (k-1)/k, ..., 1/k."""
    k: int = 1


def distill_kstep(flow: Denoiser, data: tuple, cfg: KStepConfig, *, run: TrainConfig, ckpt_dir=None,
                  accelerator=None, progress: bool = True) -> tuple[Denoiser, Trained]:
    """Distil `flow` into a cfg.k-step Euler sampler on its own data = (eps, x0 = ODE_flow(eps)) or (eps, x0, cond),
    starting from it. Returns (the student, eval, no grad; the engine's Trained)."""
    k = cfg.k
    if k < 1:
        raise ValueError(f"k-step distillation needs k >= 1; got {k}")
    student = as_flow(flow).train().requires_grad_(True)
    eps, x0, cond = split_pairs(data)

    def loss(model, batch, g):
        e, x, c = batch
        return distill_loss_at(model, x, e, distill_times(k, len(x), g, x.device), c)

    done = train(student, loss, pair_batches(eps, x0, cond), run, ckpt_dir=ckpt_dir, progress=progress,
                 accelerator=accelerator, extra_config={"method": "reflow-distill", "k": k})
    return done.best().eval().requires_grad_(False), done


# ----------------------------------------------------------------------------------------------------------------
# 6. Diffusion models seen as flows
# ----------------------------------------------------------------------------------------------------------------

class RFView(nn.Module):
    """A diffusion model `model` (any affine process with alpha, sigma > 0) re-read in rectified-flow time.

    x_t^rf = (1 - t) x0 + t eps and x_tau = alpha(tau) x0 + sigma(tau) eps describe the same (x0, eps) when
    sigma(tau) / alpha(tau) = t / (1 - t); then, the process being variance preserving (alpha^2 + sigma^2 = 1),
    x_tau = x_t^rf / sqrt((1 - t)^2 + t^2). So
        rf_model(x, t) = model(x / sqrt((1 - t)^2 + t^2), tau)
    returns exactly the model's Pred(x0, eps): its probability-flow ODE in rf time. Euler on this view is DDIM
    of the diffusion model on the matching grid. For the variance-preserving processes with an inverse of the
    log-SNR: VPCosine (closed form) and SDDiscrete (Stable Diffusion's schedule, interpolated; its rf times end at
    t = sigma / (alpha + sigma) of its t = 1, below 1: `rf_time`)."""

    def __init__(self, model: Denoiser):
        super().__init__()
        if not isinstance(model.process, (VPCosine, SDDiscrete)):
            raise ValueError(f"RFView needs a vp-cosine or SD diffusion model; got process {model.process.name!r}")
        self.model, self.process = model, RectifiedFlow()

    def rf_time(self, tau: Tensor) -> Tensor:
        """The rf time t (float64) of the model's time tau: t / (1 - t) = sigma(tau) / alpha(tau) (vp_time's inverse)."""
        tau = torch.as_tensor(tau, dtype=torch.float64)
        a, s = self.model.process.alpha(tau), self.model.process.sigma(tau)
        return s / (a + s)

    def vp_time(self, t: Tensor) -> Tensor:
        """tau (float64) with the SNR of rf time t: sigma(tau) / alpha(tau) = t / (1 - t)."""
        tt = t.to(torch.float64).clamp(1e-6, 1 - 1e-6)
        return self.model.process.t_from_log_snr(2.0 * torch.log((1 - tt) / tt)).clamp(0.0, 1.0)   # same SNR

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None):
        tt = t.to(torch.float64).clamp(1e-6, 1 - 1e-6)
        scale = ((1 - tt) ** 2 + tt**2).rsqrt().to(x.dtype)
        return self.model(x * bcast(scale, x), self.vp_time(t).to(x.dtype), cond)
