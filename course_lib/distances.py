"""The distances d(a, b) with which distillation losses compare a student's output with its target: one registry
for every method. Each takes two batches of one shape (B, ...) and returns per-sample values (B,).

    "l2"            ||a - b||^2 as a mean over the data dimensions (the course's convention for every L2 loss)
    "pseudo-huber"  iCT's (Song & Dhariwal 2024, Sec. 3.3): sqrt(||a - b||^2 + c^2 D) - c sqrt(D) with
                    c = 0.00054 per sqrt(dimension), divided here by sqrt(D): sqrt(mean (a - b)^2 + c^2) - c
    "huber"         LCM's (Luo et al. 2023; diffusers' train_lcm_distill_*.py, --huber_c 0.001): the same formula
                    taken per element, then averaged: mean sqrt((a - b)^2 + c^2) - c
    "lap1"          the Laplacian-pyramid L1 of images (Ling & Okada 2006; the GLO loss of Bojanowski et al. 2018),
                    the course's offline stand-in for LPIPS
    "lpips"         LPIPS (Zhang et al. 2018), when the `lpips` package and its downloaded weights load

get(name) returns the function (a callable is returned as it is), with a clear error for an unknown name.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Distance = Callable[[Tensor, Tensor], Tensor]

ICT_HUBER_C = 0.00054       # iCT's pseudo-Huber constant per sqrt(dimension) (Song & Dhariwal 2024, Sec. 3.3)
LCM_HUBER_C = 0.001         # LCM's Huber constant (--huber_c)


def l2(a: Tensor, b: Tensor) -> Tensor:
    """||a - b||^2 as a per-sample mean over the data dimensions: (B,)."""
    return (a - b).pow(2).flatten(1).mean(1)


def pseudo_huber(a: Tensor, b: Tensor, c: float = ICT_HUBER_C) -> Tensor:
    """iCT's pseudo-Huber distance sqrt(||a - b||^2 + c^2 D) - c sqrt(D), divided by sqrt(D) (D data dimensions):
    sqrt(mean (a - b)^2 + c^2) - c, per sample (B,). Like the L2 norm (not squared) for errors well above c: large
    errors weigh less than in the squared L2, so outliers pull less."""
    return torch.sqrt((a - b).pow(2).flatten(1).mean(1) + c * c) - c


def huber(a: Tensor, b: Tensor, c: float = LCM_HUBER_C) -> Tensor:
    """LCM's Huber distance per sample (B,): mean over elements of sqrt((a - b)^2 + c^2) - c."""
    return (torch.sqrt((a - b).pow(2) + c * c) - c).flatten(1).mean(1)


def laplacian_pyramid_l1(a: Tensor, b: Tensor, levels: int = 3) -> Tensor:
    """Lap1 (B,) of images (B, C, H, W): sum over pyramid levels j of 2^(-j) * mean |L_j(a) - L_j(b)|, with L_j the
    band-pass (Laplacian) levels from 2x2 average pooling and nearest upsampling, and the low-pass residual last.

    An offline stand-in for LPIPS: it compares edges and strokes at each scale rather than raw pixels, and its
    L1 prefers a sharp median to the blurred mean that L2 regression favours where the target is uncertain."""
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"laplacian_pyramid_l1 takes two image batches (B, C, H, W) of one shape; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    total = a.new_zeros(a.shape[0])
    for j in range(levels):
        if min(a.shape[-2:]) < 2:
            break
        a_low, b_low = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        band_a = a - F.interpolate(a_low, size=a.shape[-2:], mode="nearest")
        band_b = b - F.interpolate(b_low, size=b.shape[-2:], mode="nearest")
        total = total + 2.0 ** (-j) * (band_a - band_b).abs().flatten(1).mean(1)
        a, b = a_low, b_low
    return total + 2.0 ** (-levels) * (a - b).abs().flatten(1).mean(1)


def lpips_distance(net: str = "alex") -> Distance:
    """LPIPS (Zhang et al. 2018) from the `lpips` package, for images in [-1, 1] (grey images are repeated to RGB).

    Raises RuntimeError saying what is missing when the package or its pretrained weights cannot be loaded (they
    are downloaded on first use: not possible offline)."""
    try:
        import lpips  # type: ignore[import-not-found]
        model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
    except Exception as e:  # ImportError, or a failed download of the backbone's weights
        raise RuntimeError(f"LPIPS is not available here ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}). It needs `pip install lpips` and its "
                           "pretrained weights, downloaded on first use. Offline, use distance='lap1' "
                           "(distances.laplacian_pyramid_l1) on images, or 'pseudo-huber', iCT's choice, which also "
                           "keeps ImageNet features out of FID-like metrics.") from e

    def d(a: Tensor, b: Tensor) -> Tensor:
        rgb = lambda x: x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        return model.to(a.device)(rgb(a), rgb(b)).flatten()

    return d


DISTANCES: dict[str, Distance] = {"l2": l2, "pseudo-huber": pseudo_huber, "huber": huber,
                                  "lap1": laplacian_pyramid_l1}
NAMES = (*DISTANCES, "lpips")       # lpips is loaded on request (get), not at import


def get(name: str | Distance, what: str = "distance") -> Distance:
    """The distance called `name` (a callable is returned unchanged); `what` names it in the error."""
    if callable(name):
        return name
    if name == "lpips":
        return lpips_distance()
    if name not in DISTANCES:
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(NAMES)}")
    return DISTANCES[name]
