"""MeanFlow on the mini Stable Diffusion (notebook 14, issue 26): a flow-map LoRA distilled from the guided teacher,
served by a plain diffusers StableDiffusionPipeline.

The choice. MeanFlow (distill.flowmap) was the best of the three flow-map methods on digits (recipes.flowmap_digits:
best at two steps, tied with sCT at one; sCD failed there), so it is the one carried to the mini SD:

    student     the mini SD's UNet with a zero-initialised timestep_cond projection (distill.lcm.lcm_student's
                cond_proj, sd.SDFlowMap: the step d = 1000 (t - s) of X(x_t, t -> s) reaches the UNet as
                sd.step_cond(d), the embedding LCM gives its w) and a LoRA (LCM-LoRA's target modules); only the LoRA
                and the projection train. At the start it is the teacher's DDIM step for every (t, s).
    teacher     the mini SD itself (the same UNet, adapter off, no step input) with classifier-free guidance at
                w = minisd.DEFAULT_W: its guided velocity is MeanFlow's v, so the student learns the guided flow map
                and samples with one UNet call per step (no CFG pair).
    time        MeanFlow is written on the rectified flow; the student is read in rf time (flowmap.RFFlowMap over
                reflow.RFView, which maps SD's discrete VP schedule to rf time of the same SNR). SD's t = 1 has
                alpha > 0, so its rf time ends below 1 (`T_MAX`, about 0.94): the (t, r) pairs are drawn in (0, T_MAX]
                (MeanFlowConfig.t_max).
    tangent     du/dt by the finite difference of step flowmap.SD_FD_H (flowmap's docstring: why the SD path
                takes it).
    serving     a plain StableDiffusionPipeline (the mini SD's, DDIMScheduler with trailing timesteps and
                set_alpha_to_one) whose UNet is the student's: for a UNet with time_cond_proj_dim the pipeline runs no
                CFG pair and feeds timestep_cond = Emb(guidance_scale - 1), the same embedding as sd.step_cond of
                d / 1000; on the trailing grid of n steps every step is d = 1000 / n, so guidance_scale = 1 + 1 / n
                feeds the step, and the DDIM step of each prediction is the flow-map jump. For n dividing 1000
                (1, 2, 4, 5, 8, ...) the pipeline is the course's samplers.flow_map on grids.sd_grid(n, "trailing")
                (`pipeline_sample`, tests/test_flowmap_minisd.py).

The other option (a consistency-type flow map, sCD in TrigFlow, a plain LoRA sampled by TCDScheduler) was kept in
reserve in case MeanFlow did not fit the CPU budget; the pilots measured that it did (under a second per update of
batch 32 on one loaded thread).

Measured (data/flowmap/mini-sd-meanflow/README.md, docs/results/flowmap_minisd.json; 200 prompts x 3 seeds): 100
updates (74 s); at 2 and 4 jumps the held-out KID is within the 25-step guided teacher's spread and below the
teacher's DDIM at the same step count, digit adherence within 2.5 points of the teacher's, colour adherence 16-19
points below it; 1 jump misses the spread. Longer runs drift away from the flow map (400 updates: one-step KID 1.54),
so the recipe stops early.

    flow_map_lora(sd)            the student before training: sd.SDFlowMap with LoRA and zero step projection
    guided_teacher(student, w)   the teacher of a student: its own UNet with the adapter off, guided
    train_minisd(sd, cfg, ...)   MeanFlow distillation through the engine (train_networks; resumable)
    save / load / load_shipped   the LoRA (diffusers' format), the step projection (safetensors), flowmap.json
    sample(sd, student, ...)     the course's sampler: samplers.flow_map on SD's trailing grid, images in [-1, 1]
    pipeline / pipeline_sample   the plain diffusers pipeline that serves the shipped LoRA
    evaluate(sd, student, ...)   minisd.evaluate_images (held-out KID, digit and colour adherence), as recipes.lcm

    python -m course_lib.recipes.flowmap_minisd train-minisd --out data/flowmap/mini-sd-meanflow --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import grids, minisd, paths, samplers
from ..conditioning import Cond, with_end_time
from ..distill import flowmap as fm
from ..distill.lcm import W_EMBED_DIM, lcm_student, present_targets
from ..distill.reflow import RFView
from ..guidance import cfg as guided
from ..predictions import Pred
from ..sd import AdapterOff, SDFlowMap, add_lora, base_fingerprint, load_lora, require_codec, save_peft_lora
from ..train import Network, Trained, TrainConfig, train_networks

FLOWMAP_JSON = "flowmap.json"
STEP_PROJ = "step_proj.safetensors"        # the UNet's time_embedding.cond_proj.weight (the step's projection)
STEP_DIM = W_EMBED_DIM                       # width of the step embedding (LCM's w-embedding width)
RECREATE = "python -m course_lib.recipes.flowmap_minisd train-minisd --out data/flowmap/mini-sd-meanflow --threads 2"


def t_max(process) -> float:
    """The rf time of SD's t = 1 (sigma / (alpha + sigma) there): where MeanFlow's times end on the mini SD."""
    a, s = process.alpha(torch.tensor(1.0, dtype=torch.float64)), process.sigma(torch.tensor(1.0, dtype=torch.float64))
    return float(s / (a + s))


@dataclass
class MiniSDConfig:
    """The mini-SD MeanFlow run: the engine's budget and the LoRA; the method's settings in `meanflow`."""
    steps: int = 100                # early stopped: the one-step student is best near 100 updates and then gets
    batch: int = 32                 # worse (400 updates: held-out KID 1.54 against 0.93 for the guided teacher's
                                    # one-step DDIM; the measured curve in data/flowmap/mini-sd-meanflow/README.md)
    seed: int = 0
    rank: int = 8
    w: float = minisd.DEFAULT_W
    grad_clip: float = 1.0
    ckpt_every: int = 50
    # the papers' lr 1e-4 (1e-3, LCM-LoRA's, made the one-step student worse than its start in the pilot), three
    # quarters of the pairs with r < t (the paper's quarter learned the jumps too slowly in a few hundred updates),
    # no EMA (a short run's EMA lags behind); data/flowmap/mini-sd-meanflow/README.md has the pilot's numbers
    meanflow: fm.MeanFlowConfig = field(default_factory=lambda: fm.MeanFlowConfig(
        lr=1e-4, ema_decay=0.0, fd_h=fm.SD_FD_H, ratio=0.75))


RECIPE = MiniSDConfig()


# ----------------------------------------------------------------------------------------------------------------
# The student and its teacher
# ----------------------------------------------------------------------------------------------------------------

def flow_map_lora(sd: Any, rank: int = RECIPE.rank, seed: int = 0) -> SDFlowMap:
    """The flow-map student of sd.model before training: its UNet rebuilt with time_cond_proj_dim = STEP_DIM and a
    zero cond_proj (lcm_student's), every base weight frozen, a rank-`rank` LoRA on LCM-LoRA's target modules; the
    LoRA and the step projection are trainable. Returns an sd.SDFlowMap that is the teacher for every s."""
    base = sd.model
    unet = lcm_student(base, STEP_DIM, (0.0, 1.0), seed).denoiser.unet
    model = SDFlowMap(unet, base.process, base.parameterization, base.reference)
    add_lora(model, r=rank, target_modules=present_targets(unet), seed=seed)
    unet.time_embedding.cond_proj.requires_grad_(True)
    model.base_fingerprint = base_fingerprint(base.unet)     # the base it is distilled on (its UNet has no cond_proj)
    return model


class GuidedTeacher(nn.Module):
    """The teacher of a flow-map LoRA as a course model: the student's own UNet with its adapter off and no step
    input (sd.AdapterOff, cond.s removed), with classifier-free guidance weight w (guidance.cfg). The student is
    held, not registered (it is trained and checkpointed by its owner)."""

    def __init__(self, student: SDFlowMap, w: float):
        super().__init__()
        self.off, self.w, self.process = AdapterOff(student), float(w), student.process

    def forward(self, x: Tensor, t: Tensor, cond: Cond) -> Pred:
        return guided(self.off, self.w)(x, t, with_end_time(cond, None))


def guided_teacher(student: SDFlowMap, w: float = minisd.DEFAULT_W) -> GuidedTeacher:
    return GuidedTeacher(student, w)


def meanflow_config(cfg: MiniSDConfig, process) -> fm.MeanFlowConfig:
    """cfg.meanflow with its times ending at SD's noise end in rf time (`t_max`)."""
    return fm.MeanFlowConfig(**{**cfg.meanflow.__dict__, "t_max": t_max(process)})


def train_minisd(sd: Any, cfg: MiniSDConfig = RECIPE, *, ckpt_dir: str | os.PathLike | None = None,
                 n_images: int | None = None, progress: bool = True, observer=None, observe_every: int = 1
                 ) -> tuple[SDFlowMap, Trained]:
    """MeanFlow distillation of the guided mini SD into a flow-map LoRA (module docstring), through the engine
    (train_networks: resumes from ckpt_dir; only the LoRA and the step projection are checkpointed). Data:
    minisd.digit_batches (the first n_images training digits when given); observer: the engine's (train.Observer,
    every observe_every updates). Returns (the student, eval; Trained)."""
    require_codec(sd)
    student = flow_map_lora(sd, cfg.rank, cfg.seed)
    mcfg = meanflow_config(cfg, student.process)
    net = Network(fm.RFFlowMap(student), lr=mcfg.lr, grad_clip=cfg.grad_clip, warmup=mcfg.warmup,
                  ema_decay=mcfg.ema_decay, save_frozen=False)
    run = TrainConfig(steps=cfg.steps, batch_size=cfg.batch, seed=cfg.seed, ckpt_every=cfg.ckpt_every,
                      desc="MeanFlow: mini-SD flow-map LoRA")
    done = train_networks({"student": net}, fm.meanflow_step(mcfg), minisd.digit_batches(sd, n_images), run,
                          frozen={"teacher": RFView(guided_teacher(student, cfg.w))}, ckpt_dir=ckpt_dir,
                          progress=progress, observer=observer, observe_every=observe_every,
                          extra_config={"flowmap_minisd": {**{k: v for k, v in asdict(cfg).items() if k != "meanflow"},
                                                           **mcfg.__dict__}})
    return student.eval(), done


# ----------------------------------------------------------------------------------------------------------------
# Files: the LoRA in diffusers' format, the step projection, flowmap.json
# ----------------------------------------------------------------------------------------------------------------

def save(student: SDFlowMap, folder: str | os.PathLike, info: dict | None = None) -> Path:
    """folder/pytorch_lora_weights.safetensors (pipe.load_lora_weights), folder/step_proj.safetensors (the
    zero-initialised projection, trained) and flowmap.json (step width, guidance w, base fingerprint, info)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    unet = student.unet
    fp = student.base_fingerprint
    save_peft_lora(unet, folder)
    save_file({"time_embedding.cond_proj.weight": unet.time_embedding.cond_proj.weight.detach().cpu().contiguous()},
              str(folder / STEP_PROJ))
    meta = {"kind": "meanflow-lora", "step_dim": STEP_DIM, "base_fingerprint": fp, **(info or {})}
    (folder / FLOWMAP_JSON).write_text(json.dumps(meta, indent=2))
    return folder


def _meta(folder: Path) -> dict:
    if not (folder / FLOWMAP_JSON).is_file():
        raise FileNotFoundError(f"{folder / FLOWMAP_JSON} is missing: {folder} holds no flow-map LoRA "
                                "(recipes.flowmap_minisd.save writes one)")
    return json.loads((folder / FLOWMAP_JSON).read_text())


def _load_step_proj(unet: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    w = load_file(str(folder / STEP_PROJ))["time_embedding.cond_proj.weight"]
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.copy_(w.to(unet.time_embedding.cond_proj.weight))


def _check_base(unet: nn.Module, meta: dict) -> None:
    fp = base_fingerprint(unet)
    if fp != meta["base_fingerprint"]:
        raise ValueError(f"this flow-map LoRA was distilled on another base model (fingerprint "
                         f"{meta['base_fingerprint']}, this UNet's is {fp}): load it onto its own base "
                         "(minisd.load_mini_sd())")


def load(sd: Any, folder: str | os.PathLike) -> SDFlowMap:
    """The flow-map student saved by `save`, rebuilt on sd.model (its base; another base is refused): eval, no grad."""
    folder = Path(folder)
    meta = _meta(folder)
    _check_base(sd.model.unet, meta)
    unet = lcm_student(sd.model, meta["step_dim"], (0.0, 1.0)).denoiser.unet
    _load_step_proj(unet, folder)
    model = SDFlowMap(unet, sd.model.process, sd.model.parameterization, sd.model.reference)
    load_lora(model, folder)
    model.base_fingerprint = meta["base_fingerprint"]
    return model.eval().requires_grad_(False)


def shipped_dir() -> Path:
    return paths.data_dir() / "flowmap" / "mini-sd-meanflow"


def load_shipped(sd: Any) -> SDFlowMap:
    """The shipped flow-map LoRA (data/flowmap/mini-sd-meanflow) on sd.model."""
    return load(sd, paths.shipped(shipped_dir(), RECREATE))


# ----------------------------------------------------------------------------------------------------------------
# Sampling: the course's sampler, and the plain diffusers pipeline that equals it
# ----------------------------------------------------------------------------------------------------------------

def noise(sd: Any, n: int, seed: int = 0) -> Tensor:
    """The initial latents (n, 4, h, w) from a generator seeded `seed`, as minisd.sample draws them."""
    unet = sd.model.unet
    h = unet.config.sample_size
    return torch.randn(n, unet.config.in_channels, h, h, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_latents(sd: Any, student: SDFlowMap, prompts: Sequence[str], steps: int, x1: Tensor) -> Tensor:
    """samplers.flow_map of the student from x1 (B, 4, h, w) on grids.sd_grid(steps, "trailing") (t = 1, ..., 0):
    `steps` jumps, one UNet call each. Returns the latents at t = 0."""
    proc = student.process
    return samplers.flow_map(student, x1, grids.sd_grid(steps, proc, "trailing"), proc, cond=sd.text(list(prompts)))


@torch.no_grad()
def sample(sd: Any, student: SDFlowMap, prompts: Sequence[str], steps: int = 1, seed: int = 0, batch: int = 256
           ) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] (clamped) of `steps`-step flow-map sampling, the noise as minisd.sample's."""
    x1 = noise(sd, len(prompts), seed)
    out = [sd.vae.decode(sample_latents(sd, student, prompts[k:k + batch], steps, x1[k:k + batch])).clamp(-1, 1)
           for k in range(0, len(prompts), batch)]
    return torch.cat(out)


def pipeline(lora_folder: str | os.PathLike | None = None, sd_folder: str | os.PathLike | None = None) -> Any:
    """A plain diffusers StableDiffusionPipeline serving the flow-map LoRA: the mini SD's pipeline (its DDIMScheduler,
    trailing, set_alpha_to_one), its UNet rebuilt with time_cond_proj_dim (the base weights, the trained step
    projection), then pipe.load_lora_weights(lora_folder). Sample with `pipeline_sample` (guidance_scale = 1 + 1/n)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    lora_folder = Path(lora_folder) if lora_folder is not None else paths.shipped(shipped_dir(), RECREATE)
    sd_folder = sd_folder if sd_folder is not None else paths.shipped(minisd.MINI_SD, minisd.RECREATE)
    meta = _meta(lora_folder)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None, requires_safety_checker=False)
    _check_base(pipe.unet, meta)
    config = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": meta["step_dim"]})
    unet.load_state_dict(pipe.unet.state_dict(), strict=False)
    _load_step_proj(unet, lora_folder)
    pipe.register_modules(unet=unet.eval())
    pipe.load_lora_weights(str(lora_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def pipeline_sample(pipe: Any, prompts: Sequence[str], steps: int, latents: Tensor, output_type: str = "latent"
                    ) -> Tensor:
    """n = steps flow-map jumps in the plain pipeline: num_inference_steps = n, guidance_scale = 1 + 1 / n (the
    step d = 1000 / n through the pipeline's timestep_cond; no CFG pair for a UNet with time_cond_proj_dim).
    n must divide 1000 (DDIMScheduler steps by 1000 // n; the trailing grid by 1000 / n). Returns the latents
    (output_type "latent") or the pipeline's images."""
    if 1000 % steps:
        raise ValueError(f"the pipeline reproduces the flow map for step counts dividing 1000; got {steps}")
    return pipe(list(prompts), num_inference_steps=steps, guidance_scale=1.0 + 1.0 / steps, latents=latents,
                output_type=output_type).images


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (minisd.evaluate_images, as recipes.lcm)
# ----------------------------------------------------------------------------------------------------------------

def evaluate(sd: Any, student: SDFlowMap, n: int = 200, steps: int = 1, seeds: Sequence[int] = (0, 1, 2)
             ) -> dict[str, Any]:
    """Held-out KID, digit / colour / thickness adherence of `steps`-step sampling, mean and spread over seeds
    (minisd.evaluate_images: the same prompts and noise per seed as the teacher's minisd.evaluate)."""
    return minisd.evaluate_images(lambda prompts, s: sample(sd, student, prompts, steps, seed=s), n, seeds,
                                  steps=steps)


def summary(r: dict) -> dict:
    return {k: [round(r["mean"][k], 4), round(r["std"][k], 4)] for k in r["mean"]}


def teacher_reference(n: int, seeds: Sequence[int]) -> dict | None:
    """The guided teacher's 25-step DDIM evaluation recorded with the shipped LCM-LoRA (data/lcm, the same
    minisd.evaluate at w = DEFAULT_W) when it has this n and these seeds; None otherwise."""
    path = paths.data_dir() / "lcm" / "mini-sd-lcm-lora" / "lcm.json"
    if not path.is_file():
        return None
    ev = json.loads(path.read_text()).get("evaluation", {})
    if ev.get("n") != n or list(ev.get("seeds", [])) != list(seeds) or ev.get("w") != minisd.DEFAULT_W:
        return None
    return ev["mean_std"].get("teacher DDIM 25 steps")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.recipes.flowmap_minisd",
                                     description="MeanFlow on the mini Stable Diffusion: a flow-map LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-minisd", help="distil the guided mini SD into a MeanFlow LoRA, evaluate, save")
    p.add_argument("--out", default=str(shipped_dir()))
    p.add_argument("--steps", type=int, default=RECIPE.steps)
    p.add_argument("--batch", type=int, default=RECIPE.batch)
    p.add_argument("--lr", type=float, default=RECIPE.meanflow.lr)
    p.add_argument("--ratio", type=float, default=RECIPE.meanflow.ratio)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--eval-steps", default="1,2,4")
    p.add_argument("--results", default=None, help="also write the evaluation here (JSON)")
    p.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = MiniSDConfig(steps=args.steps, batch=args.batch,
                       meanflow=fm.MeanFlowConfig(**{**RECIPE.meanflow.__dict__, "lr": args.lr,
                                                           "ratio": args.ratio}))
    seeds = (0, 1, 2)
    sd = minisd.load_mini_sd()
    t0 = time.time()
    student, done = train_minisd(sd, cfg, ckpt_dir=paths.cache_dir() / f"flowmap_minisd_{cfg.seed}_{cfg.steps}")
    secs = time.time() - t0
    results = {}
    for k in (int(s) for s in args.eval_steps.split(",")):
        results[f"meanflow {k} steps"] = summary(evaluate(sd, student, args.n_eval, k, seeds))
        print(k, results[f"meanflow {k} steps"], flush=True)
    teacher = teacher_reference(args.n_eval, seeds)
    if teacher is None:
        teacher = summary(minisd.evaluate(minisd.load_mini_sd(), args.n_eval, 25, minisd.DEFAULT_W, seeds))
    results["teacher DDIM 25 steps"] = teacher
    for k in (1, 2, 4):              # the guided teacher's own few-step DDIM: where the student started
        results[f"teacher DDIM {k} steps"] = summary(minisd.evaluate(sd, args.n_eval, k, minisd.DEFAULT_W, seeds))
    info = {"command": f"{RECREATE} (steps {cfg.steps}, batch {cfg.batch}, lr {args.lr:g}, ratio {args.ratio:g})",
            "recipe": {**{k: v for k, v in asdict(cfg).items() if k != "meanflow"},
                       "meanflow": meanflow_config(cfg, student.process).__dict__},
            "train_seconds": round(secs), "seconds_per_update": round(secs / cfg.steps, 2),
            "threads": torch.get_num_threads(), "final_loss": float(sum(done.losses["student"][-20:]) / 20)
            if "student" in done.losses else None,
            "evaluation": {"n": args.n_eval, "seeds": list(seeds), "w": minisd.DEFAULT_W, "mean_std": results}}
    save(student, args.out, info)
    if args.results:
        Path(args.results).write_text(json.dumps(info, indent=2))
    print(f"saved {args.out} ({secs:.0f} s of training)", flush=True)


if __name__ == "__main__":
    main()
