"""LCM-LoRA on Stable Diffusion (Luo et al. 2023, arXiv 2311.05556): notebook 06's latent consistency distillation,
the same loss code (distill.lcm.lcm_step -> lcm_loss -> lcm_target), training a LoRA adapter on an SD UNet.

    accelerate launch -m course_lib.scale.lcm_lora --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data laion-aesthetics-6.5plus/ --out runs/sd15/lcm-lora                                  (1 GPU)
    accelerate launch --multi_gpu --num_processes 8 -m course_lib.scale.lcm_lora \\
        --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 --data laion-aesthetics-6.5plus/ \\
        --out runs/sd15/lcm-lora                                                                    (8 GPUs, DDP)
    python -m course_lib.scale.lcm_lora --plan [--measure]        memory / time plan for 1 and 8 GPUs

The algorithm (LCD, Algorithm 1 of the LCM paper; the LoRA variant of diffusers' train_lcm_distill_lora_sd_wds.py):

    z_0 = VAE(x) * scaling_factor                       real image-caption pairs (--data), or see "prompts only"
    tau_{n+k} ~ the 50-step DDIM grid {19, 39, ..., 999}, k = 20;   tau_n = tau_{n+k} - k
    z_{n+k} = alpha z_0 + sigma eps
    z_hat_n = one DDIM step of the GUIDED teacher, x0 and eps both (1 + w) cond - w uncond  (uncond = "")
    L = Huber_c( f_theta(z_{n+k}, tau_{n+k}), stopgrad f_theta(z_hat_n, tau_n) ),   c = 0.001
    f = c_skip(tau) z + c_out(tau) x0_hat(eps_theta),  LCM's boundary scalings (s = 10, sigma_data = 0.5)

ONE UNet is in memory: the student is the UNet with its LoRA adapter (r = 64 on LCM-LoRA's target modules: attention,
feed-forward, resnet convolutions, time-embedding projections, down/upsamplers), the teacher the same UNet with the
adapter disabled (sd.adapter_disabled), the target the online student without gradients (no EMA copy), as
in diffusers' LoRA scripts. bf16 autocast, gradient checkpointing, a checkpoint every --ckpt-every iterations; a
killed run resumes by rerunning the same command; DDP over every process accelerate / torchrun starts.

The guidance weight w (fixed; LCM-LoRA has no w-embedding) is the course's w: the teacher is guided as
(1 + w) cond - w uncond, which is LCM's own omega (the released LCM-LoRA used omega = 7.5). diffusers' guidance_scale
is 1 + w: --w 7.5 distils the teacher's guidance_scale 8.5 into the adapter. Sample the LCM-LoRA WITHOUT
classifier-free guidance (guidance_scale <= 1 in diffusers, w=None in the course): the guidance is in its weights.

Data (exactly one source):
    --data SOURCE       image-caption pairs (webdataset .tar shards or .parquet, see course_lib.scale.data): the
                        images go through the teacher's own VAE once (the posterior mean, cached with the caption
                        embeddings in <out>/embeddings; diffusers' script draws a posterior sample each step).
                        LCD as published: z_0 are real latents.
    --prompts FILE      prompts only (a .txt / .jsonl / COCO captions file). The student then learns from the
                        TEACHER'S OWN SAMPLES: z_0 is the guided teacher's (same w) DPM-Solver++ sample from fresh noise,
                        made online each batch with the adapter disabled (--online-steps, default 8: 2 x 8 extra
                        UNet evaluations per sample, about 3x the cost of a step on real latents), or read from a
                        triplet cache (--triplets, python -m course_lib.scale.triplets, made once). The consistency
                        target is unchanged (one teacher DDIM step). What it cannot learn: anything the teacher's
                        8-step samples lack (real-image detail); z_0 never comes from pure noise alone.
    --embeddings DIR    a cache already built by python -m course_lib.scale.data (with --images: real latents).

Outputs in --out: embeddings/ (unless --embeddings), checkpoint/ (the engine's resumable state), lora/ with
pytorch_lora_weights.safetensors (pipe.load_lora_weights(out/lora)), lora_kohya.safetensors (kohya / ComfyUI /
A1111 keys), lcm.json (fixed w, LCM scalings, the base UNet's fingerprint) and base.json (the base pipeline's UNet
folder fingerprint, read by export.load_lora_checked), stage.json (the settings).

Sampling with plain diffusers (4 steps, no CFG):

    pipe = StableDiffusionPipeline.from_pretrained(base); pipe.load_lora_weights("runs/sd15/lcm-lora/lora")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe(prompt, num_inference_steps=4, guidance_scale=1.0)

`lcm_pipeline(base, lora)` does the same after checking that the LoRA was distilled on this base model, and
`generate(pipe, lora, prompts)` refuses a guidance scale the adapter was not distilled for.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import sd as sdlib
from ..checkpoint import CheckpointError
from ..distill import lcm
from ..recipes.lcm import LCM_JSON, save_lcm_lora
from ..train import Network, train_networks
from .common import (STAGE_FILE, CacheMismatch, SourceError, check_key, device_of, needed, parse, resolve_pipeline,
                     unet_record, write_json_atomic)
from .cost import LCM_LORA_MEASURE_COMMAND, lcm_lora_plan, measure_lcm_lora, print_lcm_lora_plan
from .export import load_lora_checked, save_kohya
from .methods import LCM_LORA_W, lcm_lora_step
from .stage import accelerator_if_distributed, add_training_args, dist_info, prepare_embeddings, train_config
from .triplets import Triplets, teacher_key

STAGE = "lcm-lora"
LORA_DIR = "lora"


# ----------------------------------------------------------------------------------------------------------------
# Checks on the inputs
# ----------------------------------------------------------------------------------------------------------------

def check_teacher(folder: Path) -> None:
    """A latent teacher comes with its own autoencoder and text encoder: LCM distils in that latent space."""
    missing = [p for p in ("vae", "text_encoder", "tokenizer", "scheduler") if not (folder / p).is_dir()]
    if missing:
        raise SourceError(f"the teacher {folder} has no {', '.join(m + '/' for m in missing)}: LCM distils in the "
                          "teacher's own latent space, so images become latents through ITS VAE and prompts become "
                          "embeddings through ITS text encoder. Pass the whole diffusers pipeline folder (or hub id) "
                          "the UNet belongs to, not the UNet alone")


def check_w(w: float) -> float:
    if not (math.isfinite(w) and w >= 0):
        raise SourceError(f"--w {w}: the guidance weight is the course's w >= 0 (teacher guided as (1 + w) cond - "
                          "w uncond; diffusers' guidance_scale = 1 + w). For diffusers' guidance_scale 8.5 pass --w 7.5")
    return float(w)


def check_guidance_scale(lora: str | os.PathLike, guidance_scale: float) -> None:
    """An LCM-LoRA has its guidance (the fixed w it was distilled at) in its weights and no w input: sampling it with
    classifier-free guidance on top (diffusers' guidance_scale > 1) uses a guidance it was never trained for."""
    meta = read_meta(lora)
    if guidance_scale > 1.0:
        w = meta["w_fixed"]
        raise ValueError(f"guidance_scale {guidance_scale:g} is outside what this LCM-LoRA was distilled for: it "
                         f"learned the teacher guided at the fixed w = {w:g} (diffusers' guidance_scale {1 + w:g}), "
                         "which is now inside its weights, and it has no guidance input. Sample it with "
                         "guidance_scale=1.0 (no classifier-free guidance); for another guidance distil again with --w")


def read_meta(lora: str | os.PathLike) -> dict:
    path = Path(lora) / LCM_JSON
    if not path.is_file():
        raise SourceError(f"{path} is missing: {lora} holds no LCM-LoRA made by course_lib.scale.lcm_lora "
                          "(or recipes.lcm.save_lcm_lora)")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def batches(mode: str, emb, tri, shape: tuple[int, ...]) -> Callable[[int, torch.Generator], dict]:
    """sample_batch(n, g) -> {"x": z_0 (n, 4, h, w), "cond": Cond} for "images" / "triplets"; "online": "x" is noise,
    which the step turns into the teacher's sample."""
    def sample(n: int, g: torch.Generator):
        if mode == "triplets":
            idx = torch.randint(tri.n, (n,), generator=g, device=g.device).cpu()
            _, x0, prompt = tri.rows(idx)
            return {"x": x0, "cond": emb.cond(prompt)}
        idx = torch.randint(emb.n, (n,), generator=g, device=g.device).cpu()
        if mode == "images":
            return {"x": emb.latents(idx), "cond": emb.cond(idx)}
        return {"x": torch.randn((n, *shape), generator=g, device=g.device).cpu(), "cond": emb.cond(idx)}

    return sample


# ----------------------------------------------------------------------------------------------------------------
# The student (its method step, methods.lcm_lora_step, is shared with cost.py's measurement)
# ----------------------------------------------------------------------------------------------------------------

def build(teacher: str | os.PathLike, rank: int, alpha: float | None, w: float, seed: int,
          device: torch.device | str = "cpu"):
    """(sd, student, fingerprint): the teacher pipeline's parts, an LCM-LoRA student on its UNet (rank `rank` on
    LCM-LoRA's target modules present in this UNet; lora_B = 0, so the student starts as the teacher), and the base
    UNet's fingerprint (sd.base_fingerprint, taken before the adapter exists)."""
    folder = resolve_pipeline(teacher)
    check_teacher(folder)
    sd = sdlib.load_sd(folder, device=device)
    fp = sdlib.base_fingerprint(sd.model.unet)
    sdlib.add_lora(sd.model, r=rank, alpha=alpha, target_modules=lcm.present_targets(sd.model.unet), seed=seed)
    return sd, lcm.LCMModel(sd.model, w_fixed=w), fp


# ----------------------------------------------------------------------------------------------------------------
# Export and loading
# ----------------------------------------------------------------------------------------------------------------

def export_lcm_lora(sd, student, out: str | os.PathLike, meta: dict | None = None) -> Path:
    """out/lora: diffusers' adapter file (peft keys), the kohya file, lcm.json (w, scalings, base fingerprint) and
    base.json (what export.load_lora_checked reads)."""
    folder = Path(out) / LORA_DIR
    save_lcm_lora(student, folder, {"original_inference_steps": lcm.ORIGINAL_STEPS, **(meta or {})})
    save_kohya(folder)
    base = Path(sd.reference["source"]) / "unet"
    write_json_atomic(folder / "base.json", {"base": sd.reference, **unet_record(base),
                                             "process": student.process.config(),
                                             "parameterization": student.denoiser.parameterization, "method": STAGE})
    return folder


def lcm_pipeline(base: str | os.PathLike, lora: str | os.PathLike) -> Any:
    """A diffusers StableDiffusionPipeline of `base` with the LCM-LoRA loaded (after checking that it was distilled
    on this base model) and LCMScheduler (with the LoRA's original_inference_steps)."""
    from diffusers import LCMScheduler

    meta = read_meta(lora)
    pipe = load_lora_checked(resolve_pipeline(base), lora)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config,
                                              original_inference_steps=meta.get("original_inference_steps", 50))
    return pipe


