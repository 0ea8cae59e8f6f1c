"""The course's runs of LCM (distill.lcm) on the mini Stable Diffusion: its students' files, their evaluation, the
shipped students of data/lcm and notebook 06's style LoRA.

    save_lcm / load_lcm             a full student: its UNet in diffusers' format + lcm.json (w range, scalings)
    save_lcm_lora / load_lcm_lora   an LCM-LoRA in diffusers' LoRA format + lcm.json (fixed w, base fingerprint)
    evaluate(sd, student, ...)      adherence and KID/FD of multistep sampling (minisd.evaluate_images)
    RECIPE, LORA_RECIPE             the shipped full student's and LCM-LoRA's recipes (data/lcm)
    load_shipped(sd, kind)          the shipped students
    train_style_lora, STYLE         a second LoRA of the course's own, composed with the LCM-LoRA (lcm.compose)

    python -m course_lib.recipes.lcm train --out data/lcm --threads 2     # the shipped students
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import minisd, paths
from ..conditioning import Cond
from ..config import seeded
from ..distill.lcm import (LORA_W, ORIGINAL_STEPS, LCMConfig, LCMModel, distill_lcm, distill_lcm_lora,
                           present_targets, sample, train_config)
from ..minisd import digit_batches
from ..sd import (adapter_disabled, base_fingerprint, load_lora, load_unet_student, require_codec, save_peft_lora,
                  save_unet_student)
from ..train import TrainConfig, train

LCM_JSON = "lcm.json"


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading (diffusers' formats, plus lcm.json with the settings and the base model's fingerprint)
# ----------------------------------------------------------------------------------------------------------------

def save_lcm(student: LCMModel, folder: str | os.PathLike, info: dict | None = None) -> Path:
    """A full LCM student: its UNet in diffusers' format (folder/unet: UNet2DConditionModel.from_pretrained) and
    lcm.json (w range, scalings, info such as the command and measured quality)."""
    if student.w_dim is None:
        raise ValueError("this is an LCM-LoRA: save it with save_lcm_lora")
    return save_unet_student(student.denoiser.unet, folder, LCM_JSON, {
        "kind": "lcm", "w_range": student.w_range, "sigma_data": student.sigma_data,
        "timestep_scaling": student.timestep_scaling, "original_inference_steps": ORIGINAL_STEPS, **(info or {})})


def load_lcm(folder: str | os.PathLike, teacher: nn.Module) -> LCMModel:
    """An LCM student saved by save_lcm, for the teacher (an sd.SDDenoiser) it was distilled from."""
    denoiser, meta = load_unet_student(folder, LCM_JSON, teacher, "LCM student (save_lcm writes one)")
    return LCMModel(denoiser, w_range=tuple(meta["w_range"]), sigma_data=meta["sigma_data"],
                    timestep_scaling=meta["timestep_scaling"])


def save_lcm_lora(student: LCMModel, folder: str | os.PathLike, info: dict | None = None) -> Path:
    """The LCM-LoRA adapter in diffusers' format (pipe.load_lora_weights(folder)) and lcm.json with the fixed w and
    the fingerprint of the base UNet it was distilled on."""
    folder = Path(folder)
    with adapter_disabled(student):
        fp = base_fingerprint(student.denoiser.unet)
    save_peft_lora(student.denoiser.unet, folder)
    meta = {"kind": "lcm-lora", "w_fixed": student.w_fixed, "base_fingerprint": fp,
            "sigma_data": student.sigma_data, "timestep_scaling": student.timestep_scaling, **(info or {})}
    (folder / LCM_JSON).write_text(json.dumps(meta, indent=2))
    return folder


def load_lcm_lora(model: nn.Module, folder: str | os.PathLike) -> LCMModel:
    """Load an LCM-LoRA saved by save_lcm_lora onto `model` (an sd.SDDenoiser without an adapter: the base it was
    distilled on). A LoRA distilled on another base model is refused with a clear error."""
    folder = Path(folder)
    if not (folder / LCM_JSON).is_file():
        raise FileNotFoundError(f"{folder / LCM_JSON} is missing: {folder} holds no LCM-LoRA "
                                "(save_lcm_lora writes one)")
    meta = json.loads((folder / LCM_JSON).read_text())
    fp = base_fingerprint(model.unet)
    if fp != meta["base_fingerprint"]:
        raise ValueError(f"this LCM-LoRA was distilled on another base model (fingerprint {meta['base_fingerprint']}, "
                         f"this UNet's is {fp}): an acceleration LoRA only works on the weights it was trained "
                         "against. "
                         "Load it onto its own base (e.g. minisd.load_mini_sd()) or distil one for this model")
    load_lora(model, folder)
    return LCMModel(model, w_fixed=meta["w_fixed"], sigma_data=meta["sigma_data"],
                    timestep_scaling=meta["timestep_scaling"])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on the mini SD
# ----------------------------------------------------------------------------------------------------------------

def evaluate(sd: Any, student: nn.Module, n: int = 500, steps: int = 4, w: float | None = None,
             seeds: Sequence[int] = (0, 1, 2), sampler: Callable[..., Tensor] | None = None) -> dict[str, Any]:
    """minisd.evaluate for an LCM student: the same prompts per seed (minisd.evaluate_images), adherence and KID/FD
    against held-out and training digits, mean and spread over the seeds."""
    return minisd.evaluate_images(lambda prompts, s: sample(sd, student, prompts, steps, w, seed=s, sampler=sampler),
                                  n, seeds, steps=steps, w=w)


# ----------------------------------------------------------------------------------------------------------------
# Notebook 06: a style LoRA of the course's own, composed with the LCM-LoRA (lcm.compose)
# ----------------------------------------------------------------------------------------------------------------

STYLE = "style"          # adapter name of a second LoRA composed with the LCM-LoRA (the "acceleration vector")


def train_style_lora(sd: Any, colour: str = "red", steps: int = 200, batch: int = 64, lr: float = 1e-3, r: int = 4,
                     seed: int = 0, n_images: int | None = None, progress: bool = True) -> nn.Module:
    """A second LoRA of the course's own (adapter name STYLE) on sd.model's UNet: Stable Diffusion's own loss on the
    training digits drawn ONLY in `colour`, with captions that never name a colour, so that the LoRA learns "ink is
    <colour>". Only this adapter trains (an LCM-LoRA already on the UNet is switched off while it trains).
    Returns the UNet, with the style adapter active alone."""
    from peft import LoraConfig

    require_codec(sd)
    if colour not in minisd.COLOURS:
        raise ValueError(f"colour is one of {tuple(minisd.COLOURS)}; got {colour!r}")
    unet, proc = sd.model.unet, sd.model.process
    data = minisd.training_digits()
    if n_images is not None:
        data = minisd.Digits(data.x[:n_images], data.y[:n_images], data.thick[:n_images], data.edges)
    c = list(minisd.COLOURS).index(colour)
    with torch.no_grad():
        rgb = minisd.colourize(data.x, minisd.COLOUR_TABLE[c].expand(len(data.x), 3))
        latents = torch.cat([sd.vae.encode(rgb[i:i + 500]) for i in range(0, len(rgb), 500)])   # (N, 4, h, w)
        plain = [k for k in range(len(minisd.TEMPLATES)) if not minisd.template_fields(k)[1]]    # no colour named
        texts = [minisd.caption(d, th, None, k) for d in range(10) for th in minisd.THICKNESS for k in plain]
        emb = sd.text.embed(texts).view(10, len(minisd.THICKNESS), len(plain), -1, sd.text.embed([""]).shape[-1])
    unet.requires_grad_(False)
    with seeded(seed):
        unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian",
                                    target_modules=list(present_targets(unet, ("to_q", "to_k", "to_v", "to_out.0")))),
                         adapter_name=STYLE)
    unet.set_adapter(STYLE)                 # only the style adapter is active (and trainable)
    den = sd.model

    def sample_batch(n: int, g: torch.Generator):
        idx = torch.randint(0, len(latents), (n,), generator=g, device=g.device).cpu()
        tpl = torch.randint(0, len(plain), (n,), generator=g, device=g.device).cpu()
        return latents[idx], emb[data.y[idx], data.thick[idx], tpl]

    def loss(model, b, g):                  # SD's eps loss (minisd.ldm_loss) through the course's SDDenoiser
        z0, text = b
        i = torch.randint(0, proc.T, (len(z0),), generator=g, device=g.device).to(z0.device)
        t = proc.t_of_timestep(i).to(z0.dtype)
        eps = torch.randn(z0.shape, generator=g, device=g.device).to(z0)
        pred = den.raw(proc.marginal(z0, t, eps), t, Cond(text=text))
        return (pred - eps).pow(2).flatten(1).mean(1)

    holder = _Trainable(unet)
    train(holder, loss, sample_batch, TrainConfig(steps=steps, batch_size=batch, lr=lr, ema_decay=0.0, seed=seed,
                                                  desc=f"style LoRA ({colour} ink)"), progress=progress)
    return unet


class _Trainable(nn.Module):
    """The UNet for the engine's one-network train(): its trainable (style-adapter) parameters, nothing else."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def config(self) -> dict:
        return {"arch": "style-lora"}


