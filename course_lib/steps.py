"""One solver step from per-sample times t (B,) to s (B,): the atoms samplers and distillation losses are built from.

    step(model, x, t, s, process, cond=None) -> x_s       model(x, t, cond) -> Pred(x0, eps)

Shapes: x (B, ...), t and s (B,), each sample its own pair of times (consistency distillation draws one t per
sample). Nothing here uses torch.no_grad: consistency-distillation targets and reward gradients go through these
steps (wrap the call in torch.no_grad() yourself where no gradient is wanted). The conditioning `cond` (a
conditioning.Cond or None) is passed to every model call unchanged, except that Heun's second call, made only for
the samples that need it, receives the same rows of it (cond[idx]).

    step    reads like                                                  NFE
    ddim    x_s = alpha_s x0_hat + sigma_s eps_hat   (Song et al. 2021, Eq. 12, eta = 0)          1
    euler   x_s = x_t + (s - t) u(x_t, t)            (probability-flow ODE dx/dt = u)             1
    heun    Euler predictor, trapezoidal corrector   (Karras et al. 2022, Algorithm 1)            2 (1 where s = 0)
    flow_map  x_s = alpha_s x0_hat + sigma_s eps_hat, the model told its end time s (cond.s)       1

Times are kept in float32 or wider (see `processes.as_times`); the result has x's dtype.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from .conditioning import Cond, with_end_time
from .predictions import Pred, velocity
from .processes import AffineProcess, as_times, bcast, time_dtype


def _times(t: Tensor | float, x: Tensor) -> Tensor:
    """Per-sample times (B,) on x's device: a tensor keeps its dtype (raised to float32 if narrower), a float
    becomes x's dtype or float32 (`as_times`); a float or 0-d tensor is broadcast to (B,)."""
    if not isinstance(t, Tensor):
        return as_times(t, x)
    t = t.to(device=x.device, dtype=time_dtype(t.dtype if t.is_floating_point() else x.dtype))
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def ddim_step(pred: Pred, t: Tensor, s: Tensor, process: AffineProcess) -> Tensor:
    """One deterministic DDIM step t -> s (Song et al. 2021, Eq. 12, eta = 0):
    x_s = alpha_s x0_hat + sigma_s eps_hat. Shapes: pred fields (B, ...), t and s (B,). Returns pred.x0's dtype."""
    x0, eps = pred
    return (bcast(process.alpha(s), x0) * x0 + bcast(process.sigma(s), x0) * eps).to(x0.dtype)


def ddim(model: Callable[..., Pred], x: Tensor, t: Tensor, s: Tensor, process: AffineProcess,
         cond: Cond | None = None) -> Tensor:
    """DDIM from t to s: x_s = alpha_s x0_hat(x, t) + sigma_s eps_hat(x, t). One model call."""
    t, s = _times(t, x), _times(s, x)
    return ddim_step(model(x, t, cond), t, s, process).to(x.dtype)


def flow_map(model: Callable[..., Pred], x: Tensor, t: Tensor, s: Tensor, process: AffineProcess,
             cond: Cond | None = None) -> Tensor:
    """A flow-map model's jump X(x, t -> s) (models.flow_map_student): the model is called with its end time,
    cond.s = s, and its (x0_hat, eps_hat) are chosen so that one DDIM step is the jump:
    x_s = alpha_s x0_hat(x, t, s) + sigma_s eps_hat(x, t, s) (on rf: x - (t - s) u, u = eps_hat - x0_hat the average
    velocity of MeanFlow). One model call."""
    t, s = _times(t, x), _times(s, x)
    return ddim_step(model(x, t, with_end_time(cond, s)), t, s, process).to(x.dtype)


def euler(model: Callable[..., Pred], x: Tensor, t: Tensor, s: Tensor, process: AffineProcess,
         cond: Cond | None = None) -> Tensor:
    """Euler on the probability-flow ODE: x_s = x + (s - t) u(x, t), u = alpha'(t) x0_hat + sigma'(t) eps_hat.
    Exact in one step when the paths are straight lines. One model call."""
    t, s = _times(t, x), _times(s, x)
    return (x + bcast(s - t, x) * velocity(model(x, t, cond), t, process)).to(x.dtype)


def heun(model: Callable[..., Pred], x: Tensor, t: Tensor, s: Tensor, process: AffineProcess,
         cond: Cond | None = None) -> Tensor:
    """Heun's second-order step t -> s (Karras et al. 2022, Algorithm 1, with t in place of sigma):

        d   = u(x, t)                      slope at the start
        x'  = x + (s - t) d                Euler predictor
        x_s = x + (s - t) (d + u(x', s)) / 2     trapezoidal corrector, only where s != 0 (Alg. 1, line 8)

    The second model call is made only for the samples with s != 0 (none when all s are 0): 2 NFE, or 1."""
    t, s = _times(t, x), _times(s, x)
    h = bcast(s - t, x)
    d = velocity(model(x, t, cond), t, process)
    x_euler = x + h * d
    need = s != 0
    if not bool(need.any()):
        return x_euler.to(x.dtype)
    if bool(need.all()):
        d_next = velocity(model(x_euler, s, cond), s, process)
        return (x + h * 0.5 * (d + d_next)).to(x.dtype)
    idx = need.nonzero().squeeze(1)
    d_next = velocity(model(x_euler[idx], s[idx], None if cond is None else cond[idx]), s[idx], process)
    corrected = x[idx] + h[idx] * 0.5 * (d[idx] + d_next)
    return x_euler.index_put((idx,), corrected).to(x.dtype)        # out of place: gradients flow to both parts


STEPS: dict[str, Callable[..., Tensor]] = {"ddim": ddim, "euler": euler, "heun": heun}
