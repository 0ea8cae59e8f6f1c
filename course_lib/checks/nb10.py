"""Checkers of notebook 10 (GDD and GDD-I): the GAN losses with lazy R1, the GDD-I freezing rule, and the
activation statistic (the share of a layer's activation variance explained by the timestep). Cases use tiny random
discriminators, the parameter names of the course's backbones, and random activations."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import seeded
from ..distill.gdd import discriminator_loss, frozen_name, generator_loss, paper_frozen, time_share
from ..models import Denoiser, MLP2D, UNet
from ..processes import VPCosine
from .core import (accept, checker, explain_exception, fall_back, fresh_generator, param_grads, run_check,
                   tiny_discriminator)


def _logits(net):
    return lambda x: net(x).squeeze(1)


def _close(a, b) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a.detach().double(), b.double(),
                                                                                  atol=1e-8, rtol=1e-6)


def gdd_losses_ref(D: Callable, x_real: torch.Tensor, x_fake: torch.Tensor, r1_weight: float):
    """The reference of exercise 10.1: (L_G, L_D), each (B,)."""
    return generator_loss(D(x_fake)), discriminator_loss(D, x_real, x_fake, r1_weight)


def _r1(D, x):
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1)


@checker("10.1")
def check_gdd_losses(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 10.1: student(D, x_real, x_fake, r1_weight) -> (loss_g, loss_d), each (B,): the non-saturating
    generator loss softplus(-D(x_fake)), and the discriminator loss softplus(D(sg x_fake)) + softplus(-D(x_real))
    + r1_weight ||grad_x D(x_real)||^2 (R1 on REAL samples). Checked: values, that loss_d does not train the
    generator (no gradient to x_fake), that loss_g reaches x_fake, and the named slips."""
    g = fresh_generator(seed)
    ref = gdd_losses_ref
    diagnoses = [
        (lambda D, xr, xf, w: (F.softplus(D(xf)), ref(D, xr, xf, w)[1]),
         "your generator loss is softplus(+D(x_fake)): that is the discriminator's term for fakes, and minimising "
         "it makes fakes look MORE fake. The non-saturating generator loss is softplus(-D(x_fake)) = "
         "-log sigmoid(D(x_fake))."),
        (lambda D, xr, xf, w: (-F.softplus(D(xf)), ref(D, xr, xf, w)[1]),
         "your generator loss is -softplus(D(x_fake)), the SATURATING loss log(1 - sigmoid(D)) of Goodfellow et al.: "
         "its gradient vanishes when the discriminator is sure. Use softplus(-D(x_fake))."),
        (lambda D, xr, xf, w: (ref(D, xr, xf, w)[0], F.softplus(D(xf)) + F.softplus(-D(xr)) + w * _r1(D, xf)),
         "your R1 penalty is computed on the FAKE samples. R1 (Mescheder et al. 2018) penalises the discriminator's "
         "gradient on the REAL data: r1_weight * ||grad_x D(x_real)||^2."),
        (lambda D, xr, xf, w: (ref(D, xr, xf, w)[0], F.softplus(-D(xf)) + F.softplus(D(xr)) + w * _r1(D, xr)),
         "your discriminator loss has the signs swapped: it pushes D(x_real) down and D(x_fake) up. Use "
         "softplus(D(x_fake)) + softplus(-D(x_real))."),
        (lambda D, xr, xf, w: (ref(D, xr, xf, w)[0], F.softplus(D(xf)) + F.softplus(-D(xr))),
         "your discriminator loss has no R1 term: add r1_weight * ||grad_x D(x_real)||^2 (torch.autograd.grad with "
         "create_graph=True, so the penalty trains D)."),
        (lambda D, xr, xf, w: (-D(xf), F.relu(1 + D(xf)) + F.relu(1 - D(xr)) + w * _r1(D, xr)),
         "these are the hinge losses (ADD, notebook 08). GDD uses the non-saturating (logistic) loss: "
         "softplus(-D(x_fake)) for the generator, softplus(D(x_fake)) + softplus(-D(x_real)) for the discriminator."),
    ]
    cases = []
    for w in (0.5, 0.0, 2.0):
        net = tiny_discriminator(g)
        xr = 1.5 * torch.randn(8, 2, generator=g, dtype=torch.float64)
        xf = 1.5 * torch.randn(8, 2, generator=g, dtype=torch.float64)
        cases.append(((net, xr, xf, w), f"with r1_weight = {w:g}"))
    for (net, xr, xf, w), where in cases:
        D = _logits(net)
        x_fake = xf.clone().requires_grad_(True)
        try:
            got = student(D, xr.clone(), x_fake, w)
        except Exception as e:  # noqa: BLE001
            return fall_back("10.1", ref, explain_exception(e, where))
        want = ref(D, xr, xf, w)
        if not (isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(v, torch.Tensor) for v in got)):
            return fall_back("10.1", ref, f"return two per-sample tensors (loss_g, loss_d), each of shape (B,) {where}.")
        if not (_close(got[0], want[0]) and _close(got[1], want[1])):
            for fn, why in diagnoses:
                alt = fn(D, xr, xf, w)
                if w > 0 and _close(got[0], alt[0]) and _close(got[1], alt[1]):
                    return fall_back("10.1", ref, f"{why} ({where})")
            which = "loss_g" if not _close(got[0], want[0]) else "loss_d"
            return fall_back("10.1", ref, f"{which} differs from the reference {where}: loss_g = softplus(-D(x_fake)), "
                                          "loss_d = softplus(D(x_fake)) + softplus(-D(x_real)) + r1_weight * "
                                          "||grad_x D(x_real)||^2 summed over the data dimensions, all per sample.")
        # gradients: loss_d must not reach the generator's samples; loss_g must
        if got[1].requires_grad and float(param_grads(got[1], [x_fake])[0].abs().max()) > 0:
            return fall_back("10.1", ref, f"loss_d sends gradients into x_fake {where}: the discriminator's loss "
                                          "must see the fakes as constants (x_fake.detach()), or its update would "
                                          "also train the generator.")
        if not got[0].requires_grad or float(param_grads(got[0], [x_fake])[0].abs().max()) == 0:
            return fall_back("10.1", ref, f"loss_g has no gradient with respect to x_fake {where}: the generator "
                                          "learns only through D(x_fake); do not detach x_fake there.")
        if w > 0:
            params = list(net.parameters())
            diff = [a - b for a, b in zip(param_grads(got[1], params), param_grads(want[1], params))]
            if max(float(d.abs().max()) for d in diff) > 1e-6:
                return fall_back("10.1", ref, f"the gradient of loss_d with respect to D's parameters is wrong "
                                              f"{where}: the R1 gradient must be taken with create_graph=True so "
                                              "that the penalty itself trains the discriminator.")
    return accept("10.1", student, f"correct on {len(cases)} random cases (values and where gradients flow).")