# ----------------------------------------------------------------------------------------------------------------
# The shipped students: python -m course_lib.recipes.lcm train
# ----------------------------------------------------------------------------------------------------------------

def shipped_dir() -> Path:
    return paths.data_dir() / "lcm"


SHIPPED = {"student": "mini-sd-lcm", "lora": "mini-sd-lcm-lora"}
RECIPE = LCMConfig(steps=800, batch=64, lr=2e-4, warmup=100, lora_rank=8)
# The LCM-LoRA's: the student's with a 5x learning rate and half the updates. A LoRA's change B A (B starts at zero)
# moves the weights less per update than full fine-tuning (diffusers' scripts: 1e-4 for LCM-LoRA, 1e-6 for the full
# LCM); and the online target (lora_target_decay 0, as diffusers') drifts past the teacher if trained on: the same run
# scored a worse 4-step held-out KID at 800 updates than at 400. data/lcm/README.md has every run measured.
LORA_RECIPE = replace(RECIPE, steps=400, lr=1e-3)
RECREATE = "python -m course_lib.recipes.lcm train --out data/lcm --threads 2"


def load_shipped(sd: Any, kind: str = "student") -> LCMModel:
    """The shipped LCM student ("student": load_lcm) or LCM-LoRA ("lora": loaded onto sd.model IN PLACE)."""
    folder = paths.shipped(shipped_dir() / SHIPPED[kind], RECREATE)
    return load_lcm(folder, sd.model) if kind == "student" else load_lcm_lora(sd.model, folder)


