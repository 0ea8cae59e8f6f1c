"""InstaFlow stage 1: conditional reflow of Stable Diffusion's UNet, read as a velocity (the 2-rectified flow).

    accelerate launch --multi_gpu --num_processes 8 -m course_lib.scale.reflow \\
        --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 --embeddings runs/sd15/embeddings \\
        --triplets runs/sd15/triplets --out runs/sd15/2rf

The student starts from the teacher's weights, its output re-read as the velocity u = eps - x0
(sd.as_rectified_flow), and is trained with notebook 04's loss, the course's rectified-flow loss on the teacher's
coupling (distill.reflow.rf_loss with the paired noise; prompts dropped to "" with probability --p-uncond, as
distill.instaflow.conditional_reflow drops labels):

    L = || (eps - x0) - u_theta(x_t, t | prompt) ||^2,   x_t = (1 - t) x0 + t eps,   t ~ U(1e-3, 1)

through course_lib.train.train_networks (bf16 autocast, gradient checkpointing, EMA, checkpoints every --ckpt-every
iterations, resume by rerunning the same command, DDP over every process that accelerate / torchrun starts).

--lora r: a LoRA student for one GPU. ONE UNet is in memory: the student is the UNet with its adapter (velocity
reading), the teacher the same UNet with the adapter disabled (eps reading). Without --triplets the teacher makes
each batch's triplets online with --online (its guided ODE, --online-steps of DPM-Solver++): no triplet cache.

Several nodes (DDP over all their GPUs; every node runs the same command with its own --machine_rank):

    accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --main_process_ip node0 \
        --main_process_port 29500 --num_processes 16 -m course_lib.scale.reflow ...
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 \
        -m course_lib.scale.reflow ...

The engine refuses accelerate's FSDP / DeepSpeed plugins; its own FSDP2 path (TrainConfig(fsdp=True)) is offered by
the DMD2 stage (--fsdp). SD 1.5's UNet (0.86 B parameters) trains with DDP on 80 GB GPUs, which the configs assume.

Outputs in --out: checkpoint/ (the engine's resumable state), pipeline/ (full student: a diffusers pipeline with the
flow scheduler, sd.FLOW_SCHEDULER) or lora/ (diffusers adapter + kohya file), stage.json (the settings).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .common import (STAGE_FILE, CacheMismatch, SourceError, build_student, check_key, device_of, dist_info, needed, parse,
                     write_json_atomic)


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


def accelerator_if_distributed():
    """An Accelerator when several processes were launched (accelerate launch / torchrun), else None."""
    _, world = dist_info()
    if world == 1:
        return None
    from accelerate import Accelerator

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    return Accelerator(cpu=not torch.cuda.is_available())


def train_config(a, desc: str):
    """The run's settings from a stage's arguments (its optimizer settings go on the Network)."""
    from ..train import TrainConfig

    return TrainConfig(steps=a.steps, batch_size=a.batch_size, ckpt_every=a.ckpt_every, seed=a.seed, desc=desc,
                       precision=a.precision, grad_accum=a.grad_accum, grad_checkpointing=a.grad_checkpointing,
                       fsdp=getattr(a, "fsdp", False))


def triplet_batches(triplets, embeddings) -> Callable[[int, torch.Generator], Any]:
    """sample_batch(n, g): n random triplets (with replacement, drawn with g) -> (eps, x0, Cond of their prompts)."""
    def sample(n: int, g: torch.Generator):
        idx = torch.randint(triplets.n, (n,), generator=g, device=g.device).cpu()
        eps, x0, prompt = triplets.rows(idx)
        return eps, x0, embeddings.cond(prompt)

    return sample


def run_training(a, stage: str, student, sd, loss_fn: Callable, sample_batch: Callable, extra: dict) -> Any:
    """Train `student` with the engine (one Network "student"), then export it; returns the Trained result."""
    from ..train import Network, train_networks
    from .export import export_student

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


def main(argv: list[str] | None = None) -> None:
    from ..distill import reflow as rf
    from ..guidance import cfg
    from .. import grids, samplers
    from .data import Embeddings
    from .triplets import Triplets, noise, teacher_key

    def add(ap):
        needed(ap, "--teacher", help="SD pipeline (hub id or folder): the initialisation and the teacher")
        needed(ap, "--embeddings", help="text-embedding cache of the prompts (python -m course_lib.scale.data)")
        ap.add_argument("--triplets", default=None, help="triplet cache (python -m course_lib.scale.triplets)")
        ap.add_argument("--online", action="store_true", help="with --lora: no triplet cache, the teacher (the UNet "
                        "with its adapter disabled) makes each batch's triplets")
        ap.add_argument("--p-uncond", type=float, default=0.1, help="prompt dropout (keeps an unconditional velocity)")
        ap.add_argument("--w", type=float, default=2.0, help="online triplets: the teacher's guidance (course w)")
        ap.add_argument("--online-steps", type=int, default=8, help="online triplets: DPM-Solver++ steps")
        add_training_args(ap)

    a = parse("reflow", __doc__, add, argv)
    device = device_of(a.device)
    try:
        emb = Embeddings(a.embeddings)
        sd, student = build_student(a.teacher, a.lora, a.lora_alpha, a.seed, device)
        if a.online and not a.lora:
            raise SourceError("--online needs the teacher beside the student: the LoRA variant has it for free "
                              "(--lora r); the full reflow trains on a triplet cache (--triplets)")
        if not a.online and not a.triplets:
            raise SourceError("pass --triplets (python -m course_lib.scale.triplets), or --lora r --online")
        tri = None if a.online else Triplets(a.triplets)
        if tri is not None:
            want = teacher_key(a.teacher)
            check_key(tri.key, {k: want[k] for k in ("unet", "scheduler", "detail")}, "triplets", tri.folder / "index.json",
                      "The triplets must come from the teacher this flow starts from.")
    except (SourceError, CacheMismatch) as e:
        raise SystemExit(f"error: {e}") from None
    extra = {"method": "instaflow-reflow", "p_uncond": a.p_uncond, "lora": a.lora,
             "triplets": None if tri is None else tri.key}
    unet = student.unet
    teacher = sd.model                                  # the same UNet, read as eps; its adapter disabled below

    if tri is not None:
        sample_batch = triplet_batches(tri, emb)
    else:
        extra.update(online={"w": a.w, "steps": a.online_steps, "sampler": "dpmpp2m"})
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

        def sample_batch(n: int, g: torch.Generator):
            prompt = torch.randint(emb.n, (n,), generator=g, device=g.device).cpu()
            seeds = torch.randint(2**62, (n,), generator=g, device=g.device).tolist()
            return torch.stack([noise(s, [0], shape)[0] for s in seeds]), emb.cond(prompt)

    grid = grids.default_grid(a.online_steps, teacher.process)

    def loss(ctx, batch):
        if tri is not None:
            eps, x0, c = batch
        else:
            eps, c = batch
            with torch.no_grad(), torch.autocast(eps.device.type, enabled=False):
                unet.disable_adapters()
                try:                                    # the teacher: the UNet without its adapter
                    x0 = samplers.dpm_solver_pp_2m(lambda x, t: cfg(teacher, a.w)(x, t, c), eps, grid, teacher.process)
                finally:
                    unet.enable_adapters()
        c = c.drop(a.p_uncond, ctx.generator)
        return rf.rf_loss(ctx.nets["student"], x0, ctx.generator, eps=eps, cond={"cond": c})

    return run_training(a, "reflow", student, sd, loss, sample_batch, extra)


if __name__ == "__main__":
    main()
