"""course_lib.distill.gan, the adversarial parts of ADD, DMD2 and GDD: the losses' values and gradients, R1 against
its analytic value, the divergence guard stopping a run with its last good checkpoint kept, the frozen feature
networks (random 2D features; a diffusion model's own layers on re-noised inputs) and the heads sized on them."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from course_lib.checkpoint import load_tensors
from course_lib.conditioning import labels
from course_lib.data2d import sample_2d
from course_lib.distill import gan
from course_lib.teachers import load_teacher
from course_lib.train import TRAINER_WEIGHTS, Network, TrainConfig, train_networks


def test_losses_are_the_papers_per_sample_values():
    real, fake = torch.tensor([2.0, -0.5, 0.0]), torch.tensor([-2.0, 0.5, 0.0])
    torch.testing.assert_close(gan.hinge_d(real, fake), torch.tensor([0.0, 3.0, 2.0]))
    torch.testing.assert_close(gan.hinge_g(fake), -fake)
    sp = lambda v: math.log1p(math.exp(v))
    torch.testing.assert_close(gan.ns_d(real, fake), torch.tensor([sp(-2) + sp(-2), sp(0.5) + sp(0.5), 2 * sp(0)]))
    # non-saturating: -log sigmoid(D(fake)), whose gradient stays large where the discriminator rejects the sample
    torch.testing.assert_close(gan.ns_g(fake), -torch.log(torch.sigmoid(fake)))
    assert gan.adversarial("ns") == (gan.ns_d, gan.ns_g)
    with pytest.raises(ValueError, match="valid: hinge, ns"):
        gan.adversarial("wasserstein")


def test_r1_is_the_squared_input_gradient_at_the_real_samples_and_trains_the_discriminator():
    torch.manual_seed(0)
    D = nn.Linear(3, 1)
    x = torch.randn(5, 3)
    r1 = gan.r1_penalty(lambda u: D(u).squeeze(1), x)
    torch.testing.assert_close(r1, D.weight.pow(2).sum().expand(5))            # D linear: grad = w everywhere
    (g,) = torch.autograd.grad(r1.sum(), D.weight)                             # differentiable in D's weights
    torch.testing.assert_close(g, 5 * 2 * D.weight)
    assert not x.requires_grad                                                  # the caller's tensor is untouched
    quad = gan.r1_penalty(lambda u: (u ** 2).sum(1), x)                         # grad 2x: ||2x||^2
    torch.testing.assert_close(quad, 4 * x.pow(2).sum(1))


def test_guard_passes_finite_losses_and_names_the_divergence():
    ok = torch.tensor([0.1, 2.0])
    assert gan.guard(ok, "critic", 3) is ok
    with pytest.raises(gan.GANDiverged, match="critic loss is NaN or infinite at step 7"):
        gan.guard(torch.tensor([0.1, float("nan")]), "critic", 7)
    with pytest.raises(gan.GANDiverged, match=r"exploded \(\|loss\| = 2e\+05 > 10000\)"):
        gan.guard(torch.tensor([2e5]), "generator", 1)


def test_a_diverging_gan_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    G, D = nn.Linear(2, 2), nn.Linear(2, 1)
    blow_up_at = 7

    def step(ctx, x):
        z = torch.randn(x.shape, generator=ctx.generator)
        scale = float("nan") if ctx.step >= blow_up_at else 1.0                  # the run diverges at step 7
        if ctx.phase == "critic":
            loss = gan.hinge_d(D(x).squeeze(1), D(G(z)).squeeze(1)) * scale
        else:
            loss = gan.hinge_g(D(G(z)).squeeze(1)) * scale
        return gan.guard(loss, ctx.phase, ctx.step)

    cfg = TrainConfig(steps=20, batch_size=32, ckpt_every=2)
    with pytest.raises(gan.GANDiverged, match="at step 7"):
        train_networks({"critic": Network(D), "generator": Network(G)}, step,
                       lambda n, g: sample_2d("gmm", n, g)[0], cfg, ckpt_dir=tmp_path, progress=False)
    tensors, config = load_tensors(tmp_path, "", weights_name=TRAINER_WEIGHTS)
    assert config["step"] == 6                                                  # the last checkpoint before step 7
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("net."))
    assert all(torch.isfinite(p).all() for p in [*G.parameters(), *D.parameters()])   # stopped before the update


def test_random_2d_features_are_frozen_deterministic_and_multi_layer():
    f, again = gan.RandomFeatures2D(depth=3, width=16, seed=4), gan.RandomFeatures2D(depth=3, width=16, seed=4)
    x = torch.randn(10, 2)
    out = f(x)
    assert [tuple(h.shape) for h in out] == [(10, 16)] * 3
    assert all(torch.equal(a, b) for a, b in zip(out, again(x)))
    assert not any(p.requires_grad for p in f.parameters())
    D = gan.discriminator(f, x)
    assert 0 < gan.trainable_fraction(D) < 1 and len(D.heads) == 3
    y = D(x.requires_grad_(True))
    (gx,) = torch.autograd.grad(y.sum(), x)                                     # gradients reach the samples
    assert y.shape == (10,) and float(gx.abs().sum()) > 0


def test_denoiser_features_read_the_teachers_layers_on_renoised_inputs():
    T = load_teacher("digits")
    f = gan.DenoiserFeatures(T, t_range=(0.2, 0.2))
    assert f.taps == ["net.unet.down_blocks.1", "net.unet.down_blocks.2", "net.unet.mid_block"]
    assert gan.default_taps(load_teacher("gmm-vp")) == ["net.layers.0", "net.layers.1", "net.layers.2"]
    x, y = torch.randn(3, 1, 16, 16), labels(torch.tensor([1, 2, 3]), 10)
    feats = f(x, y, torch.Generator().manual_seed(0))
    assert [tuple(h.shape[1:]) for h in feats] == [(64, 4, 4), (64, 4, 4), (64, 4, 4)]
    # the same noise gives the same features; the model sees x_t = alpha x + sigma eps at t = 0.2
    with gan.tapped(T, ["net.unet.mid_block"]) as out:
        g = torch.Generator().manual_seed(0)
        t = (0.2 + 0.0 * torch.rand(3, generator=g))
        eps = torch.randn(x.shape, generator=g)
        T(T.process.marginal(x, t, eps), t, y)
    torch.testing.assert_close(feats[2], out["net.unet.mid_block"])
    D = gan.discriminator(f, x, cond_example=y)                               # 10 classes: y.null_y
    assert set(n.split(".")[0] for n, p in D.named_parameters() if p.requires_grad) == {"heads"}
    shared = gan.DenoiserFeatures(T, shared=True)                               # another module owns the model
    assert shared.model is T and not list(shared.parameters()) and not shared.state_dict()
    with pytest.raises(ValueError, match="no submodule named"):
        gan.DenoiserFeatures(T, taps=["net.unet.nowhere"])(x, y)
    with pytest.raises(ValueError, match="t_range"):
        gan.DenoiserFeatures(T, t_range=(0.5, 0.1))


def test_one_step_generation_is_the_models_x0_at_the_prior():
    T = load_teacher("gmm-vp")
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gan.generate_one_step(T, z), T(z, torch.ones(6)).x0)
