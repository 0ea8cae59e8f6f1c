"""DMD2 on Stable Diffusion (Yin et al., NeurIPS 2024, arXiv 2405.14867): notebook 09's method step
(distill.dmd.dmd_step -> dm_loss, fake_score_loss, the critic's GAN head), training a one- or four-step generator.

    accelerate launch -m course_lib.scale.dmd2 --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data laion-aesthetics-6.5plus/ --out runs/sd15/dmd2                                       (1 GPU)
    accelerate launch --multi_gpu --num_processes 8 -m course_lib.scale.dmd2 \\
        --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 --data laion-aesthetics-6.5plus/ \\
        --out runs/sd15/dmd2 --gen-steps 4                                                          (8 GPUs, DDP)

Three UNets (DMD2 Sec. 4 and its SD 1.5 recipe; distill/dmd.py has the equations):

    generator G     the teacher's UNet, trained (or a LoRA on it, --lora r), called at t = 999 (one step) or on the
                    trailing grid 999, 749, 499, 249 with backward simulation (--gen-steps 4)
    real score      the frozen teacher with classifier-free guidance (--real-w, the course's w: DMD2's
                    real_guidance_scale 1.75 is w = 0.75); with --lora the generator's own UNet, adapter disabled
    critic          the fake score (a trainable copy of the teacher, trained on generator samples by denoising) and
                    the GAN head on its bottleneck (mid block) features of re-noised latents: real-image latents
                    against generator samples, non-saturating loss (DMD2's cls_on_clean_image + diffusion GAN)

Each iteration updates the critic; every --ttur-th iteration also the generator (two time-scale update rule;
DMD2 SD 1.5: 10). Generator loss L_DM + lambda_G softplus(-D(G(z))) (lambda_G 1e-3); critic loss the fake score's
denoising loss + lambda_D [softplus(D(sg G(z))) + softplus(-D(x_real))] (lambda_D 1e-2); AdamW, gradient clipping at
10, bf16 autocast, gradient checkpointing. The engine (course_lib.train) checkpoints EVERY network and optimizer
(generator, critic with its head, their AdamW states, the RNG streams of all processes) every --ckpt-every
iterations: a killed run resumes by rerunning the same command, to the weights an uninterrupted run reaches.
DDP over every process accelerate / torchrun starts (the critic's methods run through DDP, so its gradients are
averaged); with --fsdp the engine shards the generator and the critic instead (PyTorch FSDP2: gradients and AdamW
states sharded, weights gathered for each phase; the same checkpoint format, so a run may switch between the two;
a multistep generator's backward-simulation depth is then drawn alike on every process). SD 1.5 fits one 80 GB GPU
without it (the cost table in docs/scale.md).

Data (one source):
    --data SOURCE       image-caption pairs (webdataset .tar / .parquet shards): latents through the teacher's own VAE
                        and caption embeddings, computed once into <out>/embeddings (course_lib.scale.data). The
                        captions condition the generator; the latents are the GAN's real samples.
    --embeddings DIR    a cache already built with images (python -m course_lib.scale.data --images ...).
    --prompts FILE      prompts only: DMD2 without its GAN term (--no-gan is then required: there are no real images).

Outputs in --out: embeddings/, checkpoint/ (the engine's resumable state), generator/ (a diffusers pipeline folder
with LCMScheduler, or with --lora the adapter: generator/lora/pytorch_lora_weights.safetensors + base.json), and
dmd2.json (the generator's timesteps). Sampling with plain diffusers:

    pipe = StableDiffusionPipeline.from_pretrained("runs/sd15/dmd2/generator")     # LCMScheduler inside, whose
    pipe(prompt, num_inference_steps=4, guidance_scale=0)      # original_inference_steps = 4: 999, 749, 499, 249

`dmd2_pipeline(run)` and `generate(pipe, run, prompts)` do the same with the timesteps the generator was trained on.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import sd as sdlib
from ..distill import dmd
from .common import (STAGE_FILE, CacheMismatch, SourceError, device_of, needed, parse, resolve_pipeline,
                     write_json_atomic)
from .export import export_student, load_lora_checked
from .methods import networks
from .stage import accelerator_if_distributed, add_training_args, dist_info, prepare_embeddings, train_config

STAGE = "dmd2"
GEN_DIR = "generator"
META = "dmd2.json"


def timesteps(gen_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The generator's integer timesteps: dmd.generator_times(k) in SD's map 1000 t - 1 (999 or 999, 749, 499, 249)."""
    return [int(round(num_train_timesteps * t)) - 1 for t in dmd.generator_times(gen_steps)]


