"""The adversarial parts that ADD (notebook 08), DMD2 (09) and GDD (10) share: losses, the R1 penalty, a guard
against divergence, frozen feature networks with trainable heads, and the one-step generator call.

A discriminator here is what the three papers use: a FROZEN feature network F with small TRAINABLE heads D_k on
the features of several layers (StyleGAN-T, ADD Sec. 3.2; Projected GAN, GDD), summed into one logit per sample:

    D(x) = sum_k D_k(F_k(x))                                                               (B,)

Feature networks (`features` below return a list of tensors, one per tapped layer):
    `RandomFeatures2D`   2D: a small frozen MLP with random weights, the offline stand-in for DINOv2;
    `DenoiserFeatures`   images: a frozen diffusion model's own layers on re-noised inputs x_t = alpha x + sigma eps
                         (LADD, Sauer et al. 2024): no download, and the noise level is part of the discriminator;
                         with a TRAINABLE model it is DMD2's head on the fake score's bottleneck.

Losses are per sample (B,), the engine takes the mean (Goodfellow et al. 2014; Lim & Ye 2017; Mescheder et al. 2018):

    hinge:            L_D = relu(1 - D(x_real)) + relu(1 + D(x_fake)),      L_G = -D(x_fake)
    non-saturating:   L_D = softplus(-D(x_real)) + softplus(D(x_fake)),     L_G = softplus(-D(x_fake))
    R1:               R1(x_real) = ||grad_x D(x_real)||^2   (on REAL samples only; weight gamma / 2)
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning import Cond
from ..processes import AffineProcess


# --- losses --------------------------------------------------------------------------------------------------------

def hinge_d(real: Tensor, fake: Tensor) -> Tensor:
    """Hinge discriminator loss relu(1 - D(real)) + relu(1 + D(fake)), per sample (B,) from logits (B,)."""
    return F.relu(1.0 - real) + F.relu(1.0 + fake)


def hinge_g(fake: Tensor) -> Tensor:
    """Hinge generator loss -D(fake), (B,)."""
    return -fake


def ns_d(real: Tensor, fake: Tensor) -> Tensor:
    """Non-saturating (logistic) discriminator loss softplus(-D(real)) + softplus(D(fake)), (B,)."""
    return F.softplus(-real) + F.softplus(fake)


def ns_g(fake: Tensor) -> Tensor:
    """Non-saturating generator loss softplus(-D(fake)) = -log sigmoid(D(fake)), (B,)."""
    return F.softplus(-fake)


ADVERSARIAL: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "hinge": (hinge_d, hinge_g), "ns": (ns_d, ns_g)}


def adversarial(kind: str) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(discriminator loss, generator loss) of `kind`: "hinge" (ADD) or "ns" (non-saturating: DMD2, GDD)."""
    if kind not in ADVERSARIAL:
        raise ValueError(f"unknown adversarial loss {kind!r}; valid: {', '.join(ADVERSARIAL)}")
    return ADVERSARIAL[kind]


def r1_penalty(D: Callable[[Tensor], Tensor], x_real: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018, Eq. 9 without gamma / 2): ||grad_x D(x)||^2 at REAL samples, per sample (B,).
    Differentiable in D's parameters (create_graph), so adding gamma / 2 R1 to the discriminator loss penalises
    the discriminator's slope on the data. D: x (B, ...) -> logits (B,)."""
    x = x_real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1)


