"""InstaFlow stage 2: one-step distillation of the 2-rectified flow (notebook 04's instaflow.onestep_loss).

    python -m course_lib.scale.triplets --teacher runs/sd15/2rf/pipeline --embeddings runs/sd15/embeddings \\
        --out runs/sd15/pairs-2rf --count 100000 --w 0 --sampler euler --steps 25
    accelerate launch --multi_gpu --num_processes 8 -m course_lib.scale.instaflow_distill \\
        --init runs/sd15/2rf/pipeline --embeddings runs/sd15/embeddings --triplets runs/sd15/pairs-2rf \\
        --out runs/sd15/instaflow-l2 --distance l2
    ... then again from runs/sd15/instaflow-l2/pipeline with --distance perceptual (LPIPS, or Lap1 offline)

The student starts from the 2-RF and is trained at t = 1 only (the paper's t = 0):

    L = D( eps - u_theta(eps, 1 | prompt), x0' ),   x0' = ODE_2RF(eps | prompt)     (instaflow.onestep_loss)

D: "l2" on latents (the paper's first stage); "lpips" (the paper's second stage) on images decoded by the frozen
VAE, which needs the lpips package and its weights; "lap1", the course's documented offline substitute
(distances.laplacian_pyramid_l1), also on decoded images; "perceptual": LPIPS when it loads, Lap1 otherwise (the
run says which, and records it in stage.json and the checkpoint). The 2-RF's pairs carry no extra guidance (--w 0): the
teacher's triplets already did (see distill.instaflow). The student exports as a pipeline whose stock scheduler
takes one Euler step (sd.FLOW_SCHEDULER): StableDiffusionPipeline(..., num_inference_steps=1, guidance_scale=1).
"""
from __future__ import annotations

import torch

from .. import distances
from ..distill import instaflow
from .common import CacheMismatch, SourceError, build_student, check_key, device_of, needed, parse
from .data import Embeddings
from .stage import add_training_args, run_training, triplet_batches
from .triplets import Triplets, teacher_key


def main(argv: list[str] | None = None) -> None:
    def add(ap):
        needed(ap, "--init", help="the 2-RF's exported pipeline (stage 1's --out/pipeline), or stage 2a's")
        needed(ap, "--embeddings")
        needed(ap, "--triplets", help="the 2-RF's own pairs (python -m course_lib.scale.triplets --teacher <2-RF> --w 0)")
        ap.add_argument("--distance", default="l2", choices=["l2", "lap1", "lpips", "perceptual"],
                        help="perceptual: LPIPS when the lpips package and its weights load, else Lap1 (said so)")
        add_training_args(ap)

    a = parse("instaflow_distill", __doc__, add, argv)
    device = device_of(a.device)
    try:
        emb = Embeddings(a.embeddings)
        tri = Triplets(a.triplets)
        want = teacher_key(a.init)
        check_key(tri.key, {k: want[k] for k in ("unet", "scheduler", "detail")}, "pairs", tri.folder / "index.json",
                  "Stage 2 trains on the pairs of the flow it starts from: make them with --teacher <that flow>.")
        sd, student = build_student(a.init, a.lora, a.lora_alpha, a.seed, device)
    except (SourceError, CacheMismatch) as e:
        raise SystemExit(f"error: {e}") from None
    if a.distance == "perceptual":
        try:
            distances.lpips_distance()
            a.distance = "lpips"
        except RuntimeError as e:
            print(f"note: {e}\nUsing the course's offline substitute, the Laplacian-pyramid L1 (lap1).")
            a.distance = "lap1"
    if a.distance == "l2":
        distance = distances.l2
    else:
        base = distances.get(a.distance)
        vae = sd.vae

        def distance(pred, target):                       # on images decoded by the frozen VAE
            with torch.no_grad():
                ref = vae.decode(target)
            return base(vae.decode(pred), ref)

    def loss(ctx, batch):
        eps, x0, c = batch
        return instaflow.onestep_loss(ctx.nets["student"], eps, x0, c, distance)

    return run_training(a, "distill", student, sd, loss, triplet_batches(tri, emb),
                 {"method": "instaflow-distill", "distance": a.distance, "lora": a.lora, "triplets": tri.key})


if __name__ == "__main__":
    main()
