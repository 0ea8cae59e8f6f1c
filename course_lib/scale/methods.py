"""The pieces the SD stages add to distill/'s method steps, in one place because two modules run them: the stage that
trains with them (lcm_lora.py, dmd2.py) and cost.py, which times the same step on random SD 1.5-sized UNets.

    lcm_lora_step(sd, lcfg, online)        LCM-LoRA's method step: notebook 06's lcm.lcm_step (teacher = the UNet with
                                           its adapter disabled), after the online teacher's sample in prompts-only runs
    networks(model, lora, alpha, gan, seed)  DMD2's generator, real score and critic around one SD UNet
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .. import grids, samplers
from .. import sd as sdlib
from ..conditioning import Cond
from ..config import seeded
from ..distill import dmd, lcm
from ..guidance import cfg

LCM_LORA_W = 7.5                        # the released LCM-LoRA's fixed omega (= course w; guidance_scale 8.5)


def lcm_lora_step(sd, lcfg, online: dict | None = None) -> Callable:
    """The method step: notebook 06's lcm.lcm_step (LoRA: teacher = the UNet with its adapter disabled, target = the
    online student without grad). online {"w", "steps"}: the batch holds noise, turned first into the guided
    teacher's DPM-Solver++ sample (adapter disabled, no grad): z_0 of the teacher's own distribution."""
    teacher, process = sd.model, sd.model.process
    grid = grids.default_grid(online["steps"], process) if online else None

    def step(ctx, batch):
        if online:
            eps, c = batch["x"], batch["cond"]
            with torch.no_grad(), sdlib.adapter_disabled(teacher):
                z0 = samplers.dpm_solver_pp_2m(cfg(teacher, online["w"]), eps, grid, process, cond=c)
            batch = {"x": z0.to(eps.dtype), "cond": c}
        return lcm.lcm_step(ctx, batch, process, lcfg, lora=True)

    return step


def networks(model: nn.Module, lora: int, alpha: float | None, gan: bool, seed: int) -> tuple[nn.Module, nn.Module,
                                                                                                nn.Module]:
    """(generator, real score, critic) around an SDDenoiser `model` (used as the generator itself): trainable, or
    frozen with a rank-`lora` adapter whose lora_B = 0 (it starts as the teacher) and the same UNet without the
    adapter as real score; the critic a trainable copy of the teacher with, when gan, a head on its mid block.
    Shared by the DMD2 stage and by scale.cost's measurement of it."""
    unet = model.unet
    device = next(unet.parameters()).device
    h = unet.config.sample_size
    x_example = torch.zeros(2, unet.config.in_channels, h, h, device=device)
    text = torch.zeros(2, 1, unet.config.cross_attention_dim, device=device)
    with seeded(seed):
        critic = dmd.make_critic(model, x_example, gan, Cond(text=text, null_text=text[:1]))
    if lora:
        sdlib.add_lora(model, r=lora, alpha=alpha, seed=seed)
        real = sdlib.AdapterOff(model)              # the generator's own UNet, adapter off: one UNet in memory
    else:
        real = copy.deepcopy(model).requires_grad_(False).eval()
        model.requires_grad_(True)
    return model, real, critic