def check_teacher(teacher: str | os.PathLike, method: str = "DMD2") -> Path:
    """The teacher's pipeline folder, after checking that it has its autoencoder and text encoder (`method` names the
    stage in the message: DMD2, Hyper-SD)."""
    folder = resolve_pipeline(teacher)
    missing = [p for p in ("vae", "text_encoder", "tokenizer", "scheduler") if not (folder / p).is_dir()]
    if missing:
        raise SourceError(f"the teacher {folder} has no {', '.join(m + '/' for m in missing)}: {method} trains in the "
                          "teacher's own latent space (real images through ITS VAE, prompts through ITS text encoder). "
                          "Pass the whole diffusers pipeline folder (or hub id), not the UNet alone")
    return folder


def build(teacher: str | os.PathLike, lora: int, alpha: float | None, gan: bool, seed: int,
          device: torch.device | str = "cpu"):
    """(sd, generator, real score, critic): the teacher pipeline's parts and methods.networks on its UNet."""
    sd = sdlib.load_sd(check_teacher(teacher), device=device)
    return (sd, *networks(sd.model, lora, alpha, gan, seed))


def batches(emb, images: bool, shape: tuple[int, ...]) -> Callable[[int, torch.Generator], dict]:
    """sample_batch(n, g) -> {"x": real latents (n, 4, h, w), "cond": Cond of their captions}. Prompts only: "x" is
    zeros, which only give the generator's sample shape (no GAN reads them)."""
    def sample(n: int, g: torch.Generator) -> dict:
        idx = torch.randint(emb.n, (n,), generator=g, device=g.device).cpu()
        x = emb.latents(idx) if images else torch.zeros(n, *shape)
        return {"x": x, "cond": emb.cond(idx)}

    return sample


# ----------------------------------------------------------------------------------------------------------------
# Export and loading
# ----------------------------------------------------------------------------------------------------------------

def export_generator(sd, G, out: str | os.PathLike, meta: dict) -> Path:
    """out/generator: a diffusers pipeline folder with LCMScheduler (full generator) or the LoRA adapter with
    base.json (export.export_student); out/dmd2.json: the generator's timesteps and the run's settings."""
    from diffusers import LCMScheduler

    out = Path(out)
    if G.lora is not None:
        folder = export_student(sd, G, out / GEN_DIR, {"method": STAGE, **meta})
    else:
        sched = LCMScheduler.from_config(sd.scheduler.config, original_inference_steps=len(meta["timesteps"]))
        folder = sdlib.save_student(sd, out / GEN_DIR, model=G, scheduler=sched)
    write_json_atomic(out / META, {"stage": STAGE, "lora": G.lora is not None, "folder": str(folder.relative_to(out)),
                                   "base": sd.reference, **meta})
    return folder


def read_meta(run: str | os.PathLike) -> dict:
    path = Path(run) / META
    if not path.is_file():
        raise SourceError(f"{path} is missing: {run} is not a finished run of course_lib.scale.dmd2")
    return json.loads(path.read_text())


