"""What a Stable Diffusion distillation costs: peak memory and step time of one training step, measured on the real
SD 1.5 UNet architecture (configs/sd15_unet.json, random weights: no download), and the paper's budget derived from it.

    python -m course_lib.scale.cost --batch-size 8 --precision bf16 --grad-checkpointing      (on a GPU)
    python -m course_lib.scale.cost --tiny                                                   (CPU smoke: tiny UNet)
    python -m course_lib.scale.cost --table --out cost.json          (on a GPU: every row of the cost table in docs/scale.md)
    python -m course_lib.scale.cost --hypersd-estimates docs/results/cost_table_h200.json   (Hyper-SD's stages,
                                                     ESTIMATED from a saved table's UNet call times; no GPU needed)

The step is stage 1's (the reflow loss distill.reflow.rf_loss on the UNet read as a velocity, 77 x 768 text
embeddings, 64 x 64 x 4 latents) through course_lib.train.train_networks (AdamW, grad clipping, EMA if asked), so it
costs what the stage scripts cost per step; a LoRA step (--lora r) freezes the UNet. Reported: peak GPU memory
(torch.cuda.max_memory_allocated), median seconds per step after --warmup steps, and from them the wall time and
GPU-hours of InstaFlow's SD 1.5 schedule (the model cards' iterations x global batch per stage; 199 A100-days in
the paper, data generation included, which is not measured here) on 1 and 8 GPUs of the kind measured, assuming
DDP scales linearly. On a CPU it runs at a tiny size and says that a GPU is needed for the real table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .. import sd as sdlib
from ..conditioning import Cond
from ..config import seeded
from ..distill import dmd, lcm
from ..distill import reflow as rf
from ..processes import RectifiedFlow, SDDiscrete
from ..train import Network, TrainConfig, train_networks
from .common import CONFIG_DIR, device_of, write_json_atomic
from .methods import LCM_LORA_W, hypersd_step, lcm_lora_step, networks, tscd_grid

# InstaFlow (SD 1.5): iterations x global batch per stage (model cards of XCLiu/2_rectified_flow_from_sd_1_5 and
# XCLiu/instaflow_0_9B_from_sd_1_5), and the paper's total in A100-days (data generation included)
INSTAFLOW_STAGES = {"reflow 1": (70_000, 64), "reflow 2": (25_000, 1024), "distill L2": (21_500, 1024),
                    "distill LPIPS": (18_000, 1024)}
INSTAFLOW_A100_DAYS = 199.2
TINY = dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=8, cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=32, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])


def unet_config(tiny: bool = False) -> dict:
    cfg = {k: v for k, v in json.loads((CONFIG_DIR / "sd15_unet.json").read_text()).items() if not k.startswith("_")}
    return {**cfg, **TINY} if tiny else cfg


def random_unet(tiny: bool = False):
    """SD 1.5's UNet2DConditionModel (or the tiny one) with random weights drawn under seed 0: no download."""
    from diffusers import UNet2DConditionModel

    with seeded(0):
        return UNet2DConditionModel(**unet_config(tiny))


