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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .common import (STAGE_FILE, CacheMismatch, SourceError, check_key, device_of, dist_info, unet_record,
                     model_key, needed, parse, resolve_pipeline, write_json_atomic)

STAGE = "lcm-lora"
EMBEDDINGS = "embeddings"               # the cache built in the run folder from --data / --prompts
LORA_DIR = "lora"
DEFAULT_W = 7.5                         # the released LCM-LoRA's fixed omega (= course w; guidance_scale 8.5)
DATA_MODES = ("images", "triplets", "online")


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
    from ..distill import lcm

    path = Path(lora) / lcm.LCM_JSON
    if not path.is_file():
        raise SourceError(f"{path} is missing: {lora} holds no LCM-LoRA made by course_lib.scale.lcm_lora "
                          "(or distill.lcm.save_lcm_lora)")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def prepare_embeddings(a, folder: Path, accelerator) -> tuple[Any, str]:
    """The embedding cache and the data mode: build <out>/embeddings from --data / --prompts (on rank 0; the other
    processes wait), or open --embeddings; check that the text encoder, tokenizer (and VAE) are the teacher's."""
    from .data import Embeddings, build_embeddings, embedding_key

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


def batches(mode: str, emb, tri, shape: tuple[int, ...]) -> Callable[[int, torch.Generator], tuple]:
    """sample_batch(n, g): "images" / "triplets" -> (z_0 (n, 4, h, w), Cond); "online" -> (noise, Cond): the step
    turns the noise into the teacher's sample."""
    def sample(n: int, g: torch.Generator):
        if mode == "triplets":
            idx = torch.randint(tri.n, (n,), generator=g, device=g.device).cpu()
            _, x0, prompt = tri.rows(idx)
            return x0, emb.cond(prompt)
        idx = torch.randint(emb.n, (n,), generator=g, device=g.device).cpu()
        if mode == "images":
            return emb.latents(idx), emb.cond(idx)
        return torch.randn((n, *shape), generator=g, device=g.device).cpu(), emb.cond(idx)

    return sample


# ----------------------------------------------------------------------------------------------------------------
# The student and the method step
# ----------------------------------------------------------------------------------------------------------------

def build(teacher: str | os.PathLike, rank: int, alpha: float | None, w: float, seed: int,
          device: torch.device | str = "cpu"):
    """(sd, student, fingerprint): the teacher pipeline's parts, an LCM-LoRA student on its UNet (rank `rank` on
    LCM-LoRA's target modules present in this UNet; lora_B = 0, so the student starts as the teacher), and the base
    UNet's fingerprint (distill.lcm.base_fingerprint, taken before the adapter exists)."""
    from .. import sd as sdlib
    from ..distill import lcm

    folder = resolve_pipeline(teacher)
    check_teacher(folder)
    sd = sdlib.load_sd(folder, device=device)
    fp = lcm.base_fingerprint(sd.model.unet)
    sdlib.add_lora(sd.model, r=rank, alpha=alpha, target_modules=lcm.present_targets(sd.model.unet), seed=seed)
    return sd, lcm.LCMModel(sd.model, w_fixed=w), fp


def lcm_lora_step(sd, lcfg, online: dict | None = None) -> Callable:
    """The method step: notebook 06's lcm.lcm_step (LoRA: teacher = the UNet with its adapter disabled, target = the
    online student without grad). online {"w", "steps"}: the batch holds noise, turned first into the guided
    teacher's DPM-Solver++ sample (adapter disabled, no grad): z_0 of the teacher's own distribution."""
    from .. import grids, samplers
    from ..distill import lcm
    from ..guidance import cfg
    from ..sd import adapter_disabled

    teacher, process = sd.model, sd.model.process
    grid = grids.default_grid(online["steps"], process) if online else None

    def step(ctx, batch):
        if online:
            eps, c = batch
            with torch.no_grad(), adapter_disabled(teacher):
                z0 = samplers.dpm_solver_pp_2m(lambda x, t: cfg(teacher, online["w"])(x, t, c), eps, grid, process)
            batch = (z0.to(eps.dtype), c)
        return lcm.lcm_step(ctx, batch, process, lcfg, lora=True)

    return step


# ----------------------------------------------------------------------------------------------------------------
# Export and loading
# ----------------------------------------------------------------------------------------------------------------

def export_lcm_lora(sd, student, out: str | os.PathLike, meta: dict | None = None) -> Path:
    """out/lora: diffusers' adapter file (peft keys), the kohya file, lcm.json (w, scalings, base fingerprint) and
    base.json (what export.load_lora_checked reads)."""
    from ..distill import lcm
    from .export import save_kohya

    folder = Path(out) / LORA_DIR
    lcm.save_lcm_lora(student, folder, {"original_inference_steps": lcm.ORIGINAL_STEPS, **(meta or {})})
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

    from .export import load_lora_checked

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
# The memory and time plan
# ----------------------------------------------------------------------------------------------------------------

