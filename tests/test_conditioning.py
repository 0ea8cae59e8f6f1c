"""Cond: null values, dropout, concatenation and slicing; classifier-free guidance on labels and on text."""
from __future__ import annotations

import pytest
import torch

from course_lib import guidance
from course_lib.conditioning import Cond, check, labels
from course_lib.losses import denoising_loss, denoising_loss_at
from course_lib.models import MLP2D, Denoiser
from course_lib.predictions import Pred, to_pred
from course_lib.processes import VPCosine

B, L, D = 6, 5, 8


def _text_cond(seed=0, b=B, **kw):
    g = torch.Generator().manual_seed(seed)
    return Cond(text=torch.randn(b, L, D, generator=g), pooled=torch.randn(b, D, generator=g),
                null_text=torch.randn(1, L, D, generator=g), null_pooled=torch.randn(1, D, generator=g), **kw)


# ---------------------------------------------------------------------------------------------------------------
# semantics
# ---------------------------------------------------------------------------------------------------------------

def test_null_replaces_labels_and_text_and_keeps_w_and_timestep_cond():
    w, tc = torch.linspace(0, 2, B), torch.randn(B, 4)
    labels = Cond(y=torch.arange(B) % 3, null_y=3, w=w, timestep_cond=tc)
    n = labels.null()
    assert torch.equal(n.y, torch.full((B,), 3)) and n.y.dtype == labels.y.dtype
    assert n.w is w and n.timestep_cond is tc and n.null_y == 3
    text = _text_cond(w=w)
    n = text.null()
    assert n.text.shape == (B, L, D) and n.pooled.shape == (B, D)
    assert torch.equal(n.text, text.null_text.expand(B, L, D)) and torch.equal(n.pooled, text.null_pooled.expand(B, D))
    assert n.w is w
    assert len(n) == B


def test_missing_null_and_mismatched_batches_are_clear_errors():
    with pytest.raises(ValueError, match="null_y"):
        Cond(y=torch.zeros(3, dtype=torch.long)).null()
    with pytest.raises(ValueError, match="null_text"):
        Cond(text=torch.zeros(3, L, D)).null()
    with pytest.raises(ValueError, match="one batch size"):
        Cond(y=torch.zeros(3, dtype=torch.long), text=torch.zeros(4, L, D))
    with pytest.raises(ValueError, match="batch size"):
        len(Cond(null_y=3))
    with pytest.raises(ValueError, match="same tokenizer"):
        Cond(text=torch.zeros(3, L, D), null_text=torch.zeros(1, L + 1, D)).null()


def test_cat_and_slicing_are_inverse():
    a, b = _text_cond(0, 2), _text_cond(0, 4)
    b = Cond(text=b.text, pooled=b.pooled, null_text=a.null_text, null_pooled=a.null_pooled)
    both = Cond.cat([a, b])
    assert len(both) == 6
    assert torch.equal(both[:2].text, a.text) and torch.equal(both[2:].pooled, b.pooled)
    assert torch.equal(both[3].text, b.text[1:2])                       # an int keeps the batch dimension
    assert torch.equal(both[torch.tensor([True, False] * 3)].text, both.text[::2])
    assert both[2:].null_text is a.null_text
    with pytest.raises(ValueError, match="different null_text"):
        Cond.cat([a, _text_cond(1, 2)])
    with pytest.raises(ValueError, match="different fields"):
        Cond.cat([a, Cond(text=a.text, null_text=a.null_text)])


def test_to_casts_floating_fields_only():
    c = Cond(y=torch.arange(3), null_y=5, w=torch.ones(3), text=torch.zeros(3, L, D), null_text=torch.zeros(1, L, D))
    h = c.to("cpu", torch.float16)
    assert h.y.dtype == torch.long and h.w.dtype == h.text.dtype == h.null_text.dtype == torch.float16