def math_attention() -> contextlib.AbstractContextManager:
    """A context in which scaled_dot_product_attention uses its plain ("math") kernel, the only one with a double
    backward on every device: R1 differentiates a gradient, through attention in a feature network (digits UNet)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: the default kernels
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def discriminator_loss(D: Callable[[Tensor], Tensor], x_real: Tensor, x_fake: Tensor, r1_weight: float = 0.0,
                       kind: str = "hinge") -> Tensor:
    """The discriminator's loss per sample (B,): `kind`'s loss (`adversarial`) on D(x_real) and D(sg x_fake), plus
    r1_weight R1 at the REAL samples (r1_penalty; skipped when r1_weight == 0). ADD writes the weight as gamma / 2
    (add.discriminator_loss), GDD as r1_weight (gdd.discriminator_loss). D: x (B, ...) -> logits (B,)."""
    d_loss, _ = adversarial(kind)
    out = d_loss(D(x_real), D(x_fake.detach()))
    if r1_weight > 0:
        with math_attention():
            out = out + r1_weight * r1_penalty(D, x_real)
    return out


# --- divergence ----------------------------------------------------------------------------------------------------

class GANDiverged(RuntimeError):
    """A loss became NaN/inf or exploded: training stops before the optimizer step, so the weights in memory and
    the last checkpoint on disk are the last good ones."""


def guard(loss: Tensor, name: str, step: int, max_loss: float = 1e4) -> Tensor:
    """Return `loss` (B,) unchanged, or raise GANDiverged when any value is not finite or |loss| > max_loss. Call it
    in a method step before the loss reaches the optimizer (one device sync per call)."""
    bad = ~torch.isfinite(loss)
    worst = loss.detach().abs().max() if loss.numel() else torch.zeros(())
    if bool(bad.any()) or float(worst) > max_loss:
        what = "is NaN or infinite" if bool(bad.any()) else f"exploded (|loss| = {float(worst):.3g} > {max_loss:g})"
        raise GANDiverged(
            f"the {name} loss {what} at step {step}: the GAN diverged. Training stopped before this update, so the "
            "last checkpoint (if the run has a ckpt_dir) holds the last good weights. Lower the learning rates, raise "
            "the R1 weight, or make the discriminator smaller, then rerun in a new ckpt_dir (or resume from the last "
            "checkpoint with the new settings and allow_config_change=True).")
    return loss


# --- feature networks ----------------------------------------------------------------------------------------------

class RandomFeatures2D(nn.Module):
    """A frozen random MLP for 2D points: x (B, dim) -> [h_1, ..., h_depth], each (B, width). Its weights are drawn
    once from `seed` and never trained (a stand-in for a pretrained feature network, which 2D data has not); the
    first layer scales x by `scales` so that several resolutions of the plane are seen. Saved with its config."""

    def __init__(self, dim: int = 2, width: int = 64, depth: int = 3, scales: Sequence[float] = (1.0, 3.0),
                 seed: int = 0):
        super().__init__()
        self.kwargs = dict(dim=dim, width=width, depth=depth, scales=[float(s) for s in scales], seed=seed)
        g = torch.Generator().manual_seed(seed)
        self.scales = [float(s) for s in scales]
        self.layers = nn.ModuleList()
        d_in = dim * len(self.scales)
        for _ in range(depth):
            layer = nn.Linear(d_in, width)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(width, d_in, generator=g) * math.sqrt(2.0 / d_in))
                layer.bias.copy_(torch.rand(width, generator=g) * 2 - 1)
            self.layers.append(layer)
            d_in = width
        self.requires_grad_(False)

    def config(self) -> dict:
        return dict(self.kwargs)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = torch.cat([s * x for s in self.scales], dim=1)
        out = []
        for layer in self.layers:
            h = F.silu(layer(h))
            out.append(h)
        return out


@contextlib.contextmanager
def tapped(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of the named submodules of `module` during the calls made inside the block:
    {name: output tensor} (the first tensor when a module returns a tuple, as diffusers' down blocks do)."""
    found = dict(module.named_modules())
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"no submodule named {missing} in {type(module).__name__}; some names it has: "
                         f"{[n for n in found if n.count('.') <= 3][:12]}")
    out: dict[str, Tensor] = {}

    def hook(name: str):
        def record(_m, _inp, output):
            out[name] = output[0] if isinstance(output, (tuple, list)) else output
        return record

    handles = [found[n].register_forward_hook(hook(n)) for n in names]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def default_taps(model: nn.Module) -> list[str]:
    """The layers a discriminator reads from a course model: for a UNet backbone its down blocks after the first
    and its mid block (the bottleneck, DMD2's choice); for the 2D MLP its hidden layers' linear maps."""
    names = dict(model.named_modules())
    unet = next((p for p in ("net.unet", "unet", "net") if f"{p}.mid_block" in names), None)
    if unet is not None:
        downs = sorted({n.split(".down_blocks.")[1].split(".")[0] for n in names if f"{unet}.down_blocks." in n}, key=int)
        return [f"{unet}.down_blocks.{i}" for i in downs[1:]] + [f"{unet}.mid_block"]
    layers = [n for n in names if n.startswith("net.layers.") and n.count(".") == 2]
    if layers:
        return layers
    raise ValueError(f"no default feature layers for {type(model).__name__}: pass taps= (submodule names)")


class DenoiserFeatures(nn.Module):
    """Features of a course diffusion model on re-noised inputs (LADD, Sauer et al. 2024, Sec. 3):

        t ~ U(t_lo, t_hi),  x_t = alpha_t x + sigma_t eps,  features = outputs of the `taps` layers of model(x_t, t)

    The model is frozen (ADD/LADD: the teacher) unless it is trained elsewhere (DMD2: the fake score, whose encoder
    the GAN gradients also train). forward(x, cond=None, generator=None) -> list of (B, ...) tensors; gradients flow to
    x. t and eps are drawn from `generator` (on its device) when given, else from torch's global generator.

    shared=True keeps the model out of this module's parameters and state dict: for a model that another module
    already owns (DMD2's critic holds the fake score once; a checkpoint must not store it twice)."""

    def __init__(self, model: nn.Module, taps: Sequence[str] | None = None, t_range: tuple[float, float] = (0.0, 1.0),
                 shared: bool = False):
        super().__init__()
        if not 0.0 <= t_range[0] <= t_range[1] <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= t_lo <= t_hi <= 1; got {t_range}")
        if shared:
            self._shared = (model,)               # a tuple: not registered as a submodule
        else:
            self.model = model
        self.t_range = tuple(float(v) for v in t_range)
        self.taps = list(taps) if taps is not None else default_taps(model)

    def __getattr__(self, name: str):
        if name == "model" and "_shared" in self.__dict__:
            return self.__dict__["_shared"][0]
        return super().__getattr__(name)

    @property
    def process(self) -> AffineProcess:
        return self.model.process

    def forward(self, x: Tensor, cond: Cond | None = None, generator: torch.Generator | None = None) -> list[Tensor]:
        dev = generator.device if generator is not None else x.device
        lo, hi = self.t_range
        t = (lo + (hi - lo) * torch.rand(len(x), generator=generator, device=dev)).to(x.device, torch.float32)
        eps = torch.randn(x.shape, generator=generator, device=dev).to(x)
        x_t = self.process.marginal(x, t.to(x.dtype), eps)
        with tapped(self.model, self.taps) as out:
            self.model(x_t, t, cond)
        return [out[n] for n in self.taps]