def _n_params(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _random_sd15(tiny: bool, device: str | None) -> tuple[torch.device, torch.nn.Module, int, int, int]:
    """(device, random_unet(tiny), text length L = 77, text width D, latent size h): what every measurement builds."""
    cfg = unet_config(tiny)
    return device_of(device), random_unet(tiny), 77, cfg["cross_attention_dim"], cfg["sample_size"]


def _text_batches(h: int, L: int, D: int):
    """sample_batch(n, g) -> {"x": random latents (n, 4, h, h), "cond": random text (n, L, D), null text zeros}."""
    null = torch.zeros(1, L, D)
    return lambda n, g: {"x": torch.randn(n, 4, h, h, generator=g),
                         "cond": Cond(text=torch.randn(n, L, D, generator=g), null_text=null)}


def stamped(step, stamps: list[float], dev: torch.device, phase: str | None = None):
    """The step function with a timestamp (after the device's pending work) appended to `stamps` before each call,
    or before each call of network `phase` only: the differences of consecutive stamps are step times."""
    def wrapped(ctx, batch):
        if phase is None or ctx.phase == phase:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            stamps.append(time.perf_counter())
        return step(ctx, batch)

    return wrapped


def step_times(nets: dict, step, sample, cfg: TrainConfig, dev: torch.device, phase: str | None = None,
               frozen: dict | None = None) -> list[float]:
    """Seconds between consecutive calls of `step` (of network `phase` only, if given) over cfg.steps engine steps
    (train_networks, no progress bar), the device's peak-memory counter reset first."""
    stamps: list[float] = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    train_networks(nets, stamped(step, stamps, dev, phase), sample, cfg, frozen=frozen, progress=False)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def common_fields(dev: torch.device, tiny: bool, batch_size: int, precision: str, grad_checkpointing: bool,
                  lora: int) -> dict:
    """The fields every measurement reports: where, which UNet, the per-GPU batch and the settings, peak memory."""
    return {"device": _device_name(dev), "unet": "tiny (CPU smoke)" if tiny else "SD 1.5 (configs/sd15_unet.json)",
            "batch_size_per_gpu": batch_size, "precision": precision, "grad_checkpointing": grad_checkpointing,
            "lora_rank": lora,
            "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}


def measure(batch_size: int = 8, precision: str = "bf16", grad_checkpointing: bool = True, lora: int = 0,
            ema_decay: float = 0.0, steps: int = 6, warmup: int = 2, tiny: bool = False,
            device: str | None = None) -> dict:
    """Peak memory and step time of stage 1's training step (see the module docstring)."""
    dev, unet, L, D, h = _random_sd15(tiny, device)
    model = sdlib.SDDenoiser(unet, RectifiedFlow(), "velocity").to(dev)
    if lora:
        sdlib.add_lora(model, r=lora)
    null = torch.zeros(1, L, D)

    def sample(n, g):
        x = torch.randn(n, 4, h, h, generator=g)
        return torch.randn(n, 4, h, h, generator=g), x, Cond(text=torch.randn(n, L, D, generator=g), null_text=null)

    def loss(ctx, batch):
        eps, x0, c = batch
        return rf.rf_loss(ctx.nets["unet"], x0, ctx.generator, eps=eps, cond=c)

    times = step_times({"unet": Network(model, lr=1e-5, ema_decay=ema_decay, save_frozen=not lora)}, loss, sample,
                       TrainConfig(steps=steps + warmup + 1, batch_size=batch_size, precision=precision,
                                   grad_checkpointing=grad_checkpointing), dev)
    sec = statistics.median(times[warmup:])
    return {**common_fields(dev, tiny, batch_size, precision, grad_checkpointing, lora), "params": _n_params(unet),
            "trainable_params": _n_params(unet, trainable=True), "ema": ema_decay > 0, "latent": [4, h, h],
            "seconds_per_step": sec, "instaflow_budget": budget(sec / batch_size)}


# DMD2 (SD 1.5, tianweiy/DMD2 experiments/laion6.25): 39k iterations (20k-40k iteration runs) then a GAN stage of
# 2k, each at a global batch of 32 x 64 GPUs; the paper: "25 hours on 64 A100s" for the first stage (card section 4)
DMD2_SD15 = {"iterations": 39_000 + 2_000, "global_batch": 2048, "paper_gpus": 64, "paper_wall_hours": 25.0,
             "ttur": 10}


def measure_dmd2(batch_size: int = 4, precision: str = "bf16", grad_checkpointing: bool = True, lora: int = 0,
                 gan: bool = True, ttur: int = 10, iterations: int = 2, tiny: bool = False,
                 device: str | None = None) -> dict:
    """Peak memory and seconds per iteration of DMD2's training (course_lib.scale.dmd2: dmd.dmd_step through the
    engine) on three UNets of the SD 1.5 architecture with random weights (generator, critic = fake score + GAN head,
    frozen real score; with lora the generator is a LoRA and the real score its UNet without the adapter). Timed
    over whole rounds of `ttur` iterations (one generator update and ttur critic updates each), after one warm-up
    round; reported per iteration (a round's time / ttur)."""
    dev, unet, L, D, h = _random_sd15(tiny, device)
    G, real, critic = networks(sdlib.SDDenoiser(unet, SDDiscrete(), "eps").to(dev), lora, None, gan, seed=1)
    step = dmd.dmd_step(dmd.DMDConfig(ttur=ttur, gan=gan, real_w=0.75), G.process)
    nets = {"generator": Network(G, lr=1e-5, every=ttur, save_frozen=not lora), "critic": Network(critic, lr=1e-5)}
    cfg = TrainConfig(steps=ttur * (iterations + 1) + 1, batch_size=batch_size, precision=precision,
                      grad_checkpointing=grad_checkpointing)
    rounds = step_times(nets, step, _text_batches(h, L, D), cfg, dev, phase="generator", frozen={"teacher": real})
    sec = statistics.median(rounds[1:]) / ttur
    return {"method": "dmd2", **common_fields(dev, tiny, batch_size, precision, grad_checkpointing, lora),
            "params_unet": _n_params(unet), "trainable_generator": _n_params(G, trainable=True),
            "trainable_critic": _n_params(critic, trainable=True), "gan": gan, "ttur": ttur, "latent": [4, h, h],
            "seconds_per_iteration": sec, "dmd2_budget": dmd2_budget(sec, batch_size)}


def dmd2_budget(seconds_per_iteration: float, batch_size: int, gpus: tuple[int, ...] = (8, 64)) -> dict:
    """DMD2's SD 1.5 schedule at the measured seconds per iteration (batch_size per GPU), per GPU count: the paper's
    global batch is reached with gradient accumulation where the GPUs hold less."""
    b = DMD2_SD15
    gpu_hours = b["iterations"] * (b["global_batch"] / batch_size) * seconds_per_iteration / 3600
    return {"iterations": b["iterations"], "global_batch": b["global_batch"], "gpu_hours": gpu_hours,
            "wall_hours": {str(n): gpu_hours / n for n in gpus},
            "paper_gpu_hours": b["paper_gpus"] * b["paper_wall_hours"], "paper": "25 h on 64 A100s (39k iterations)"}


def budget(seconds_per_sample: float, gpus: tuple[int, ...] = (1, 8)) -> dict:
    """InstaFlow's SD 1.5 training schedule at the measured seconds per sample (training only), per GPU count."""
    samples = sum(it * b for it, b in INSTAFLOW_STAGES.values())
    gpu_hours = samples * seconds_per_sample / 3600
    return {"stages": {k: {"iterations": it, "global_batch": b} for k, (it, b) in INSTAFLOW_STAGES.items()},
            "samples": samples, "gpu_hours": gpu_hours,
            "wall_hours": {str(n): gpu_hours / n for n in gpus},
            "paper_a100_days": INSTAFLOW_A100_DAYS, "paper_a100_hours": INSTAFLOW_A100_DAYS * 24,
            "paper_wall_days_on_8_a100": INSTAFLOW_A100_DAYS / 8}


# The cost table of docs/scale.md: (method, batch/GPU, gradient checkpointing, LoRA rank, extra) per row. "reflow" is
# InstaFlow's stage 1 step, "dmd2" one DMD2 iteration (three UNets), "lcm-lora" scale.lcm_lora's step (extra: the
# online teacher's solver steps, 0 for real latents), "hypersd" scale.hypersd's TSCD step (k = 8; every k makes the
# same calls). All bf16 autocast with fp32 master weights.
TABLE_ROWS: tuple[tuple[str, int, bool, int, int], ...] = (
    ("reflow", 8, True, 0, 0), ("reflow", 8, False, 0, 0), ("reflow", 32, True, 0, 0), ("reflow", 32, False, 0, 0),
    ("reflow", 8, True, 64, 0),
    ("dmd2", 4, True, 0, 0), ("dmd2", 4, False, 0, 0), ("dmd2", 8, True, 0, 0), ("dmd2", 4, True, 64, 0),
    ("lcm-lora", 12, True, 64, 0), ("lcm-lora", 12, True, 64, 8), ("hypersd", 12, True, 64, 0))


def table(tiny: bool = False, device: str | None = None, rows=TABLE_ROWS, out: Path | None = None,
          progress: bool = True) -> list[dict]:
    """Measure every row of TABLE_ROWS in this process (one after the other; memory is released between rows). A row
    that runs out of GPU memory is recorded as such and the table goes on. With `out`, the JSON is rewritten after
    every row, so an interrupted table keeps its measured rows."""
    dev = device_of(device)
    results: list[dict] = []
    for method, bs, ckpt, lora, extra in tqdm(rows, desc="cost table", disable=not progress):
        key = {"method": method, "batch_size_per_gpu": bs, "grad_checkpointing": ckpt, "lora_rank": lora,
               "online_steps": extra}
        t0 = time.perf_counter()
        try:
            if method == "reflow":
                r = measure(bs, "bf16", ckpt, lora, tiny=tiny, device=device)
            elif method == "dmd2":
                r = measure_dmd2(bs, "bf16", ckpt, lora, tiny=tiny, device=device)
            elif method == "lcm-lora":
                r = measure_lcm_lora(bs, lora, "bf16", ckpt, online_steps=extra, tiny=tiny, device=device)
            elif method == "hypersd":
                r = measure_hypersd(bs, lora, "bf16", ckpt, tiny=tiny, device=device)
            else:
                raise ValueError(f"unknown method {method!r} in the cost table")
            r["seconds_per_sample"] = r.get("seconds_per_step", r.get("seconds_per_iteration")) / bs
            r = {**key, **r, "status": "ok"}
        except torch.cuda.OutOfMemoryError as e:
            r = {**key, "status": "out of memory", "error": str(e).splitlines()[0]}
        r["wall_seconds"] = time.perf_counter() - t0
        results.append(r)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if out is not None:
            write_json_atomic(Path(out), {"device": _device_name(dev), "torch": torch.__version__, "tiny": tiny,
                                          "rows": results})
    return results


# ----------------------------------------------------------------------------------------------------------------
# LCM-LoRA: the step measured, and the memory and time plan of `python -m course_lib.scale.lcm_lora --plan`
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

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config())
    return {"unet": _n_params(unet), "lora": lora_param_count(unet, rank, lcm.present_targets(unet))}


def measure_lcm_lora(batch_size: int = 12, rank: int = 64, precision: str = "bf16", grad_checkpointing: bool = True,
            online_steps: int = 0, steps: int = 5, warmup: int = 2, tiny: bool = False, device: str | None = None
            ) -> dict:
    """Peak memory and median seconds per step of the LCM-LoRA stage's training step (lcm_lora_step through the engine) on the
    SD 1.5 UNet architecture with random weights (tiny=True: a tiny UNet, the CPU smoke test), 77 x 768 text, 64 x 64
    latents; online_steps > 0 adds the prompts-only teacher sampling."""
    dev, unet, L, D, h = _random_sd15(tiny, device)
    model = sdlib.SDDenoiser(unet, SDDiscrete(), "eps").to(dev)
    sdlib.add_lora(model, r=rank, target_modules=lcm.present_targets(unet))
    student = lcm.LCMModel(model, w_fixed=LCM_LORA_W)
    inner = lcm_lora_step(SimpleNamespace(model=model), lcm.LCMConfig(w_min=LCM_LORA_W, w_max=LCM_LORA_W),
                          {"w": LCM_LORA_W, "steps": online_steps} if online_steps else None)
    rss0 = _rss_gib()
    times = step_times({"student": Network(student, lr=1e-4, save_frozen=False)}, inner, _text_batches(h, L, D),
                       TrainConfig(steps=steps + warmup + 1, batch_size=batch_size, precision=precision,
                                   grad_checkpointing=grad_checkpointing), dev)[warmup:]
    return {**common_fields(dev, tiny, batch_size, precision, grad_checkpointing, rank),
            "params": _n_params(unet), "trainable_params": _n_params(unet, trainable=True),
            "online_steps": online_steps, "seconds_per_step": sorted(times)[len(times) // 2],
            # on a CPU: the process's peak resident memory above what it held before the first step (the model
            # built), a rough stand-in for the training step's own memory (activations, optimizer, autocast copies)
            "cpu_step_rss_gib": None if dev.type == "cuda" or rss0 is None else _peak_rss_gib() - rss0}


def measure_hypersd(batch_size: int = 12, rank: int = 64, precision: str = "bf16", grad_checkpointing: bool = True,
                    k: int = 8, steps: int = 5, warmup: int = 2, tiny: bool = False, device: str | None = None) -> dict:
    """Peak memory and median seconds per step of scale.hypersd's TSCD stage step (methods.hypersd_step: the guided
    teacher with the adapter disabled, the online target, the LoRA student; k segments on methods.tscd_grid) through
    the engine, on the SD 1.5 UNet architecture with random weights (tiny=True: the CPU smoke test)."""
    dev, unet, L, D, h = _random_sd15(tiny, device)
    model = sdlib.SDDenoiser(unet, SDDiscrete(), "eps").to(dev)
    sdlib.add_lora(model, r=rank, target_modules=lcm.present_targets(unet))
    step = hypersd_step(model, k, tscd_grid(model.process), LCM_LORA_W)
    times = step_times({"student": Network(model, lr=1e-4, save_frozen=False)}, step, _text_batches(h, L, D),
                       TrainConfig(steps=steps + warmup + 1, batch_size=batch_size, precision=precision,
                                   grad_checkpointing=grad_checkpointing), dev)[warmup:]
    return {**common_fields(dev, tiny, batch_size, precision, grad_checkpointing, rank),
            "params": _n_params(unet), "trainable_params": _n_params(unet, trainable=True), "k": k,
            "seconds_per_step": sorted(times)[len(times) // 2]}


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


def lcm_lora_plan(batch_size: int = 12, steps: int = 4000, rank: int = 64, online_steps: int = 8, gpus: Sequence[int] = (1, 8),
         measured: dict | None = None, measured_online: dict | None = None) -> dict:
    """The memory and time plan of an SD 1.5 LCM-LoRA run: `steps` optimizer steps at a GLOBAL batch of
    8 x batch_size (one GPU: gradient accumulation 8), on 1 and 8 GPUs (DDP, assumed to scale linearly), for real
    latents (--data) and for prompts only (the online teacher, `online_steps` DPM-Solver++ steps: 2 more UNet
    forwards per solver step). Each data mode from its own measurement (measure_lcm_lora() on the GPU: `measured` for real
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


LCM_LORA_MEASURE_COMMAND = ("python -m course_lib.scale.lcm_lora --plan --measure --measure-online --batch-size 12   "
                   "(on one A100/H100-80GB)")
DATA_NAMES = {"images": "image-caption (--data)", "online": "prompts only (online teacher)"}


def print_lcm_lora_plan(p: dict) -> None:
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
        print(f"This is an estimate pending a GPU measurement: {LCM_LORA_MEASURE_COMMAND}")


# ----------------------------------------------------------------------------------------------------------------
# Hyper-SD on SD 1.5: ESTIMATES of its stages from the measured LCM-LoRA steps (no Hyper-SD step is timed here)
# ----------------------------------------------------------------------------------------------------------------

HYPERSD_STAGES = ("tscd-8", "tscd-4", "tscd-2", "tscd-1")       # python -m course_lib.scale.hypersd --stage ...
HYPERSD_PLAN = {"batch_per_gpu": 12, "global_batch": 96, "iterations": 1000}    # per 1000 iterations, LCM-LoRA's batch


def unet_call_times(rows: Sequence[dict]) -> dict:
    """Seconds per sample of one SD 1.5 UNet call, from the two measured LCM-LoRA rows of a cost table (r = 64, the
    same batch, real latents and the online teacher with k solver steps):

        f = (s_online - s_images) / (2 k)     a no-grad forward (the online teacher's CFG pairs: 2 k more of them)
        G = s_images - 3 f                    the LoRA student's forward + backward (with checkpointing): LCD's step
                                              is the teacher's CFG pair (2 f), the target (f) and the student (G)."""
    lcm_rows = {r["online_steps"]: r for r in rows if r.get("method") == "lcm-lora" and r.get("status") == "ok"}
    k = max(lcm_rows, default=0)
    if 0 not in lcm_rows or not k or lcm_rows[0]["batch_size_per_gpu"] != lcm_rows[k]["batch_size_per_gpu"]:
        raise ValueError("the Hyper-SD estimates need both measured LCM-LoRA rows of the cost table (real latents "
                         "and the online teacher, the same batch): run python -m course_lib.scale.cost --table on a "
                         "GPU")
    per = {n: r["seconds_per_step"] / r["batch_size_per_gpu"] for n, r in lcm_rows.items()}
    f = (per[k] - per[0]) / (2 * k)
    return {"forward_no_grad": f, "student_forward_backward": per[0] - 3 * f, "device": lcm_rows[0]["device"],
            "batch_size_per_gpu": lcm_rows[0]["batch_size_per_gpu"],
            "peak_memory_gib_lcm_lora": lcm_rows[0].get("peak_memory_gib")}


def hypersd_estimates(rows: Sequence[dict], gpus: Sequence[int] = (1, 8)) -> list[dict]:
    """ESTIMATED seconds per sample and GPU-hours per 1000 iterations (global batch 96: 12 per GPU x 8 GPUs, or
    gradient accumulation) of Hyper-SD's stages on SD 1.5 with a LoRA, from the UNet call times measured in the
    cost table (unet_call_times: f a no-grad forward, G a LoRA student's forward + backward). UNet calls per sample:

        tscd-8 ... tscd-1 (scale.hypersd's stages; every k: the segment count changes the targets, not the calls)
            the guided teacher's DDIM step 2f (the UNet with its adapter disabled), the target f (the online
            student without grad), the student G                                                   = 3f + G
            (LCD's step: the measured LCM-LoRA row itself)
        TSCD with the adversarial term (notebook 11's lambda_adv > 0; not in scale.hypersd): the re-noised student
            sample through the teacher's own features (LADD/PCM), G for the generator's gradient, 2f for the
            discriminator (fake detached, real)                                                    = 5f + 2G
        reward (ReFL, scale.hypersd --stage reward): the student's no-grad rollout to x0 f, its one-step x0 from
            a late timestep G, the k = 1 TSCD term 3f + G                                           = 4f + 2G
            the VAE decoder and the reward model (ImageReward: BLIP ViT-L) forward + backward come on top and are
            NOT measured: a lower bound

    A table with a measured "hypersd" row (measure_hypersd, on the device of the LCM-LoRA rows: `cost --table` on a
    GPU) gives the tscd-k rows its measured time instead (status "measured"); the other rows stay estimates. The
    paper publishes no schedule: scale these per-1000-iteration rows by the iterations a run takes."""
    u = unet_call_times(rows)
    timed = next((r for r in rows if r.get("method") == "hypersd" and r.get("status") == "ok"
                  and r.get("device") == u["device"]), None)
    f, G = u["forward_no_grad"], u["student_forward_backward"]
    plan = HYPERSD_PLAN
    calls = {"TSCD": (3 * f + G, "3 f + G"), "TSCD + adversarial": (5 * f + 2 * G, "5 f + 2 G"),
             "reward (ReFL), UNet part only": (4 * f + 2 * G, "4 f + 2 G + VAE decoder + reward model (not "
                                                              "measured: lower bound)")}
    out = []
    names = [(s, "TSCD") for s in HYPERSD_STAGES] + [("TSCD + adversarial term (any k; not in scale.hypersd)",
                                                      "TSCD + adversarial"), ("reward (ReFL)",
                                                                              "reward (ReFL), UNet part only")]
    for stage, kind in names:
        sec, formula = calls[kind]
        measured = timed is not None and kind == "TSCD"
        if measured:
            sec = timed["seconds_per_step"] / timed["batch_size_per_gpu"]
        gpu_hours = plan["iterations"] * plan["global_batch"] * sec / 3600
        out.append({"method": "hypersd", "stage": stage, "status": "measured" if measured else "estimate",
                    "estimate": not measured,
                    "unet_calls_per_sample": formula, "seconds_per_sample": sec,
                    "batch_size_per_gpu": plan["batch_per_gpu"], "global_batch": plan["global_batch"],
                    "iterations": plan["iterations"], "gpu_hours_per_1000_iterations": gpu_hours,
                    "wall_hours_per_1000_iterations": {str(n): gpu_hours / n for n in gpus},
                    "lower_bound": kind.startswith("reward"),
                    "basis": f"scale.hypersd's step measured on {u['device']} (batch {timed['batch_size_per_gpu']})"
                    if measured else f"UNet call times from the measured LCM-LoRA rows on {u['device']} (f = "
                                     f"{f * 1000:.1f} ms, G = {G * 1000:.1f} ms per sample)"})
    return out


def print_hypersd_estimates(est: list[dict]) -> None:
    rest = next(r for r in est if r["estimate"])
    timed = [r for r in est if not r["estimate"]]
    head = (f"the tscd-k rows MEASURED ({timed[0]['basis']}), the others ESTIMATES: {rest['basis']}" if timed else
            f"ESTIMATES, not measured: {rest['basis']}")
    print(f"Hyper-SD on SD 1.5 (LoRA), {head}; per 1000 iterations at a global batch of {est[0]['global_batch']}\n"
          "| stage | UNet calls per sample | s/sample | GPU-h per 1000 it. | wall h, 1 GPU | wall h, 8 GPUs |\n"
          "|---|---|---|---|---|---|")
    for r in est:
        lb = ">= " if r["lower_bound"] else ""
        w = r["wall_hours_per_1000_iterations"]
        print(f"| {r['stage']} ({r['status']}) | {r['unet_calls_per_sample']} | {lb}{r['seconds_per_sample']:.3f} | "
              f"{lb}{r['gpu_hours_per_1000_iterations']:.2f} | {lb}{w['1']:.2f} | {lb}{w['8']:.2f} |")


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _memory(res: dict) -> str:
    """A measurement's peak GPU memory for the printed tables."""
    return "n/a (CPU)" if res["peak_memory_gib"] is None else f"{res['peak_memory_gib']:.1f} GiB"


def print_table(results: list[dict]) -> None:
    """The cost table as markdown: one row per measurement, with the schedule each method's paper used."""
    print("| method | batch/GPU | checkpointing | LoRA | s/step | samples/s | peak memory | schedule at this speed |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in results:
        head = (f"| {r['method']}{' (online teacher, %d steps)' % r['online_steps'] if r['online_steps'] else ''} | "
                f"{r['batch_size_per_gpu']} | {'on' if r['grad_checkpointing'] else 'off'} | {r['lora_rank'] or '-'} | ")
        if r["status"] != "ok":
            print(head + f"{r['status']} | | | |")
            continue
        sec = r.get("seconds_per_step", r.get("seconds_per_iteration"))
        if r["method"] == "reflow":
            b = r["instaflow_budget"]
            sched = f"InstaFlow: {b['gpu_hours']:,.0f} GPU-h"
        elif r["method"] == "dmd2":
            b = r["dmd2_budget"]
            sched = f"DMD2: {b['gpu_hours']:,.0f} GPU-h"
        elif r["method"] == "hypersd":      # scale.hypersd's four TSCD stages, 1000 iterations each at 96
            sched = f"Hyper-SD plan, 4 TSCD stages: {4 * 1000 * 96 * sec / r['batch_size_per_gpu'] / 3600:,.1f} GPU-h"
        else:       # scale.lcm_lora's plan: 4000 steps at a global batch of 8 x 12
            sched = f"LCM-LoRA plan: {4000 * 96 * sec / r['batch_size_per_gpu'] / 3600:,.1f} GPU-h"
        print(head + f"{sec:.3f} | {r['batch_size_per_gpu'] / sec:.1f} | {_memory(r)} | {sched} |")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m course_lib.scale.cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="reflow", choices=["reflow", "dmd2"], help="reflow: InstaFlow's stage 1 "
                    "step; dmd2: DMD2's iteration (three UNets, course_lib.scale.dmd2)")
    ap.add_argument("--batch-size", type=int, default=None, help="per GPU (default 8 for reflow, 4 for dmd2)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--lora", type=int, default=0)
    ap.add_argument("--ema", action="store_true", help="keep an EMA (stage scripts do with --ema-decay > 0)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet (CPU smoke test)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    ap.add_argument("--table", action="store_true", help="measure every row of the cost table in docs/scale.md (TABLE_ROWS: "
                    "reflow, DMD2, LCM-LoRA and Hyper-SD's TSCD step at several batch sizes, checkpointing on and off); "
                    "--out keeps them")
    ap.add_argument("--only", default=None, metavar="METHODS", help="with --table: measure only these methods' rows "
                    "(comma-separated, e.g. lcm-lora,hypersd)")
    ap.add_argument("--hypersd-estimates", metavar="TABLE_JSON", default=None, help="print the ESTIMATED Hyper-SD "
                    "stage rows from a saved cost table (e.g. docs/results/cost_table_h200.json); no GPU needed")
    a = ap.parse_args(argv)
    if a.hypersd_estimates:
        est = hypersd_estimates(json.loads(Path(a.hypersd_estimates).read_text())["rows"])
        print_hypersd_estimates(est)
        return {"hypersd_estimates": est}
    dev = device_of(a.device)
    if dev.type != "cuda" and not a.tiny:
        raise SystemExit("no GPU here: the real SD 1.5 table needs one (an A100/H100 80GB). Run with --tiny for "
                         "the CPU smoke test of the measurement itself.")
    if a.table:
        keep = TABLE_ROWS if a.only is None else tuple(r for r in TABLE_ROWS if r[0] in a.only.split(","))
        if not keep:
            raise SystemExit(f"--only {a.only!r} names no row of the table; its methods: "
                             f"{', '.join(dict.fromkeys(r[0] for r in TABLE_ROWS))}")
        rows = table(a.tiny, a.device, rows=keep, out=Path(a.out) if a.out else None)
        print_table(rows)
        try:
            est = hypersd_estimates(rows)
        except ValueError as e:                     # a table without both LCM-LoRA rows
            print(f"no Hyper-SD estimates: {e}")
            est = []
        if est:
            print_hypersd_estimates(est)
        return {"device": _device_name(dev), "rows": rows, "hypersd_estimates": est}
    if a.method == "dmd2":
        res = measure_dmd2(a.batch_size or 4, a.precision, a.grad_checkpointing, a.lora, tiny=a.tiny, device=a.device)
    else:
        a.batch_size = a.batch_size or 8
        res = measure(a.batch_size, a.precision, a.grad_checkpointing, a.lora, 0.9999 if a.ema else 0.0, a.steps,
                      a.warmup, a.tiny, a.device)
    if a.out:
        write_json_atomic(Path(a.out), res)
    (_print_dmd2 if a.method == "dmd2" else _print_reflow)(res, a)
    if a.tiny:
        print(f"note: measured on a tiny UNet on the CPU: these numbers only test the measurement. A GPU is needed "
              f"for the real table (python -m course_lib.scale.cost{' --method dmd2' * (a.method == 'dmd2')} on an "
              "A100/H100).")
    return res


def _print_reflow(res: dict, a) -> None:
    b = res["instaflow_budget"]
    print(f"| device | UNet | batch/GPU | precision | checkpointing | LoRA | s/step | peak memory |\n|---|---|---|---|---|---|---|---|\n"
          f"| {res['device']} | {res['unet']} | {a.batch_size} | {a.precision} | {a.grad_checkpointing} | {a.lora or '-'} "
          f"| {res['seconds_per_step']:.3f} | {_memory(res)} |")
    print(f"InstaFlow's schedule ({b['samples']:,} training samples): {b['gpu_hours']:.0f} GPU-hours here; wall "
          f"{b['wall_hours']['1'] / 24:.1f} days on 1 GPU, {b['wall_hours']['8'] / 24:.1f} days on 8 "
          f"(paper: {b['paper_a100_days']} A100-days incl. data generation = {b['paper_wall_days_on_8_a100']:.1f} days on 8 A100s)")


def _print_dmd2(res: dict, a) -> None:
    b = res["dmd2_budget"]
    print(f"| device | method | UNets | batch/GPU | precision | checkpointing | generator LoRA | s/iteration | peak memory |"
          f"\n|---|---|---|---|---|---|---|---|---|\n| {res['device']} | DMD2 (TTUR {res['ttur']}, GAN {res['gan']}) | "
          f"{res['unet']} x 3 | {res['batch_size_per_gpu']} | {res['precision']} | {res['grad_checkpointing']} | "
          f"{res['lora_rank'] or '-'} | {res['seconds_per_iteration']:.3f} | {_memory(res)} |")
    print(f"DMD2's SD 1.5 schedule ({b['iterations']:,} iterations at a global batch of {b['global_batch']}): "
          f"{b['gpu_hours']:.0f} GPU-hours here; wall {b['wall_hours']['8']:.0f} h on 8 GPUs, {b['wall_hours']['64']:.0f} h "
          f"on 64 (paper: {b['paper']} = {b['paper_gpu_hours']:.0f} GPU-hours)")


if __name__ == "__main__":
    main()
