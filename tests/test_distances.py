"""course_lib.distances: the one registry of the distances that distillation losses use, each (B, ...) x (B, ...)
-> (B,), checked against its paper's formula; every method reaches every distance by name."""
from __future__ import annotations

import math

import pytest
import torch

from course_lib import distances
from course_lib.distill import consistency as cm, dmd, lcm, tcd


def _pair(shape=(3, 2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_lcm_huber_is_elementwise_and_ict_pseudo_huber_is_per_sample():
    a, b = _pair()
    c = distances.LCM_HUBER_C
    torch.testing.assert_close(distances.huber(a, b), (torch.sqrt((a - b) ** 2 + c * c) - c).flatten(1).mean(1))
    D = a[0].numel()
    ci = distances.ICT_HUBER_C * math.sqrt(D)         # the paper's form, divided by sqrt(D)
    torch.testing.assert_close(distances.pseudo_huber(a, b),
                               (torch.sqrt(((a - b) ** 2).flatten(1).sum(1) + ci * ci) - ci) / math.sqrt(D))
    # two different distances: for errors far above c, LCM's is the mean |a - b|, iCT's the RMS error
    big = 100 * (a - b)
    torch.testing.assert_close(distances.huber(big, 0 * big), big.abs().flatten(1).mean(1), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(distances.pseudo_huber(big, 0 * big), big.pow(2).flatten(1).mean(1).sqrt(),
                               rtol=1e-6, atol=1e-3)


def test_the_registry_serves_every_method():
    a, b = _pair()
    for name in ("l2", "pseudo-huber", "huber", "lap1"):
        d = distances.get(name)
        assert d is distances.DISTANCES[name] and d(a, b).shape == (3,) and torch.all(d(a, a) == 0)
    assert distances.get(distances.l2) is distances.l2             # a function passes through unchanged
    # the same function wherever a method looks it up: no second copy of a distance in a method module
    for module in (cm, tcd, lcm, dmd):
        assert not hasattr(module, "DISTANCES") and not hasattr(module, "l2") and not hasattr(module, "huber")
    with pytest.raises(ValueError, match="unknown regression distance 'x'; valid: l2, pseudo-huber, huber, lap1"):
        distances.get("x", "regression distance")
