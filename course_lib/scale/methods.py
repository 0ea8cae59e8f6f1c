"""The pieces the SD stages add to distill/'s method steps, in one place because two modules run them: the stage that
trains with them (lcm_lora.py, dmd2.py) and cost.py, which times the same step on random SD 1.5-sized UNets.

    lcm_lora_step(sd, lcfg, online)        LCM-LoRA's method step: notebook 06's lcm.lcm_step (teacher = the UNet with
                                           its adapter disabled), after the online teacher's sample in prompts-only runs
    networks(model, lora, alpha, gan, seed)  DMD2's generator, real score and critic around one SD UNet
    tscd_grid(process, intervals)          Hyper-SD's training grid on SD's integer timesteps (segment edges on it)
    hypersd_step(model, k, grid, w, ...)   Hyper-SD's method step (distill.hypersd.tscd_step, or reward_step for the
                                           reward stage) with the SD LoRA nets: the guided teacher is the UNet with
                                           its adapter disabled, the target the online student without grad
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from .. import grids, samplers
from .. import sd as sdlib
from ..conditioning import Cond
from ..config import seeded
from ..distill import dmd, hypersd, lcm
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


HYPERSD_INTERVALS = 40                  # grid intervals: 25 timesteps each; every k of (8, 4, 2, 1) divides 40


def tscd_grid(process, intervals: int = HYPERSD_INTERVALS) -> torch.Tensor:
    """Hyper-SD's training grid at SD scale, in course times (float64, increasing, intervals + 1 points): the integer
    timesteps 0, T/I - 1, 2T/I - 1, ..., T - 1 (I = intervals; T/I = 25 for the default 40, close to LCM's 20). With
    I divisible by k the k segments' edges (hypersd.segment_edges(k, grid=grid)) are timesteps 0 and jT/k - 1: the
    trailing grid of TCD's k-step sampler (999, 749, 499, 249 for k = 4), so every sampler step at k steps starts on
    a segment edge."""
    T = int(process.T)
    if intervals < 1 or T % intervals:
        raise ValueError(f"--intervals {intervals} must divide the {T} training timesteps")
    timesteps = torch.cat([torch.zeros(1, dtype=torch.int64),
                           torch.arange(1, intervals + 1, dtype=torch.int64) * (T // intervals) - 1])
    return process.t_of_timestep(timesteps)


def hypersd_step(model, k: int, grid: torch.Tensor, w: float, distance: str = "l2",
                 reward: tuple[hypersd.RewardConfig, Callable] | None = None) -> Callable:
    """Hyper-SD's method step for an SD LoRA stage: notebook 11's hypersd.tscd_step with k segments on `grid` (or,
    with reward = (RewardConfig, reward_fn), hypersd.reward_step), given the nets a LoRA stage has, one UNet in
    memory: "teacher" the UNet `model` with its adapter disabled and guided with the fixed w (guidance.cfg; no
    gradient: tscd_target runs it under no_grad), "target" theta^- the online student without gradients (as
    LCM-LoRA and diffusers' LoRA scripts: no EMA copy of the UNet)."""
    teacher = cfg(sdlib.AdapterOff(model), w)
    if reward is None:
        inner = hypersd.tscd_step(hypersd.TSCDConfig(segments=(k,), N=len(grid), distance=distance), grid, k)
    else:
        inner = hypersd.reward_step(reward[0], grid, reward[1])

    def step(ctx, batch):
        return inner(replace(ctx, nets={**ctx.nets, "target": ctx.nets["student"], "teacher": teacher}), batch)

    return step