def generate(pipe: Any, lora: str | os.PathLike, prompts: str | Sequence[str], steps: int = 4, seed: int = 0,
             guidance_scale: float = 1.0, output_type: str = "pt") -> torch.Tensor:
    """`steps`-step LCMScheduler samples of an LCM-LoRA pipeline (lcm_pipeline); the guidance scale is checked."""
    check_guidance_scale(lora, guidance_scale)
    g = torch.Generator(device="cpu").manual_seed(seed)
    return pipe(list([prompts] if isinstance(prompts, str) else prompts), num_inference_steps=steps,
                guidance_scale=guidance_scale, generator=g, output_type=output_type).images


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------

def add_args(ap) -> None:
    needed(ap, "--teacher", help="SD pipeline (hub id in the local cache, or a diffusers folder): the base model")
    ap.add_argument("--data", default=None, help="image-caption pairs (webdataset .tar / .parquet shards)")
    ap.add_argument("--prompts", default=None, help="prompts only (.txt / .jsonl / COCO captions .json)")
    ap.add_argument("--embeddings", default=None, help="a cache from python -m course_lib.scale.data")
    ap.add_argument("--triplets", default=None, help="prompts only: teacher latents from course_lib.scale.triplets")
    ap.add_argument("--w", type=float, default=LCM_LORA_W, help="the fixed guidance weight (course w = LCM's omega; "
                    "diffusers' guidance_scale = 1 + w)")
    ap.add_argument("--original-steps", type=int, default=50, help="N of the DDIM grid (skipping step k = 1000 // N)")
    ap.add_argument("--distance", default="huber", choices=["huber", "l2"], help="huber: LCM's, c = 0.001")
    ap.add_argument("--online-steps", type=int, default=8, help="prompts only: DPM-Solver++ steps of the teacher")
    ap.add_argument("--resolution", type=int, default=512, help="--data: image size before the VAE")
    ap.add_argument("--shard-size", type=int, default=1024, help="embedding cache shard size")
    ap.add_argument("--cache-dtype", default="float16", help="storage dtype of the cached embeddings and latents")
    ap.add_argument("--plan", action="store_true", help="print the SD 1.5 memory / time plan and exit")
    ap.add_argument("--measure", action="store_true", help="with --plan: measure the step on this GPU")
    add_training_args(ap)