def test_drop_uses_one_draw_per_sample_and_nulls_whole_samples():
    c = _text_cond(3, b=2000)
    g = torch.Generator().manual_seed(0)
    d = c.drop(0.25, g)
    expected = torch.rand(2000, generator=torch.Generator().manual_seed(0)) < 0.25
    dropped_text = (d.text == c.null_text).flatten(1).all(1)
    dropped_pooled = (d.pooled == c.null_pooled).all(1)
    assert torch.equal(dropped_text, expected) and torch.equal(dropped_pooled, expected)   # the same samples
    assert torch.equal(d.text[~expected], c.text[~expected])
    # exactly one draw per sample was consumed from the generator
    assert torch.equal(torch.rand(3, generator=g), torch.rand(2001 + 2, generator=torch.Generator().manual_seed(0))[2000:])
    assert c.drop(0.0, g) is c


def test_label_dropout_draws_are_those_of_the_old_implementation():
    """Bit-identical to the label dropout the shipped teachers were trained with, so they retrain to the same
    weights: torch.rand(y.shape, generator) < p, then the null label."""
    y = torch.randint(0, 10, (513,), generator=torch.Generator().manual_seed(4))
    for seed in range(3):
        g_old, g_new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        drop = torch.rand(y.shape, generator=g_old, device=g_old.device).to(y.device) < 0.1
        old = torch.where(drop, torch.full_like(y, 10), y)
        assert torch.equal(labels(y, 10).drop(0.1, g_new).y, old)
        assert torch.equal(torch.rand(4, generator=g_old), torch.rand(4, generator=g_new))   # same state after


# ---------------------------------------------------------------------------------------------------------------
# classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------

def _xt(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, generator=g), torch.rand(b, generator=g) * 0.9 + 0.05


def _old_cfg(model, w, null_label):
    """guidance.cfg as it was before Cond, for the comparison."""
    def guided(x, t, y):
        if not isinstance(w, torch.Tensor) and w == 0:
            return model(x, t, y)
        null = torch.full_like(y, null_label)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = Pred(*(f[: len(x)] for f in out)), Pred(*(f[len(x):] for f in out))
        weight = w.to(x).reshape(-1, 1) if isinstance(w, torch.Tensor) and w.ndim else w
        return cond.mix(uncond, weight)
    return guided


@pytest.mark.parametrize("w", [0.0, 1.5, "per-sample"])
def test_cfg_with_labels_equals_the_old_formula(class_model, w):
    x, t = _xt(1)
    y = torch.arange(B) % 3
    w = torch.linspace(0, 3, B) if w == "per-sample" else w
    calls = []

    def plain(x, t, cond=None):  # a plain callable speaking the one call (notebooks, checkers, distill/*)
        calls.append(cond)
        return class_model(x, t, cond)

    with torch.no_grad():
        old = _old_cfg(lambda x, t, y: class_model(x, t, labels(y, 3)), w, 3)(x, t, y)
        for got in (guidance.cfg(plain, w)(x, t, labels(y, 3)),
                    guidance.cfg(class_model, w)(x, t, Cond(y=y, null_y=3))):
            assert torch.equal(got.x0, old.x0) and torch.equal(got.eps, old.eps)
    w0 = isinstance(w, float) and w == 0
    assert len(calls) == 1 and len(calls[0]) == (B if w0 else 2 * B)          # one batched call
    if not w0:
        assert torch.equal(calls[0].y, torch.cat([y, torch.full_like(y, 3)]))  # conditional, then the null label
        with pytest.raises(ValueError, match="null_y"):                       # a Cond must know its null label
            guidance.cfg(class_model, w)(x, t, Cond(y=y))
    with pytest.raises(TypeError, match="conditioning.labels"):               # a bare label tensor is refused
        guidance.cfg(class_model, 1.0)(x, t, y)
    with pytest.raises(ValueError, match="needs a conditioning Cond"):
        guidance.cfg(class_model, 1.0)(x, t, None)