# The estimate's assumptions (used only until a GPU measurement replaces them; each is printed with the plan)
A100_SECONDS_PER_SAMPLE_FORWARD = 0.012   # SD 1.5 UNet, 64x64 latents, bf16, batch >= 8, one A100-80GB: an assumption
#   from typical diffusers inference speeds (about 30 it/s for a CFG pair at 512 px), not a measurement
FORWARDS_PER_SAMPLE = {"teacher CFG pair": 2, "target f(z_hat_n)": 1, "student forward": 1,
                       "checkpoint recompute": 1, "backward (input grads; frozen base)": 2}
CLIP_L_TEXT_PARAMS = 123_060_480          # openai/clip-vit-large-patch14 text model (SD 1.5's text encoder)
SD_VAE_PARAMS = 83_653_863                # SD 1.5's AutoencoderKL
PAPER_LORA_PARAMS_SD15 = 67.5e6           # LCM-LoRA report: trainable parameters for SD 1.5
# measure(batch_size=1, rank=64, bf16, grad checkpointing) of the real SD 1.5 UNet on a 2-core AMD EPYC CPU (avx512_bf16),
# 2 threads: the process's peak resident memory rose by this much during the steps (LoRA grads + AdamW states,
# activations, the transient bf16 casts of the frozen weights). A rough stand-in until a GPU measurement.
CPU_BATCH1 = {"device": "2-core CPU (bf16, 2 threads)", "seconds_per_step": 24.3, "step_rss_gib": 1.77}


def lora_param_count(unet, rank: int, targets: Sequence[str]) -> int:
    """Parameters of a rank-r LoRA on `targets` (peft: Linear in->out gets r (in + out); Conv2d in->out with kernel
    k x k gets r in k^2 (lora_A, same kernel) + r out (lora_B, 1 x 1))."""
    n = 0
    for name, m in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, torch.nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            n += rank * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + rank * m.out_channels
    return n


def sd15_sizes(rank: int = 64) -> dict:
    """Parameter counts of SD 1.5's UNet (configs/sd15_unet.json, built on the meta device: no memory, no download)
    and of its LCM-LoRA at `rank`."""
    from diffusers import UNet2DConditionModel

    from ..distill import lcm
    from .cost import unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config())
    return {"unet": sum(p.numel() for p in unet.parameters()),
            "lora": lora_param_count(unet, rank, lcm.present_targets(unet))}


def measure(batch_size: int = 12, rank: int = 64, precision: str = "bf16", grad_checkpointing: bool = True,
            online_steps: int = 0, steps: int = 5, warmup: int = 2, tiny: bool = False, device: str | None = None
            ) -> dict:
    """Peak memory and median seconds per step of THIS stage's training step (lcm_lora_step through the engine) on the
    SD 1.5 UNet architecture with random weights (tiny=True: a tiny UNet, the CPU smoke test), 77 x 768 text, 64 x 64
    latents; online_steps > 0 adds the prompts-only teacher sampling."""
    from types import SimpleNamespace

    from .. import sd as sdlib
    from ..conditioning import Cond
    from ..distill import lcm
    from ..processes import SDDiscrete
    from ..train import Network, TrainConfig, train_networks
    from .cost import random_unet, stamped, unet_config

    dev = device_of(device)
    cfg = unet_config(tiny)
    unet = random_unet(tiny)
    model = sdlib.SDDenoiser(unet, SDDiscrete(), "eps").to(dev)
    sdlib.add_lora(model, r=rank, target_modules=lcm.present_targets(unet))
    student = lcm.LCMModel(model, w_fixed=DEFAULT_W)
    L, D, h = 77, cfg["cross_attention_dim"], cfg["sample_size"]
    null = torch.zeros(1, L, D)
    stamps: list[float] = []
    inner = lcm_lora_step(SimpleNamespace(model=model), lcm.LCMConfig(w_min=DEFAULT_W, w_max=DEFAULT_W),
                          {"w": DEFAULT_W, "steps": online_steps} if online_steps else None)

    def sample(n, g):
        return torch.randn(n, 4, h, h, generator=g), Cond(text=torch.randn(n, L, D, generator=g), null_text=null)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = _rss_gib()
    train_networks({"student": Network(student, lr=1e-4, save_frozen=False)}, stamped(inner, stamps, dev), sample,
                   TrainConfig(steps=steps + warmup + 1, batch_size=batch_size, precision=precision,
                               grad_checkpointing=grad_checkpointing), progress=False)
    times = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "unet": "tiny (CPU smoke)" if tiny else "SD 1.5 (configs/sd15_unet.json)",
            "params": sum(p.numel() for p in unet.parameters()),
            "trainable_params": sum(p.numel() for p in unet.parameters() if p.requires_grad),
            "batch_size_per_gpu": batch_size, "precision": precision, "grad_checkpointing": grad_checkpointing,
            "lora_rank": rank, "online_steps": online_steps, "seconds_per_step": sorted(times)[len(times) // 2],
            "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            # on a CPU: the process's peak resident memory above what it held before the first step (the model
            # built), a rough stand-in for the training step's own memory (activations, optimizer, autocast copies)
            "cpu_step_rss_gib": None if dev.type == "cuda" or rss0 is None else _peak_rss_gib() - rss0}


