"""Hyper-SD on Stable Diffusion (Ren et al. 2024, arXiv 2404.13686): notebook 11's trajectory segmented consistency
distillation and reward feedback (distill.hypersd.tscd_step -> tscd_loss_at -> tscd_target, reward_step ->
refl_loss: the same functions) training ONE LoRA that samples at 1, 2, 4 and 8 steps with diffusers' TCDScheduler.

One command per stage, in this order, each resumable by rerunning the same command, each starting from the LoRA the
previous stage exported (a stage whose previous output is missing says which command to run first):

    accelerate launch -m course_lib.scale.hypersd --stage tscd-8 --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data laion-aesthetics-6.5plus/ --out runs/sd15/hypersd                                    (1 GPU)
    ... --stage tscd-4, then tscd-2, then tscd-1 (the same arguments)
    ... --stage reward --reward image-reward          (ImageReward's weights in $COURSE_REWARD_MODELS: rewards.py)
    accelerate launch --multi_gpu --num_processes 8 -m course_lib.scale.hypersd --stage tscd-8 ...   (8 GPUs, DDP)

The stages (Hyper-SD Sec. 3.1-3.2; distill/hypersd.py has the equations):

    tscd-8, tscd-4,    TSCD with k segments: the student maps x_t to its segment's start s(t) by the DDIM jump
    tscd-2, tscd-1     f_theta(x_t, t, s); target f_theta-(x_hat_{t_n}, t_n, s) after one DDIM step of the guided
                       teacher; s = segment_start(t_{n+1}, k, grid). The grid is SD's integer timesteps 0, 24, 49,
                       ..., 999 (methods.tscd_grid, --intervals 40): every segment edge is a timestep TCDScheduler
                       visits at k steps with original_inference_steps = 40 (999, 749, 499, 249 at k = 4). Each
                       stage starts from the previous stage's LoRA.
    reward             ReFL (refl_loss): the student's one-step x0 from a late time, decoded by the VAE WITH its
                       gradient and scored by ImageReward or the LAION aesthetic predictor (scale.rewards, local
                       weights only: refused with what to download where they are missing, never replaced by the
                       course's mini-SD reward), plus the k = 1 TSCD term that keeps the student on the teacher's
                       trajectories (reward_step).

ONE UNet is in memory: the student is the UNet with its LoRA adapter (rank --lora on LCM-LoRA's target modules), the
teacher the same UNet with the adapter disabled and guided with the fixed --w (course w; diffusers' guidance_scale is
1 + w), the target theta^- the online student without gradients (methods.hypersd_step). Two departures from
notebook 11, both for that one UNet: every stage is taught by the ORIGINAL teacher (notebook 11's
TSCDConfig(chain_teacher=False); the chained teacher would be a second adapter), and there is no adversarial term
(its discriminator reads the teacher's layers through hooks the adapter-off teacher does not expose); the score-
distillation stage (DMD) is course_lib.scale.dmd2. bf16 autocast, gradient checkpointing, a checkpoint every
--ckpt-every iterations; DDP over every process accelerate / torchrun starts.

Outputs in --out: embeddings/ (shared by the stages), and per stage <stage>/ with checkpoint/ (the engine's
resumable state), stage.json, lora/ holding pytorch_lora_weights.safetensors (pipe.load_lora_weights), lora_kohya.
safetensors (kohya / ComfyUI / A1111 keys), base.json (the base UNet's fingerprint; a LoRA for another base is
refused) and hypersd.json (written last: the stage is finished). Sampling with plain diffusers, no CFG:

    pipe = StableDiffusionPipeline.from_pretrained(base); pipe.load_lora_weights("runs/sd15/hypersd/tscd-1/lora")
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps=40)   # = --intervals
    pipe(prompt, num_inference_steps=4, guidance_scale=1.0, eta=1.0)           # eta = TCD's gamma

(original_inference_steps = --intervals puts the sampler's timesteps on the segment edges; diffusers' default 50
visits 999, 759, 499, 259, a few timesteps off them.) `pipeline(base, lora)` does the same after checking the base
model (export.tcd_pipeline).

The SD 1.5 plan (ESTIMATES, not measured: each stage's UNet calls per sample priced with the per-call times derived
from the LCM-LoRA rows measured on an H200, docs/results/cost_table_h200.json: f = 3.9 ms for a no-grad forward,
G = 44.7 ms for the LoRA student's forward + backward, per sample; the rows are printed by
`python -m course_lib.scale.cost --hypersd-estimates docs/results/cost_table_h200.json` and by `cost --table` on a
GPU). At LCM-LoRA's global batch of 96 (12 per GPU; --grad-accum 8 on one GPU) and 1000 iterations per stage (a
planning figure: the paper publishes no schedule):

    stage                 UNet calls per sample      GPU-hours     wall, 1 GPU     wall, 8 GPUs (DDP, linear)
    tscd-8/4/2/1, each    3 f + G = 0.057 s          1.5           1.5 h           11 min
    reward                >= 4 f + 2 G = 0.105 s     >= 2.8        >= 2.8 h        >= 21 min
    all five              ~ 0.33 s                   >= 8.8        >= 8.8 h        >= 66 min

(the reward row counts the UNet only: the VAE decoder's and ImageReward's forward + backward come on top; the
one-off embedding cache of the data is not counted either). Memory:
one SD 1.5 UNet with a rank-64 LoRA in bf16 with gradient checkpointing, as LCM-LoRA (its row of the cost table); the
reward stage adds the VAE decoder's activations and the reward model. Commands (configs/hypersd.json holds the
settings, so only --stage, the data and the reward model are given):

    1 GPU:   for s in tscd-8 tscd-4 tscd-2 tscd-1; do
                 accelerate launch -m course_lib.scale.hypersd --stage $s --data laion-aesthetics-6.5plus/ --grad-accum 8
             done
             accelerate launch -m course_lib.scale.hypersd --stage reward --reward image-reward \
                 --data laion-aesthetics-6.5plus/ --grad-accum 8
    8 GPUs:  the same with `accelerate launch --multi_gpu --num_processes 8` and without --grad-accum 8
             (a stage must be resumed with the number of processes it started with)
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from .. import sd as sdlib
from ..checkpoint import CheckpointError
from ..distill import lcm
from ..distill.hypersd import RewardConfig
from ..sd import LORA_WEIGHTS
from ..train import Network, train_networks
from . import rewards
from .common import (STAGE_FILE, CacheMismatch, SourceError, device_of, needed, parse, resolve_pipeline, unet_record,
                     write_json_atomic)
from .dmd2 import check_teacher
from .export import check_lora_base, save_kohya, tcd_pipeline
from .lcm_lora import check_w
from .methods import HYPERSD_INTERVALS, LCM_LORA_W, hypersd_step, tscd_grid
from .stage import accelerator_if_distributed, add_training_args, dist_info, prepare_embeddings, train_config

STAGES = ("tscd-8", "tscd-4", "tscd-2", "tscd-1", "reward")
LORA_DIR = "lora"
META = "hypersd.json"           # written last into <stage>/lora: the stage is finished


def segments_of(stage: str) -> int:
    """k of a TSCD stage ("tscd-4" -> 4); the reward stage's TSCD term has k = 1."""
    return int(stage.split("-")[1]) if stage.startswith("tscd-") else 1


