"""What the Stable Diffusion training stages share: the engine's settings on the command line, the process group of
a multi-process run, the data a stage trains on, and the train-then-export run of one student.

    add_training_args(ap)                  the engine's settings (--out, --steps, --batch-size, --lr, --lora, ...)
    train_config(a, desc)                  those settings as the engine's TrainConfig
    dist_info()                            (rank, world) from torchrun / accelerate environment variables
    accelerator_if_distributed()           an Accelerator when several processes were launched, else None
    triplet_batches(triplets, embeddings)  sample_batch(n, g) of InstaFlow's (noise, teacher latent, prompt) triplets
    prepare_embeddings(a, folder, acc)     the embedding cache of --data / --prompts / --embeddings and its data mode
    run_training(a, stage, student, ...)   train one student with the engine, write stage.json, export it

The config files, fingerprints and atomic files every module uses are in common.py.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..train import Network, TrainConfig, train_networks
from .common import STAGE_FILE, SourceError, check_key, needed, write_json_atomic
from .data import Embeddings, build_embeddings, embedding_key
from .export import export_student

EMBEDDINGS = "embeddings"               # the cache built in the run folder from --data / --prompts


def add_training_args(ap) -> None:
    """The engine's settings, shared by every SD training stage."""
    needed(ap, "--out", help="run folder (checkpoint/, the exported student, stage.json)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8, help="per process")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--ema-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: train the whole UNet)")
    ap.add_argument("--lora-alpha", type=float, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-progress", action="store_true")


def train_config(a, desc: str) -> TrainConfig:
    """The run's settings from a stage's arguments (its optimizer settings go on the Network)."""
    return TrainConfig(steps=a.steps, batch_size=a.batch_size, ckpt_every=a.ckpt_every, seed=a.seed, desc=desc,
                       precision=a.precision, grad_accum=a.grad_accum, grad_checkpointing=a.grad_checkpointing,
                       fsdp=getattr(a, "fsdp", False))


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun / accelerate launch (1 process otherwise)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def accelerator_if_distributed():
    """An Accelerator when several processes were launched (accelerate launch / torchrun), else None."""
    _, world = dist_info()
    if world == 1:
        return None
    from accelerate import Accelerator

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    return Accelerator(cpu=not torch.cuda.is_available())


def triplet_batches(triplets, embeddings) -> Callable[[int, torch.Generator], Any]:
    """sample_batch(n, g): n random triplets (with replacement, drawn with g) -> (eps, x0, Cond of their prompts)."""
    def sample(n: int, g: torch.Generator):
        idx = torch.randint(triplets.n, (n,), generator=g, device=g.device).cpu()
        eps, x0, prompt = triplets.rows(idx)
        return eps, x0, embeddings.cond(prompt)

    return sample


def prepare_embeddings(a, folder: Path, accelerator) -> tuple[Any, str]:
    """The embedding cache and the data mode: build <out>/embeddings from --data / --prompts (on rank 0; the other
    processes wait), or open --embeddings; check that the text encoder, tokenizer (and VAE) are the teacher's."""
    given = [x for x in (a.data, a.prompts, a.embeddings) if x]
    if len(given) != 1:
        raise SourceError("pass exactly one data source: --data (image-caption pairs), --prompts (a prompt file) or "
                          f"--embeddings (a cache from python -m course_lib.scale.data); got {len(given)}")
    if a.triplets and a.data:
        raise SourceError("--triplets are teacher latents for a prompts-only run; with --data the latents are the "
                          "real images' (drop one)")
    cache = Path(a.embeddings) if a.embeddings else Path(a.out) / EMBEDDINGS
    if not a.embeddings:
        rank, _ = dist_info()
        if rank == 0:
            build_embeddings(a.teacher, a.data or a.prompts, cache, images=bool(a.data), resolution=a.resolution,
                             shard_size=a.shard_size, batch_size=max(1, a.batch_size), device=a.device,
                             dtype=a.cache_dtype, progress=not a.no_progress)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    emb = Embeddings(cache)
    images = bool(emb.index.get("images"))
    want = embedding_key(a.teacher, images, emb.index["key"].get("resolution"))
    check_key(emb.index["key"], want, "embeddings" + (" and latents" if images else ""), cache / "index.json",
              "The captions and latents must come from the teacher's own text encoder and VAE: build them with "
              "this --teacher into another folder.")
    if images and a.triplets:
        raise SourceError(f"{cache} holds real-image latents; --triplets (teacher latents) would replace them")
    return emb, "images" if images else ("triplets" if a.triplets else "online")


def run_training(a, stage: str, student, sd, loss_fn: Callable, sample_batch: Callable, extra: dict) -> Any:
    """Train `student` with the engine (one Network "student"), then export it; returns the Trained result."""
    out = Path(a.out)
    accelerator = accelerator_if_distributed()
    rank, world = dist_info()
    if rank == 0:
        write_json_atomic(out / STAGE_FILE, {"stage": stage, "settings": vars(a), "world_size": world})
    net = Network(student, lr=a.lr, warmup=a.warmup, ema_decay=a.ema_decay, grad_clip=a.grad_clip,
                  save_frozen=not a.lora)
    t0 = time.perf_counter()
    done = train_networks({"student": net}, lambda ctx, batch: loss_fn(ctx, batch), sample_batch,
                          train_config(a, stage), ckpt_dir=out / "checkpoint", accelerator=accelerator,
                          progress=not a.no_progress, extra_config=extra)
    seconds = time.perf_counter() - t0
    if rank == 0:
        best = done.best("student")
        export_student(sd, best, out, meta={"stage": stage, "steps": done.step, "train_seconds": round(seconds, 1),
                                            "world_size": world, **extra})
        print(f"{stage}: {done.step} steps in {seconds:.1f} s; exported under {out}")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return done