# --- heads and the discriminator -----------------------------------------------------------------------------------

class Head(nn.Module):
    """A trainable head on one feature tensor: (B, C) -> MLP -> logit, or (B, C, H, W) -> Conv3x3 -> GroupNorm ->
    SiLU -> Conv3x3 -> GroupNorm -> SiLU -> mean over H, W -> Linear -> logit (the shape of DMD2's cls_pred_branch,
    sized for small maps). With num_classes a projection term <embed(y), h> is added (Miyato & Koyama 2018)."""

    def __init__(self, shape: Sequence[int], hidden: int = 64, num_classes: int | None = None):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) == 1:
            self.body = nn.Sequential(nn.Linear(self.shape[0], hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        elif len(self.shape) == 3:
            groups = math.gcd(8, hidden)
            self.body = nn.Sequential(nn.Conv2d(self.shape[0], hidden, 3, padding=1), nn.GroupNorm(groups, hidden),
                                      nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(groups, hidden),
                                      nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            raise ValueError(f"a head takes (C,) or (C, H, W) features; got per-sample shape {self.shape}")
        self.out = nn.Linear(hidden, 1)
        self.embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None

    def forward(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.body(f.float())                                                     # (B, hidden)
        logit = self.out(h).squeeze(1)                                               # (B,)
        if self.embed is not None and y is not None:
            logit = logit + (self.embed(y) * h).sum(1) / math.sqrt(h.shape[1])
        return logit


class Discriminator(nn.Module):
    """D(x, y) = sum_k head_k(F_k(x)): a feature network (frozen, or the fake score's, trained elsewhere) and one
    trainable Head per feature tensor. Build with `discriminator(features, x_example)`, which sizes the heads."""

    def __init__(self, features: nn.Module, heads: nn.ModuleList):
        super().__init__()
        self.features, self.heads = features, heads

    def forward(self, x: Tensor, cond: Cond | None = None, generator: torch.Generator | None = None) -> Tensor:
        feats = (self.features(x, cond, generator) if isinstance(self.features, DenoiserFeatures)
                 else self.features(x))
        labels = None if cond is None else cond.y
        return sum(head(f, labels) for head, f in zip(self.heads, feats))


def discriminator(features: nn.Module, x_example: Tensor, hidden: int = 64, cond_example: Cond | None = None
                  ) -> Discriminator:
    """A Discriminator whose heads fit the features of `features` on x_example (B, ...) (one dry run, no grad).
    Class-conditional heads (a projection term) when cond_example holds labels: one embedding per class, their
    number the labels' null value cond_example.null_y (the model's num_classes, conditioning.labels)."""
    labelled = cond_example is not None and cond_example.y is not None
    num_classes = cond_example.null_y if labelled else None
    with torch.no_grad():
        feats = (features(x_example, cond_example) if isinstance(features, DenoiserFeatures)
                 else features(x_example))
    heads = nn.ModuleList(Head(f.shape[1:], hidden, num_classes).to(x_example.device) for f in feats)
    return Discriminator(features, heads)


def trainable_fraction(module: nn.Module) -> float:
    """The share of `module`'s parameters (by count) that have requires_grad."""
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / max(1, total)


# --- the generator -------------------------------------------------------------------------------------------------

def generate_one_step(model: Callable, z: Tensor, cond: Cond | None = None, *, t: float = 1.0) -> Tensor:
    """A diffusion model used as a one-step generator: G(z | y) = x0_hat(z, t | y) (B, ...), with z the prior sample
    at time t (t = 1: pure noise; SD's timestep 999, EDM's G(80 z, 80)); cond the condition (a Cond) or None. ADD's, DMD's and
    GDD's generators. Differentiable (no no_grad here)."""
    tt = torch.full((len(z),), float(t), device=z.device, dtype=torch.float32)
    return model(z, tt, cond).x0