def main(argv: list[str] | None = None):
    if argv is None:
        argv = sys.argv[1:]
    if "--plan" in argv:                       # no teacher needed: parse only the plan's settings
        ap = argparse.ArgumentParser(prog="python -m course_lib.scale.lcm_lora --plan")
        ap.add_argument("--plan", action="store_true")
        ap.add_argument("--measure", action="store_true")
        ap.add_argument("--batch-size", type=int, default=12)
        ap.add_argument("--steps", type=int, default=4000)
        ap.add_argument("--lora", type=int, default=64)
        ap.add_argument("--online-steps", type=int, default=8, help="prompts only: the teacher's solver steps")
        ap.add_argument("--measure-online", action="store_true", help="with --measure: also time the prompts-only "
                        "step (else scaled from the real-latent step by its UNet forwards)")
        ap.add_argument("--tiny", action="store_true", help="with --measure: a tiny UNet (CPU smoke test)")
        ap.add_argument("--device", default="auto")
        p = ap.parse_args(argv)
        measured = online = None
        if p.measure:
            if device_of(p.device).type != "cuda" and not p.tiny:
                raise SystemExit(f"no GPU here: --measure needs one (an A100/H100-80GB): {LCM_LORA_MEASURE_COMMAND}. "
                                 "Without --measure the plan is printed as an estimate")
            measured = measure_lcm_lora(p.batch_size, p.lora, tiny=p.tiny, device=p.device)
            if p.measure_online:
                online = measure_lcm_lora(p.batch_size, p.lora, online_steps=p.online_steps, tiny=p.tiny,
                                          device=p.device)
        result = lcm_lora_plan(p.batch_size, p.steps, p.lora, p.online_steps, measured=measured,
                               measured_online=online)
        print_lcm_lora_plan(result)
        return result

    a = parse("lcm_lora", __doc__, add_args, argv)
    accelerator = accelerator_if_distributed()
    rank, world = dist_info()
    try:
        if a.lora <= 0:
            raise SourceError("--lora must be a rank > 0: this stage trains an LCM-LoRA (a full LCM student needs the "
                              "w-embedding UNet of distill.lcm.distill_lcm)")
        w = check_w(a.w)
        check_teacher(resolve_pipeline(a.teacher))
        emb, mode = prepare_embeddings(a, Path(a.out), accelerator)
        tri = None
        if mode == "triplets":
            tri = Triplets(a.triplets)
            want = teacher_key(a.teacher)
            check_key(tri.key, {k: want[k] for k in ("unet", "scheduler", "detail")}, "triplets", tri.folder / "index.json",
                      "The teacher latents must come from this teacher.")
        sd, student, fp = build(a.teacher, a.lora, a.lora_alpha, w, a.seed, device_of(a.device))
    except (SourceError, CacheMismatch) as e:
        raise SystemExit(f"error: {e}") from None
    unet = sd.model.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if mode == "images":
        lat = emb.latents(torch.tensor([0]))
        if lat.shape[1] != unet.config.in_channels:
            raise SystemExit(f"error: the cached latents have {lat.shape[1]} channels, the UNet takes "
                             f"{unet.config.in_channels}: they were not made by this teacher's VAE")
    lcfg = lcm.LCMConfig(steps=a.steps, batch=a.batch_size, lr=a.lr, original_steps=a.original_steps, w_min=w,
                         w_max=w, target_decay=0.0, distance=a.distance, grad_clip=a.grad_clip, warmup=a.warmup,
                         seed=a.seed, lora_rank=a.lora, ckpt_every=a.ckpt_every)
    online = {"w": w, "steps": a.online_steps} if mode == "online" else None
    extra = {"method": STAGE, "lcm_lora": {**asdict(lcfg), "w": w}, "base_fingerprint": fp,
             "data": {"mode": mode, "embeddings": emb.index["key"], "triplets": None if tri is None else tri.key,
                      "online": online}}
    out = Path(a.out)
    if rank == 0:
        write_json_atomic(out / STAGE_FILE, {"stage": STAGE, "settings": vars(a), "world_size": world,
                                             "data_mode": mode})
    net = Network(student, lr=a.lr, warmup=a.warmup, ema_decay=a.ema_decay, grad_clip=a.grad_clip,
                  save_frozen=False)
    t0 = time.perf_counter()
    try:
        done = train_networks({"student": net}, lcm_lora_step(sd, lcfg, online), batches(mode, emb, tri, shape),
                              train_config(a, f"LCD: LCM-LoRA ({mode})"), ckpt_dir=out / "checkpoint",
                              accelerator=accelerator, progress=not a.no_progress, extra_config=extra)
    except CheckpointError as e:
        if "base_fingerprint" in str(e):
            raise SystemExit(f"error: {out / 'checkpoint'} belongs to an LCM-LoRA of another base model: {e}. "
                             "Use another --out for this teacher") from None
        raise
    seconds = time.perf_counter() - t0
    if rank == 0:
        best = done.best("student")
        folder = export_lcm_lora(sd, best, out, {"stage": STAGE, "steps": done.step, "train_seconds": round(seconds, 1),
                                                 "world_size": world, "data_mode": mode, "w": w})
        print(f"{STAGE}: {done.step} steps in {seconds:.1f} s; LoRA in {folder}")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return done


if __name__ == "__main__":
    main()