def _rss_gib() -> float | None:
    """This process's resident memory now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, AttributeError):
        return None


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20        # KiB on Linux


def plan(batch_size: int = 12, steps: int = 4000, rank: int = 64, online_steps: int = 8, gpus: Sequence[int] = (1, 8),
         measured: dict | None = None, measured_online: dict | None = None) -> dict:
    """The memory and time plan of an SD 1.5 LCM-LoRA run: `steps` optimizer steps at a GLOBAL batch of
    8 x batch_size (one GPU: gradient accumulation 8), on 1 and 8 GPUs (DDP, assumed to scale linearly), for real
    latents (--data) and for prompts only (the online teacher, `online_steps` DPM-Solver++ steps: 2 more UNet
    forwards per solver step). Each data mode from its own measurement (measure() on the GPU: `measured` for real
    latents or either mode, `measured_online` for the online teacher) when given, a mode without one scaled from the
    other by its count of UNet forwards (which overstates the online teacher's no-grad forwards: 17.8 s a step
    predicted from the real-latent step on an H200, 11.5 s measured); else an ESTIMATE from the assumptions above."""
    sizes = sd15_sizes(rank)
    gib = 2**30
    # autocast caches bf16 casts only of weights that require grad (the LoRA's); the frozen base is cast per use,
    # and those transient copies count with the activations
    fixed = {"UNet weights, fp32": sizes["unet"] * 4 / gib,
             "LoRA weights + grads + AdamW states, fp32": sizes["lora"] * 16 / gib,
             "text encoder + VAE, fp32": (CLIP_L_TEXT_PARAMS + SD_VAE_PARAMS) * 4 / gib}
    # activations per sample, roughly: the CPU run's step memory less the LoRA's grads and AdamW states (12 B each)
    act_per_sample = CPU_BATCH1["step_rss_gib"] - sizes["lora"] * 12 / gib
    units = {"images": sum(FORWARDS_PER_SAMPLE.values())}
    units["online"] = units["images"] + 2 * online_steps
    global_batch = 8 * batch_size
    own = {("online" if m.get("online_steps") else "images"): m for m in (measured, measured_online) if m}
    per_sample = {mode: m["seconds_per_step"] / m["batch_size_per_gpu"] for mode, m in own.items()}
    if own:
        first = next(iter(own.values()))
        per_forward = next(per_sample[m] / units[m] for m in own)
        source = (f"measured on {first['device']} (batch {first['batch_size_per_gpu']}/GPU, "
                  + ("both data modes)" if len(own) == 2 else
                     f"{'online teacher' if 'online' in own else 'real latents'}; the other data mode scaled by its "
                     "UNet forwards)"))
    else:
        per_forward = A100_SECONDS_PER_SAMPLE_FORWARD
        source = "ESTIMATE pending a GPU measurement"
    rows = []
    for mode in ("images", "online"):
        sec_sample = per_sample.get(mode, units[mode] * per_forward)
        for n in gpus:
            accum = max(1, global_batch // (batch_size * n))
            hours = steps * global_batch * sec_sample / n / 3600
            rows.append({"data": mode, "gpus": n, "batch_per_gpu": batch_size, "grad_accum": accum,
                         "global_batch": global_batch, "seconds_per_step": sec_sample * batch_size * accum,
                         "wall_hours": hours, "gpu_hours": hours * n})
    return {"source": source, "measured": measured, "measured_online": measured_online,
            "lora_params": sizes["lora"], "unet_params": sizes["unet"],
            "paper_lora_params": PAPER_LORA_PARAMS_SD15, "fixed_memory_gib": fixed,
            "fixed_memory_total_gib": sum(fixed.values()),
            "peak_memory_gib": max((m["peak_memory_gib"] or 0 for m in own.values()), default=None) or None,
            "activations_gib_rough": act_per_sample * batch_size, "activations_source": CPU_BATCH1,
            "forward_units_per_sample": units, "steps": steps, "rows": rows,
            "assumptions": {"A100 seconds per sample-forward": A100_SECONDS_PER_SAMPLE_FORWARD,
                            "forwards per sample": FORWARDS_PER_SAMPLE, "online_steps": online_steps}}


MEASURE_COMMAND = ("python -m course_lib.scale.lcm_lora --plan --measure --measure-online --batch-size 12   "
                   "(on one A100/H100-80GB)")
DATA_NAMES = {"images": "image-caption (--data)", "online": "prompts only (online teacher)"}


def print_plan(p: dict) -> None:
    print(f"SD 1.5 LCM-LoRA (r = 64 on LCM-LoRA's targets: {p['lora_params'] / 1e6:.1f} M trainable parameters; "
          f"the LCM-LoRA report: {p['paper_lora_params'] / 1e6:.1f} M; UNet {p['unet_params'] / 1e6:.0f} M)")
    print(f"time: {p['source']}")
    print("| data | GPUs | batch/GPU | grad accum | global batch | s/step | steps | wall time | GPU-hours |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in p["rows"]:
        print(f"| {DATA_NAMES[r['data']]} | {r['gpus']} | {r['batch_per_gpu']} | {r['grad_accum']} | "
              f"{r['global_batch']} | {r['seconds_per_step']:.2f} | {p['steps']} | {r['wall_hours']:.1f} h | "
              f"{r['gpu_hours']:.1f} |")
    print("memory per GPU (the same on 1 and 8 GPUs: DDP keeps a whole copy on each):")
    for k, v in p["fixed_memory_gib"].items():
        print(f"  {k}: {v:.2f} GiB")
    peak = p["peak_memory_gib"]
    if peak:
        print(f"  fixed total {p['fixed_memory_total_gib']:.1f} GiB; measured peak {peak:.1f} GiB")
    else:
        c = p["activations_source"]
        print(f"  fixed total {p['fixed_memory_total_gib']:.1f} GiB + activations, roughly "
              f"{p['activations_gib_rough']:.0f} GiB at batch {p['rows'][0]['batch_per_gpu']} (a CPU run at batch 1, "
              f"{c['device']}: the step's resident memory {c['step_rss_gib']:.2f} GiB less the LoRA's optimizer "
              f"state, times the batch): about {p['fixed_memory_total_gib'] + p['activations_gib_rough']:.0f} GiB, "
              "well inside 80 GB; the GPU's peak is not measured yet")
    if not p["measured"]:
        a = p["assumptions"]
        print(f"assumptions: {a['A100 seconds per sample-forward'] * 1000:.0f} ms per sample per SD 1.5 UNet forward "
              f"on an A100-80GB in bf16 (not measured); UNet forwards per sample: {a['forwards per sample']} "
              f"(+ 2 x {a['online_steps']} for the online teacher)")
        print(f"This is an estimate pending a GPU measurement: {MEASURE_COMMAND}")


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------

def add_args(ap) -> None:
    from .reflow import add_training_args

    needed(ap, "--teacher", help="SD pipeline (hub id in the local cache, or a diffusers folder): the base model")
    ap.add_argument("--data", default=None, help="image-caption pairs (webdataset .tar / .parquet shards)")
    ap.add_argument("--prompts", default=None, help="prompts only (.txt / .jsonl / COCO captions .json)")
    ap.add_argument("--embeddings", default=None, help="a cache from python -m course_lib.scale.data")
    ap.add_argument("--triplets", default=None, help="prompts only: teacher latents from course_lib.scale.triplets")
    ap.add_argument("--w", type=float, default=DEFAULT_W, help="the fixed guidance weight (course w = LCM's omega; "
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
    from ..checkpoint import CheckpointError
    from ..distill import lcm
    from ..train import Network, train_networks
    from .reflow import accelerator_if_distributed, train_config

    if argv is None:
        import sys
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
                raise SystemExit(f"no GPU here: --measure needs one (an A100/H100-80GB): {MEASURE_COMMAND}. "
                                 "Without --measure the plan is printed as an estimate")
            measured = measure(p.batch_size, p.lora, tiny=p.tiny, device=p.device)
            if p.measure_online:
                online = measure(p.batch_size, p.lora, online_steps=p.online_steps, tiny=p.tiny, device=p.device)
        result = plan(p.batch_size, p.steps, p.lora, p.online_steps, measured=measured, measured_online=online)
        print_plan(result)
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
            from .triplets import Triplets, teacher_key

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