def summary(r: dict) -> dict:
    return {k: [round(r["mean"][k], 4), round(r["std"][k], 4)] for k in r["mean"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.recipes.lcm",
                                     description="Distil the mini Stable Diffusion into an LCM and an LCM-LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="LCD of the mini SD: a full student (w-embedding) and an LCM-LoRA (fixed w)")
    p.add_argument("--out", default=str(shipped_dir()))
    p.add_argument("--steps", type=int, default=None, help="updates (default: each recipe's own)")
    p.add_argument("--which", default="student,lora")
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    seeds = (0, 1, 2)
    teacher_eval = None
    for which in args.which.split(","):
        recipe = RECIPE if which == "student" else LORA_RECIPE
        cfg = LCMConfig(**{**asdict(recipe), "steps": args.steps or recipe.steps})
        sd = minisd.load_mini_sd()
        t0 = time.time()
        batches = digit_batches(sd)
        ckpt = paths.cache_dir() / f"lcm_{which}_{cfg.seed}"
        if which == "student":
            student, _ = distill_lcm(sd, batches, cfg, run=train_config(cfg, "LCD: LCM student"), ckpt_dir=ckpt)
            w_eval = minisd.DEFAULT_W
        else:
            student, _ = distill_lcm_lora(sd, batches, cfg, run=train_config(cfg, "LCD: LCM-LoRA"), w=LORA_W,
                                          ckpt_dir=ckpt)
            w_eval = None
        secs = time.time() - t0
        results = {}
        for k in (1, 2, 4):
            results[f"lcm {k} steps"] = summary(evaluate(sd, student, args.n_eval, k, w_eval, seeds))
            print(which, k, results[f"lcm {k} steps"], flush=True)
        if teacher_eval is None:
            base = minisd.load_mini_sd()
            teacher_eval = summary(minisd.evaluate(base, args.n_eval, 25, minisd.DEFAULT_W, seeds))
            print("teacher 25-step DDIM", teacher_eval, flush=True)
        results["teacher DDIM 25 steps"] = teacher_eval
        info = {"command": f"{RECREATE} (steps {cfg.steps})", "recipe": asdict(cfg), "train_seconds": round(secs),
                "threads": torch.get_num_threads(), "evaluation": {"n": args.n_eval, "seeds": list(seeds),
                                                                    "w": minisd.DEFAULT_W, "mean_std": results}}
        folder = out / SHIPPED[which]
        (save_lcm if which == "student" else save_lcm_lora)(student, folder, info)
        print(f"saved {folder} ({secs:.0f} s of training)", flush=True)


if __name__ == "__main__":
    main()
