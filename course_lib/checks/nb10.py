"""Checkers of notebook 10 (GDD and GDD-I): the GAN losses with lazy R1, the GDD-I freezing rule, and the
activation statistic (the share of a layer's activation variance explained by the timestep). Cases use tiny random
discriminators, the parameter names of the course's backbones, and random activations."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import seeded
from ..distill.gdd import (GDDPrecond, apply_freeze, discriminator_loss, frozen_name, generator_loss, paper_frozen,
                           time_share)
from ..models import Denoiser, MLP2D, UNet
from ..processes import VPCosine
from .core import (accept, checker, close, explain_exception, fall_back, first_look, fresh_generator, param_grads,
                   run_check, tiny_discriminator)


def _logits(net):
    return lambda x: net(x).squeeze(1)


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
        want = ref(D, xr, xf, w)
        problem = first_look(student, (D, xr.clone(), x_fake, w), want, where,
                             zeros="Both are logistic losses of the discriminator's logits, positive for every "
                                   "sample, and loss_g must reach x_fake through D.")
        if problem:
            return fall_back("10.1", ref, problem)
        got = student(D, xr.clone(), x_fake, w)
        if not (close(got[0], want[0]) and close(got[1], want[1])):
            for fn, why in diagnoses:
                alt = fn(D, xr, xf, w)
                if w > 0 and close(got[0], alt[0]) and close(got[1], alt[1]):
                    return fall_back("10.1", ref, f"{why} ({where})")
            which = "loss_g" if not close(got[0], want[0]) else "loss_d"
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


def _generators() -> list[tuple[str, torch.nn.Module]]:
    """Two tiny GDD generators as a student meets them: GDDPrecond around a course UNet (diffusers UNet2DModel with
    attention, a channel change and class labels) and around an MLP2D, every parameter FROZEN (a copy of a loaded
    teacher is)."""
    with seeded(0):
        unet = UNet(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, num_classes=3,
                    attention=True)
        mlp = MLP2D(hidden=8, depth=3)
    return [(label, GDDPrecond(Denoiser(net, VPCosine(), "v")).requires_grad_(False))
            for label, net in (("the UNet generator", unet), ("the MLP2D generator", mlp))]


def _fraction(model: torch.nn.Module, frozen: Callable[[str], bool]) -> float:
    total = sum(p.numel() for _, p in model.named_parameters())
    return sum(p.numel() for n, p in model.named_parameters() if not frozen(n)) / total


# GDD-I's roles that a plausible rule gets wrong: (test on a parameter name, what the checker says)
_ROLE_SLIPS = [
    (lambda n: "norm" in n or "embedding" in n or "time_mlp" in n or "class_emb" in n,
     "the norms and the time / label embeddings (the paper's 'norm' and 'map_*' parameters) stay trainable in GDD-I"),
    (lambda n: "time_emb_proj" in n or "emb_proj" in n,
     "the per-block projections of the time embedding (diffusers' time_emb_proj, MLP2D's emb_proj; EDM's 'affine') "
     "stay trainable: they are how a block learns what 'one step' means"),
    (lambda n: "conv_shortcut" in n, "the skip convolutions (conv_shortcut, EDM's 'skip') stay trainable"),
    (lambda n: "conv_in" in n or "conv_out" in n or ".net.out." in n,
     "the network's input and output layers (conv_in, conv_out, MLP2D's out; EDM's enc.*_conv and aux_conv, whose "
     "names hold none of block/up/down/in) stay trainable"),
    (lambda n: "to_q" in n or "to_k" in n or "to_v" in n,
     "the attention's query, key and value maps (EDM's 'qkv') stay trainable; only its output projection is frozen"),
]


@checker("10.2")
def check_freeze_rule(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 10.2: student(G) applies GDD-I's freezing to a generator G (a GDDPrecond around a UNet2DModel or an
    MLP2D backbone, handed over with every parameter frozen, as a copy of a loaded teacher is): requires_grad False
    on every parameter (weight AND bias) of the blocks' convolutions, the resamplers' convolutions, the attention
    output projections and MLP2D's hidden linear maps, True on every other parameter; returns the trained fraction
    of G's parameters by count (a float). Checked on both backbones against gdd.apply_freeze(G, "gdd-i"), with the
    plausible slips named."""
    reference = lambda G: apply_freeze(G, "gdd-i")
    for where, G in _generators():
        try:
            got = student(G)
        except Exception as e:  # noqa: BLE001
            return fall_back("10.2", reference, explain_exception(e, f"on {where}"))
        grad = {n: p.requires_grad for n, p in G.named_parameters()}
        want = {n: not frozen_name(n) for n in grad}
        wrong = [n for n in grad if grad[n] != want[n]]
        if not any(grad.values()):
            return fall_back("10.2", reference, f"every parameter of {where} is still frozen after your function. The "
                                                "generator is a copy of a LOADED teacher, and loaded teachers are "
                                                "frozen: set requires_grad_(True) on the parameters GDD-I trains, not "
                                                "only requires_grad_(False) on the others.")
        if wrong:
            weights_ok = all(n.endswith(".bias") and grad[n] and not want[n] for n in wrong)
            if weights_ok:
                return fall_back("10.2", reference, f"your rule freezes the right layers' weights but leaves their "
                                                    f"biases trainable ({wrong[0]}, {len(wrong)} in all, on {where}). "
                                                    "GDD-I freezes whole layers: the paper's code removes every "
                                                    "parameter whose name matches, conv0.weight and conv0.bias alike.")
            if all(grad[n] == (not paper_frozen(n)) for n in grad):
                return fall_back("10.2", reference, f"this is the paper's substring rule read literally (on {where}). "
                                                    "On the course's backbones it also freezes diffusers' "
                                                    "time_emb_proj (EDM's 'affine', trainable in GDD-I), conv_shortcut "
                                                    "(EDM's 'skip') and every MLP2D layer (all of their names contain "
                                                    "'in'). Match the ROLES of the table above the exercise.")
            for slip, why in _ROLE_SLIPS:
                bad = [n for n in wrong if not grad[n] and slip(n)]
                if bad:
                    return fall_back("10.2", reference, f"your rule freezes {bad[0]} (on {where}): {why}.")
            missed_attn = [n for n in wrong if grad[n] and "to_out" in n and n.endswith(".weight")]
            if missed_attn:
                return fall_back("10.2", reference, f"your rule leaves the attention output projection "
                                                    f"{missed_attn[0]} trainable (on {where}): the paper freezes it "
                                                    "('proj' in EDM's attention, diffusers' attentions.*.to_out).")
            n = wrong[0]
            verb = "leaves trainable" if grad[n] else "freezes"
            return fall_back("10.2", reference, f"your rule {verb} {n} ({len(wrong)} parameters wrong in all, on "
                                                f"{where}); see the table above the exercise for which roles GDD-I "
                                                "freezes.")
        fraction = _fraction(G, frozen_name)
        if not isinstance(got, (float, int, torch.Tensor)) or isinstance(got, bool) or (
                isinstance(got, torch.Tensor) and got.numel() != 1):
            return fall_back("10.2", reference, f"the right parameters are frozen on {where}, but your function "
                                                f"returned {type(got).__name__}: return the trained fraction, a float.")
        got = float(got)
        if abs(got - (1 - fraction)) < 1e-6 and abs(fraction - 0.5) > 1e-3:
            return fall_back("10.2", reference, f"the right parameters are frozen on {where}, but you returned the "
                                                f"FROZEN fraction {got:.4f}; return the trained one.")
        by_tensor = sum(grad.values()) / len(grad)
        if abs(got - by_tensor) < 1e-6 and abs(fraction - by_tensor) > 1e-6:
            return fall_back("10.2", reference, f"the right parameters are frozen on {where}, but your fraction "
                                                f"{got:.4f} counts parameter TENSORS; count their elements "
                                                "(p.numel()).")
        if abs(got - fraction) > 1e-6:
            return fall_back("10.2", reference, f"the right parameters are frozen on {where}, but your trained "
                                                f"fraction {got:.4f} is not {fraction:.4f}: the parameters with "
                                                "requires_grad, counted by p.numel(), over all of G's parameters.")
    return accept("10.2", student, "correct: the right parameters of both backbones frozen, the trained fraction "
                                   "returned.")


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
            "on (K, B, C, H, W) feature maps (each position of each input one observation of its channel)"
        yield (torch.randn(1, 8, 3, generator=g, dtype=torch.float64).expand(5, 8, 3).clone(),), \
            "on activations identical at every timestep (the share must be 0)"
        yield (torch.randn(5, 1, 3, generator=g, dtype=torch.float64).expand(5, 8, 3).clone(),), \
            "on activations that depend on the timestep alone (the share must be 1)"

    first = (torch.randn(4, 16, 5, generator=g, dtype=torch.float64)
             + 2 * torch.randn(4, 1, 5, generator=g, dtype=torch.float64),)
    problem = first_look(student, first, time_share(*first), "on activations whose per-channel means move with the "
                         "timestep (K = 4 timesteps, B = 16 inputs, C = 5 channels)",
                         zeros="A share of 0 says the timestep explains none of the variance; it must grow with how "
                               "much of the variance the timestep explains.")
    if problem:
        return fall_back("10.3", time_share, problem)
    value = float(student(*first))
    if not 0.0 <= value <= 1.0 + 1e-9:
        return fall_back("10.3", time_share, f"your share is {value:.4g}: a share of variance lies in [0, 1].")
    return run_check("10.3", student, time_share, cases(), atol=1e-6, rtol=1e-5,
                     hint="mu_k = mean over the inputs and their spatial positions, per channel; between = variance "
                          "of mu_k over k; within = mean over k of the variance over the inputs and positions "
                          "(population variances, unbiased=False); share = between / (between + within) per "
                          "channel, then the mean over channels.")