def dmd2_pipeline(run: str | os.PathLike, base: str | os.PathLike | None = None) -> Any:
    """A diffusers StableDiffusionPipeline of the generator in `run` with LCMScheduler (a LoRA generator is loaded
    onto `base`, default the teacher it was trained on, after checking that it is that model)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    meta, run = read_meta(run), Path(run)
    if meta["lora"]:
        pipe = load_lora_checked(resolve_pipeline(base or meta["base"]["source"]), run / meta["folder"])
    else:
        pipe = StableDiffusionPipeline.from_pretrained(run / meta["folder"], safety_checker=None,
                                                       requires_safety_checker=False)
    # LCM's "original" schedule of k steps is exactly the generator's grid: timesteps 1000 (k - j) / k - 1
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=len(meta["timesteps"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, run: str | os.PathLike, prompts: str | Sequence[str], seed: int = 0,
             output_type: str = "pt") -> torch.Tensor:
    """Samples of the generator at the timesteps it was trained on (no classifier-free guidance: DMD2's real score
    was guided, so the guidance is in the generator)."""
    ts = read_meta(run)["timesteps"]
    g = torch.Generator(device="cpu").manual_seed(seed)
    return pipe(list([prompts] if isinstance(prompts, str) else prompts), num_inference_steps=len(ts), timesteps=ts,
                guidance_scale=0.0, generator=g, output_type=output_type).images


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------

def add_args(ap) -> None:
    needed(ap, "--teacher", help="SD pipeline (hub id in the local cache, or a diffusers folder)")
    ap.add_argument("--data", default=None, help="image-caption pairs (webdataset .tar / .parquet shards)")
    ap.add_argument("--embeddings", default=None, help="a cache from python -m course_lib.scale.data")
    ap.add_argument("--prompts", default=None, help="prompts only (needs --no-gan)")
    ap.add_argument("--gen-steps", type=int, default=1, choices=[1, 2, 4], help="generator steps (>1: backward "
                    "simulation on the trailing grid)")
    ap.add_argument("--real-w", type=float, default=0.75, help="guidance of the real score, the course's w "
                    "(diffusers' guidance_scale = 1 + w; DMD2 SD 1.5: 1.75)")
    ap.add_argument("--ttur", type=int, default=10, help="critic updates per generator update (DMD2 SD 1.5: 10)")
    ap.add_argument("--no-gan", action="store_true", help="DMD2 without its GAN term")
    ap.add_argument("--fsdp", action="store_true", help="shard the generator's and the critic's gradients and AdamW "
                    "states over the processes (FSDP2; weights gathered during each phase) instead of a whole copy on "
                    "each (DDP)")
    ap.add_argument("--lambda-g", type=float, default=1e-3, help="GAN weight in the generator loss")
    ap.add_argument("--lambda-d", type=float, default=1e-2, help="GAN weight in the critic loss")
    ap.add_argument("--lr-critic", type=float, default=None, help="default: --lr")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--resolution", type=int, default=512, help="--data: image size before the VAE")
    ap.add_argument("--shard-size", type=int, default=1024, help="embedding cache shard size")
    ap.add_argument("--cache-dtype", default="float16", help="storage dtype of the cached embeddings and latents")
    add_training_args(ap)
    ap.set_defaults(grad_clip=10.0, lr=1e-5)


def main(argv: list[str] | None = None):
    a = parse("dmd2", __doc__, add_args, argv)
    a.triplets = None
    accelerator = accelerator_if_distributed()
    rank, world = dist_info()
    gan = not a.no_gan
    try:
        if a.prompts and gan:
            raise SourceError("--prompts gives no real images, and DMD2's GAN term needs them: pass --data (image-"
                              "caption pairs) or --embeddings built with images, or train without the GAN (--no-gan)")
        if a.ttur < 1:
            raise SourceError(f"--ttur {a.ttur}: the critic is updated at least once per generator update")
        if a.fsdp and accelerator is None:
            raise SourceError("--fsdp shards over processes: launch with `accelerate launch --multi_gpu` or `torchrun`")
        check_teacher(a.teacher)
        emb, mode = prepare_embeddings(a, Path(a.out), accelerator)
        images = mode == "images"
        if gan and not images:
            raise SourceError(f"{emb.folder} holds text embeddings only; the GAN term needs real-image latents "
                              "(build the cache with images, or pass --no-gan)")
        sd, G, real, critic = build(a.teacher, a.lora, a.lora_alpha, gan, a.seed, device_of(a.device))
    except (SourceError, CacheMismatch) as e:
        raise SystemExit(f"error: {e}") from None
    unet = G.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    cached = tuple(emb.latents(torch.tensor([0])).shape[1:]) if images else shape
    if cached != shape:
        raise SystemExit(f"error: the cached latents have shape {cached}, the UNet makes {shape}: build the cache "
                         "with this teacher's VAE at its resolution")
    # DMD2's released optimizer (AdamW betas (0.9, 0.999), --weight-decay 0.01; dmd.DMD2_BETAS has the reasons),
    # not the course's short-run betas
    cfg = dmd.DMDConfig(ttur=a.ttur, real_w=a.real_w, gan=gan, lambda_g=a.lambda_g, lambda_d=a.lambda_d,
                        gen_steps=a.gen_steps, lr_g=a.lr, lr_critic=a.lr_critic or a.lr, betas=dmd.DMD2_BETAS,
                        weight_decay=a.weight_decay, warmup=a.warmup, grad_clip=a.grad_clip, ema_decay=a.ema_decay)
    meta = {"timesteps": timesteps(a.gen_steps), "gen_steps": a.gen_steps, "real_w": a.real_w, "gan": gan,
            "ttur": a.ttur}
    out = Path(a.out)
    if rank == 0:
        write_json_atomic(out / STAGE_FILE, {"stage": STAGE, "settings": vars(a), "world_size": world,
                                             "data_mode": mode})
    t0 = time.perf_counter()
    best, done = dmd.distill_dmd(G, batches(emb, images, shape), cfg,
                                 run=train_config(a, f"DMD2 ({'GAN' if gan else 'no GAN'}, {a.gen_steps}-step)"),
                                 ckpt_dir=out / "checkpoint", progress=not a.no_progress, accelerator=accelerator,
                                 networks=(G, real, critic), save_frozen=not a.lora,
                                 extra_config={"method": STAGE, **meta, "data_mode": mode})
    seconds = time.perf_counter() - t0
    if rank == 0:
        folder = export_generator(sd, best, out, {**meta, "steps": done.step, "updates": done.updates,
                                                  "train_seconds": round(seconds, 1), "world_size": world})
        print(f"{STAGE}: {done.step} iterations ({done.updates}) in {seconds:.1f} s; generator in {folder}")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return done


if __name__ == "__main__":
    main()
