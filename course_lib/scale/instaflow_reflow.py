"""InstaFlow stage 1: conditional reflow of Stable Diffusion's UNet, read as a velocity (the 2-rectified flow).

    accelerate launch --multi_gpu --num_processes 8 -m course_lib.scale.instaflow_reflow \\
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
        --main_process_port 29500 --num_processes 16 -m course_lib.scale.instaflow_reflow ...
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 \
        -m course_lib.scale.instaflow_reflow ...

The engine refuses accelerate's FSDP / DeepSpeed plugins; its own FSDP2 path (TrainConfig(fsdp=True)) is offered by
the DMD2 stage (--fsdp). SD 1.5's UNet (0.86 B parameters) trains with DDP on 80 GB GPUs, which the configs assume.

Outputs in --out: checkpoint/ (the engine's resumable state), pipeline/ (full student: a diffusers pipeline with the
flow scheduler, sd.FLOW_SCHEDULER) or lora/ (diffusers adapter + kohya file), stage.json (the settings).
"""
from __future__ import annotations

import torch

from .. import grids, samplers
from ..distill import reflow as rf
from ..guidance import cfg
from ..sd import adapter_disabled
from .common import CacheMismatch, SourceError, build_student, check_key, device_of, needed, parse
from .data import Embeddings
from .stage import add_training_args, run_training, triplet_batches
from .triplets import Triplets, noise, teacher_key


def main(argv: list[str] | None = None) -> None:
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

    a = parse("instaflow_reflow", __doc__, add, argv)
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
            # the teacher: the UNet without its adapter
            with torch.no_grad(), torch.autocast(eps.device.type, enabled=False), adapter_disabled(unet):
                x0 = samplers.dpm_solver_pp_2m(cfg(teacher, a.w), eps, grid, teacher.process, cond=c)
        c = c.drop(a.p_uncond, ctx.generator)
        return rf.rf_loss(ctx.nets["student"], x0, ctx.generator, eps=eps, cond=c)

    return run_training(a, "reflow", student, sd, loss, sample_batch, extra)


if __name__ == "__main__":
    main()