def previous(stage: str) -> str | None:
    i = STAGES.index(stage)
    return STAGES[i - 1] if i else None


def command_for(stage: str, argv: list[str]) -> str:
    """The command line of `stage` with the other arguments of argv (what to run first)."""
    args, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x == "--stage":
            skip = True
            continue
        if x.startswith("--stage="):
            continue
        if stage != "reward" and (x == "--reward" or x.startswith("--reward=")):
            skip = x == "--reward"
            continue
        args.append(x)
    return shlex.join(["python", "-m", "course_lib.scale.hypersd", "--stage", stage, *args])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def stage_input(root: Path, stage: str, teacher: Path, argv: list[str]) -> Path | None:
    """The LoRA folder the stage starts from (None for tscd-8), after checking that the previous stage finished and
    was trained on this teacher's UNet."""
    prev = previous(stage)
    if prev is None:
        return None
    folder = root / prev / LORA_DIR
    if not (folder / META).is_file() or not (folder / LORA_WEIGHTS).is_file():
        raise SourceError(f"stage {stage} starts from stage {prev}'s LoRA, and {folder} holds no finished one "
                          f"({META} is missing). Run it first: {command_for(prev, argv)}")
    check_lora_base(teacher, folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The student, its data, its export
# ----------------------------------------------------------------------------------------------------------------

def build(teacher: Path, rank: int, alpha: float | None, seed: int, init: Path | None,
          device: torch.device | str = "cpu"):
    """(sd, fingerprint): the teacher pipeline's parts with a LoRA student on sd.model, and the base UNet's
    fingerprint (taken before the adapter exists). tscd-8: a new adapter (rank `rank` on LCM-LoRA's target modules,
    lora_B = 0: the student starts as the teacher); later stages: the previous stage's adapter (its rank)."""
    sd = sdlib.load_sd(teacher, device=device)
    fp = sdlib.base_fingerprint(sd.model.unet)
    if init is None:
        sdlib.add_lora(sd.model, r=rank, alpha=alpha, target_modules=lcm.present_targets(sd.model.unet), seed=seed)
    else:
        sdlib.load_lora(sd.model, init)
        if sd.model.lora["r"] != rank:
            raise SourceError(f"{init} holds a rank-{sd.model.lora['r']} LoRA, this command asks for --lora {rank}: "
                              "every stage trains the same adapter; pass the first stage's --lora")
        sd.model.unet.requires_grad_(False)
        for name, p in sd.model.unet.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
        sd.model.to(device)
    return sd, fp


def batches(emb, keep: dict | None = None) -> Callable[[int, torch.Generator], dict]:
    """sample_batch(n, g) -> {"x": real latents (n, 4, h, w), "cond": Cond of their captions}; with `keep` the
    batch's caption strings go to keep["prompts"] (the reward model reads text; a Cond holds only embeddings)."""
    texts = emb.prompts() if keep is not None else None

    def sample(n: int, g: torch.Generator) -> dict:
        idx = torch.randint(emb.n, (n,), generator=g, device=g.device).cpu()
        if keep is not None:
            keep["prompts"] = [texts[i] for i in idx.tolist()]
        return {"x": emb.latents(idx), "cond": emb.cond(idx)}

    return sample


def export_lora(sd, student, folder: Path, meta: dict) -> Path:
    """folder/lora: diffusers' adapter file (peft keys), the kohya file, base.json (what export.check_lora_base reads)
    and hypersd.json (the stage's settings; written last)."""
    out = folder / LORA_DIR
    sdlib.save_peft_lora(student.unet, out)
    save_kohya(out)
    write_json_atomic(out / "base.json", {"base": sd.reference, **unet_record(Path(sd.reference["source"]) / "unet"),
                                          "process": student.process.config(),
                                          "parameterization": student.parameterization, "method": "hypersd"})
    write_json_atomic(out / META, meta)
    return out


def pipeline(base: str | os.PathLike, lora: str | os.PathLike) -> Any:
    """A diffusers StableDiffusionPipeline of `base` with a Hyper-SD LoRA (a stage's lora/ folder) and TCDScheduler
    on the training grid (original_inference_steps = the stage's --intervals: its timesteps at k steps are the
    segment edges), after checking that the LoRA was trained on this base (export.tcd_pipeline)."""
    from diffusers import TCDScheduler

    if not (Path(lora) / META).is_file():
        raise SourceError(f"{Path(lora) / META} is missing: {lora} holds no finished Hyper-SD stage")
    meta = json.loads((Path(lora) / META).read_text())
    pipe = tcd_pipeline(resolve_pipeline(base), lora)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps=meta["intervals"])
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------