def _unet_names() -> list[str]:
    """Parameter names of the course's digits UNet (diffusers UNet2DModel, random weights) as a GDD generator."""
    with seeded(0):
        net = UNet(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, num_classes=3,
                   attention=True)
    return ["model." + n for n, _ in Denoiser(net, VPCosine(), "v").named_parameters()]


def _mlp_names() -> list[str]:
    with seeded(0):
        net = MLP2D(hidden=8, depth=3)
    return ["model." + n for n, _ in Denoiser(net, VPCosine(), "v").named_parameters()]


@checker("10.2")
def check_freeze_rule(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 10.2: student(name) -> True when GDD-I freezes the parameter `name` of a course model (a UNet2DModel
    or an MLP2D inside the generator). Checked on every parameter name of both backbones."""
    names = _unet_names() + _mlp_names()
    try:
        got = {n: bool(student(n)) for n in names}
    except Exception as e:  # noqa: BLE001
        return fall_back("10.2", frozen_name, explain_exception(e))
    want = {n: frozen_name(n) for n in names}
    wrong = [n for n in names if got[n] != want[n]]
    if not wrong:
        return accept("10.2", student, f"correct on all {len(names)} parameter names of both backbones.")
    if all(got[n] == paper_frozen(n) for n in names):
        return fall_back("10.2", frozen_name, "this is the paper's substring rule read literally. On the course's "
                                              "backbones it also freezes diffusers' time_emb_proj (EDM's 'affine', "
                                              "trainable in GDD-I), conv_shortcut (EDM's 'skip') and every MLP2D "
                                              "layer (all of their names contain 'in'). Match the ROLES: see the "
                                              "table above the exercise.")
    bad_norm = [n for n in wrong if got[n] and any(k in n for k in ("norm", "embedding", "time_mlp", "emb_proj",
                                                                     "time_emb_proj"))]
    if bad_norm:
        return fall_back("10.2", frozen_name, f"your rule freezes {bad_norm[0]}: GDD-I keeps norms, the time and "
                                              "label embeddings and their per-block projections trainable (the "
                                              "paper's 'affine', 'norm' and 'map_*' parameters): only the blocks' "
                                              "convolutions and the attention output projections are frozen.")
    missed_attn = [n for n in wrong if not got[n] and "to_out" in n]
    if missed_attn:
        return fall_back("10.2", frozen_name, f"your rule misses the attention output projection {missed_attn[0]}: "
                                              "the paper freezes it ('proj' in EDM's attention, diffusers' "
                                              "attentions.*.to_out).")
    n = wrong[0]
    verb = "freezes" if got[n] else "does not freeze"
    return fall_back("10.2", frozen_name, f"your rule {verb} {n} ({len(wrong)} names wrong in all); see the table "
                                          "above the exercise for which roles GDD-I freezes.")


@checker("10.3")
def check_time_share(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 10.3: student(acts) -> the share of the activation variance explained by the timestep, a 0-dim
    tensor, from acts (K timesteps, B inputs, C channels, ...): per channel between / (between + within),
    averaged over channels."""
    g = fresh_generator(seed)

    def cases():
        yield (torch.randn(4, 16, 5, generator=g, dtype=torch.float64)
               + torch.randn(4, 1, 5, generator=g, dtype=torch.float64),), "on (K, B, C) activations"
        yield (torch.randn(3, 6, 4, 5, 5, generator=g, dtype=torch.float64)
               + 2 * torch.randn(3, 1, 4, 1, 1, generator=g, dtype=torch.float64),), \
            "on (K, B, C, H, W) feature maps (spatial positions pooled with the inputs)"
        yield (torch.randn(1, 8, 3, generator=g, dtype=torch.float64).expand(5, 8, 3).clone(),), \
            "on activations identical at every timestep (the share must be 0)"
        yield (torch.randn(5, 1, 3, generator=g, dtype=torch.float64).expand(5, 8, 3).clone(),), \
            "on activations that depend on the timestep alone (the share must be 1)"

    return run_check("10.3", student, time_share, cases(), atol=1e-6, rtol=1e-5,
                     hint="mu_k = mean over inputs (and spatial positions) per channel; between = variance of mu_k "
                          "over k; within = mean over k of the variance over inputs (population variances, "
                          "unbiased=False); share = between / (between + within) per channel, then the mean over "
                          "channels.")