class TextModel(torch.nn.Module):
    """A toy text-conditional model: eps = tanh(x * a(text) + b(pooled) + t); takes a Cond."""


    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(D, 2, generator=g), torch.randn(D, 2, generator=g)
        self.process = VPCosine()
        self.calls = 0

    def forward(self, x, t, c):
        assert isinstance(c, Cond) and len(c) == len(x)
        self.calls += 1
        eps = torch.tanh(x * (c.text.mean(1) @ self.a) + c.pooled @ self.b + t[:, None])
        return to_pred(eps, x, t, self.process, "eps")


@pytest.mark.parametrize("w", [2.0, "per-sample"])
def test_cfg_with_text_equals_two_calls_mixed_by_hand(w):
    model = TextModel()
    x, t = _xt(2)
    c = _text_cond(5)
    w = torch.linspace(0.5, 4, B) if w == "per-sample" else w
    got = guidance.cfg(model, w)(x, t, c)
    assert model.calls == 1                                              # one batched call
    cond, uncond = model(x, t, c), model(x, t, Cond(text=c.null_text.expand(B, L, D),
                                                     pooled=c.null_pooled.expand(B, D)))
    ww = w[:, None] if isinstance(w, torch.Tensor) else w
    torch.testing.assert_close(got.eps, (1 + ww) * cond.eps - ww * uncond.eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.x0, (1 + ww) * cond.x0 - ww * uncond.x0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cond.eps, uncond.eps, atol=1e-3)          # the text matters: the check has teeth
    model.calls = 0
    assert torch.equal(guidance.cfg(model, 0.0)(x, t, c).eps, cond.eps) and model.calls == 1


def test_check_refuses_bare_labels_at_the_model_boundary(class_model):
    x, t = _xt(3)
    y = torch.arange(B) % 3
    c = labels(y, 3)
    assert check(None) is None and check(c) is c
    with pytest.raises(TypeError, match=r"conditioning.labels\(y, num_classes\)"):
        check(y)
    with pytest.raises(TypeError, match="dict"):
        check({"y": y})
    with pytest.raises(TypeError, match="conditioning.labels"):
        class_model(x, t, y)
    with pytest.raises(TypeError, match="label tensor"):
        labels([0, 1], 3)


def test_denoiser_takes_a_cond(class_model):
    x, t = _xt(4)
    y, w = torch.arange(B) % 3, torch.full((B,), 2.0)
    with torch.no_grad():
        assert torch.equal(class_model(x, t, labels(y, 3)).eps, class_model(x, t, Cond(y=y)).eps)
        # no labels is the null label
        assert torch.equal(class_model(x, t).eps, class_model(x, t, labels(torch.full_like(y, 3), 3)).eps)
        student = Denoiser(MLP2D(hidden=32, depth=2, num_classes=3, guidance_range=(0, 4)), VPCosine(), "eps")
        for p in student.parameters():          # the w embedding starts at zero (the student starts as the teacher)
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        # the guided student reads w from the Cond: the backbone's guidance input
        got = student(x, t, labels(y, 3).with_w(w)).eps
        assert torch.equal(got, student(x, t, labels(y, 3).with_w(2.0)).eps)
        ts = student.process.timestep(t)
        torch.testing.assert_close(got, student.net(x, ts, y, guidance=w), rtol=0, atol=0)
        assert not torch.allclose(got, student(x, t, labels(y, 3).with_w(0.5)).eps, atol=1e-5)


def test_denoising_loss_drops_a_cond_like_labels(class_model):
    x0, _ = _xt(5, 64)
    y = torch.arange(64) % 3
    g = torch.Generator().manual_seed(0)
    t = 1e-3 + (1 - 1e-3) * torch.rand(64, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    dropped = torch.where(torch.rand(64, generator=g) < 0.3, torch.full_like(y, 3), y)   # the labels' old dropout
    new = denoising_loss(class_model, x0, torch.Generator().manual_seed(0), labels(y, 3), p_uncond=0.3)
    assert torch.equal(new, denoising_loss_at(class_model, x0, t, eps, labels(dropped, 3)))
    with pytest.raises(TypeError, match="conditioning.labels"):
        denoising_loss(class_model, x0, torch.Generator().manual_seed(0), y, p_uncond=0.3)