def add_args(ap) -> None:
    ap.add_argument("--stage", required=True, choices=STAGES, help="which stage to run (in this order)")
    needed(ap, "--teacher", help="SD pipeline (hub id in the local cache, or a diffusers folder): the base model")
    ap.add_argument("--data", default=None, help="image-caption pairs (webdataset .tar / .parquet shards)")
    ap.add_argument("--embeddings", default=None, help="a cache with image latents (python -m course_lib.scale.data "
                    "--images)")
    ap.add_argument("--w", type=float, default=LCM_LORA_W, help="the teacher's fixed guidance weight (course w; "
                    "diffusers' guidance_scale = 1 + w)")
    ap.add_argument("--intervals", type=int, default=HYPERSD_INTERVALS, help="grid intervals over SD's timesteps "
                    "(each k must divide it)")
    ap.add_argument("--distance", default="l2", choices=["l2", "pseudo-huber", "huber"])
    ap.add_argument("--reward", default=None, choices=list(rewards.LOADERS), help="reward stage: the reward model")
    ap.add_argument("--reward-root", default=None, help="where its weights are (default $COURSE_REWARD_MODELS or "
                    "the cache's reward_models/)")
    ap.add_argument("--lambda-reward", type=float, default=RewardConfig.lambda_reward)
    ap.add_argument("--lambda-tscd", type=float, default=RewardConfig.lambda_tscd)
    ap.add_argument("--margin", type=float, default=None, help="ReFL's relu(margin - r) (default: -r)")
    ap.add_argument("--reward-t", type=float, nargs=2, default=list(RewardConfig.t_range),
                    help="course times of the one-step prediction (late: a little noise left)")
    ap.add_argument("--resolution", type=int, default=512, help="--data: image size before the VAE")
    ap.add_argument("--shard-size", type=int, default=1024, help="embedding cache shard size")
    ap.add_argument("--cache-dtype", default="float16", help="storage dtype of the cached embeddings and latents")
    add_training_args(ap)
    ap.set_defaults(lora=64)


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse("hypersd", __doc__, add_args, argv)
    a.prompts = a.triplets = None
    root = Path(a.out)
    folder = root / a.stage
    accelerator = accelerator_if_distributed()
    rank, world = dist_info()
    k = segments_of(a.stage)
    try:                                       # every check before anything is written
        if a.lora <= 0:
            raise SourceError("--lora must be a rank > 0: this stage trains a Hyper-SD LoRA")
        w = check_w(a.w)
        if a.intervals < 1 or a.intervals % k:
            raise SourceError(f"--intervals {a.intervals} is not divisible by k = {k}: the segment edges would not be "
                              "the k-step sampler's timesteps")
        if a.stage == "reward" and not a.reward:
            raise SourceError(f"the reward stage needs --reward ({' or '.join(rewards.LOADERS)}): its weights are "
                              "read from local files (course_lib.scale.rewards)")
        teacher = check_teacher(a.teacher, "Hyper-SD")
        init = stage_input(root, a.stage, teacher, argv)
        reward_model = None
        if a.stage == "reward":
            reward_model = rewards.load_sd_reward(a.reward, a.reward_root, device_of(a.device))
        emb, mode = prepare_embeddings(a, root, accelerator)
        if mode != "images":
            raise SourceError(f"{emb.folder} holds text embeddings only: TSCD starts from real latents x0 (pass "
                              "--data image-caption pairs, or --embeddings built with images)")
        sd, fp = build(teacher, a.lora, a.lora_alpha, a.seed, init, device_of(a.device))
        grid = tscd_grid(sd.model.process, a.intervals)
    except (SourceError, CacheMismatch, ValueError, rewards.RewardModelUnavailable) as e:
        raise SystemExit(f"error: {e}") from None
    keep: dict = {}
    reward = None
    rcfg = None
    if reward_model is not None:
        rcfg = RewardConfig(t_range=tuple(a.reward_t), lambda_reward=a.lambda_reward, lambda_tscd=a.lambda_tscd,
                            margin=a.margin, distance=a.distance)
        reward = (rcfg, rewards.sd_reward_fn(sd, reward_model, lambda cond: keep["prompts"]))
    step = hypersd_step(sd.model, k, grid, w, a.distance, reward)
    extra = {"method": "hyper-sd", "stage": a.stage, "k": k, "w": w, "distance": a.distance, "intervals": a.intervals,
             "grid_timesteps": [round(float(t) * sd.model.process.T) - 1 for t in grid], "base_fingerprint": fp,
             "init": None if init is None else file_digest(init / LORA_WEIGHTS),
             "reward": None if rcfg is None else {"model": a.reward, **asdict(rcfg)},
             "data": {"mode": mode, "embeddings": emb.index["key"]}}
    net = Network(sd.model, lr=a.lr, warmup=a.warmup, ema_decay=a.ema_decay, grad_clip=a.grad_clip,
                  save_frozen=False)
    t0 = time.perf_counter()
    desc = f"Hyper-SD {a.stage}" + (f" ({a.reward})" if a.reward and a.stage == "reward" else "")
    try:
        done = train_networks({"student": net}, step, batches(emb, keep if reward else None), train_config(a, desc),
                              ckpt_dir=folder / "checkpoint", accelerator=accelerator, progress=not a.no_progress,
                              extra_config=extra)
    except CheckpointError as e:
        raise SystemExit(f"error: {folder / 'checkpoint'} was written by another run of this stage: {e}. Use another "
                         "--out for other settings, another teacher or a retrained previous stage") from None
    seconds = time.perf_counter() - t0
    if rank == 0:                  # stage.json after the checkpoint's check: a refused rerun overwrites nothing
        write_json_atomic(folder / STAGE_FILE, {"stage": a.stage, "settings": vars(a), "world_size": world,
                                                "init": None if init is None else str(init)})
        out = export_lora(sd, done.best("student"), folder, {**extra, "steps": done.step, "world_size": world,
                                                            "train_seconds": round(seconds, 1)})
        print(f"{a.stage}: {done.step} steps in {seconds:.1f} s; LoRA in {out}")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return done


if __name__ == "__main__":
    main()
