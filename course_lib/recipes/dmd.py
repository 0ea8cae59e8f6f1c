"""The course's DMD2 run on a Stable Diffusion model in course pieces (sd.SD; the method is distill/dmd.py): the mini Stable Diffusion's one-step student, trained
with notebook 09's method step (dmd.dmd_step) on the mini SD's own training digits, which serve as the GAN's real
latents (through the teacher's VAE) and whose captions condition the generator.

    python -m course_lib.recipes.dmd train --out data/dmd2 --threads 2      recreate the shipped student

The real score is the teacher with classifier-free guidance at w = 1 (RECIPE.real_w; DMD2's SD 1.5 run: 0.75): the
guidance is distilled into the generator, which is sampled without it. The generator is told t = 0.8 (timestep 799)
at its step from pure noise (RECIPE.t_gen; DMD2's one-step SDXL is told 399). The student is a plain UNet (same
architecture), saved in diffusers' format with dmd2.json beside it, and sampled with the generator's grid
(dmd.sample on grids.trailing(k, t_gen): 799, or 799/599/399/199 with fresh noise in between, as diffusers'
LCMScheduler does)."""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import minisd, paths
from ..conditioning import Cond
from ..distill import dmd
from ..sd import load_unet_student
from ..teachers import load_teacher
from ..train import Observer, Trained, TrainConfig

SHIPPED = "mini-sd-dmd2"
META = "dmd2.json"
RECREATE = "python -m course_lib.recipes.dmd train --out data/dmd2 --threads 2"
# DMD2's SD recipe (TTUR, lambda_G, lambda_D, clip 10) at the mini SD's size: larger learning rates for a run of
# minutes, the generator's 5x below the critic's (at the critic's rate the generator outran its fake score and drew
# textured digits: held-out KID 0.40 against 0.20 with the earlier recipe, data/dmd2/README.md). Two settings make
# the one-step generator follow colour prompts (data/dmd2/README.md has the measurements):
#   real_w = 1, not the mini SD's DDIM default 4: the guided x0 at high noise extrapolates the MEAN, and at w = 4 its
#     ink colours are shifted (green prompts read blue-cyan, yellow pale); a one-step generator matched to it there
#     drew exactly those colours (colour adherence 0.57);
#   t_gen = 0.8: the generator's first (only) call is told timestep 799, not 999. Its input is pure noise either
#     way, but the epsilon-parameterised UNet's x0 = (z - sigma eps)/alpha divides by alpha = 0.068 at 999 and by
#     0.19 at 799: the teacher's own single call starts at adherence 0.92 / colour 0.69 there (0.81 / 0.56 at 999).
# The optimizer is the course's, AdamW betas (0, 0.999) without weight decay (dmd.COURSE_BETAS), not DMD2's
# released (0.9, 0.999) with weight decay 0.01 (dmd.DMD2_BETAS, the SD stage's)
RECIPE = dmd.DMDConfig(ttur=5, gan=True, lambda_g=1e-2, lambda_d=1e-1, lr_g=2e-5, lr_critic=1e-4,
                       betas=dmd.COURSE_BETAS, weight_decay=0.0, grad_clip=10.0, real_w=1.0, t_gen=0.8)
STEPS, BATCH = 1500, 32


def recipe() -> dmd.DMDConfig:
    return replace(RECIPE)


def override(cfg: dmd.DMDConfig, settings: Sequence[str]) -> dmd.DMDConfig:
    """cfg with KEY=VALUE settings applied (each VALUE read as the field's type: lr_g=2e-5, ttur=10, gan=false)."""
    types = {f.name: type(getattr(cfg, f.name)) for f in fields(cfg)}
    changes: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set takes KEY=VALUE with KEY one of {sorted(types)}; got {item!r}")
        kind = types[key]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--set {key}= takes true or false; got {value!r}")
            changes[key] = value.lower() in ("true", "1")
        elif kind is tuple:
            changes[key] = tuple(float(v) for v in value.split(","))
        else:
            changes[key] = kind(value)
    return replace(cfg, **changes)


def shipped_dir() -> Path:
    return paths.data_dir() / "dmd2"


SHIPPED_2D = "dmd2_2d"     # data/dmd2_2d/<dataset>.safetensors (the generator's weights) + <dataset>.json


def load_shipped_2d(dataset: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The shipped longer-trained one-step DMD2 generator of {dataset}-vp (bench.dmd.ship_2d, notebook 09), eval, no
    grad, and its JSON (the recipe, the command that made it)."""
    from safetensors.torch import load_file

    folder = paths.shipped(paths.data_dir() / SHIPPED_2D, "python -m course_lib.bench.dmd_ship <dataset> --iters <n>")
    G = load_teacher(f"{dataset}-vp", device=device)
    G.load_state_dict(load_file(str(folder / f"{dataset}.safetensors"), device=str(device)))
    return G.eval().requires_grad_(False), json.loads((folder / f"{dataset}.json").read_text())


def train_config(steps: int = STEPS, batch: int = BATCH, seed: int = 0, checkpoints: bool = False) -> TrainConfig:
    """The recipe's run: `steps` updates of `batch`, a checkpoint every 100 updates when checkpointing."""
    return TrainConfig(steps=steps, batch_size=batch, seed=seed, desc="DMD2 mini SD",
                       ckpt_every=100 if checkpoints else 0)


def distill_dmd2_sd(sd: Any, data: Callable, cfg: dmd.DMDConfig, *, run: TrainConfig, ckpt_dir=None, accelerator=None,
                    progress: bool = True, device: str | torch.device = "cpu", observer: Observer | None = None,
                    observe_every: int = 1) -> tuple[nn.Module, Trained]:
    """A DMD2 generator of sd.model (the teacher; one step unless cfg.gen_steps > 1; cfg: e.g. recipe()) by the
    method's driver, dmd.distill_dmd, on data(n, g) -> {"x": latents, "cond": Cond} (e.g. minisd.digit_batches(sd)); run:
    e.g. train_config(steps, batch, seed, checkpoints=ckpt_dir is not None). Returns (the generator, eval, no grad,
    on the CPU; the engine's Trained). sd.model itself is left untouched (the
    generator, critic and real score are copies of it, trained on `device`; the batches are drawn on the CPU and moved
    there by the engine). The critic's examples: latents (2, C, h, h) and a Cond of zero text embeddings."""
    teacher = copy.deepcopy(sd.model).requires_grad_(False).eval().to(device)
    unet = teacher.unet
    h = unet.config.sample_size
    x_example = torch.zeros(2, unet.config.in_channels, h, h, device=device)
    text = torch.zeros(2, 1, unet.config.cross_attention_dim, device=device)
    G, done = dmd.distill_dmd(teacher, data, cfg, run=run,
                              example={"x": x_example, "cond": Cond(text=text, null_text=text[:1])}, ckpt_dir=ckpt_dir,
                              accelerator=accelerator, progress=progress,
                              extra_config={"method": "dmd2-sd", **asdict(cfg)}, observer=observer,
                              observe_every=observe_every)
    G.t_first = cfg.t_gen                         # the time it is told at its first step (sample's default)
    return G.cpu(), done


def first_time(G: nn.Module) -> float:
    """The time a generator is told at its first step: its `t_first` (set by distill_dmd2_sd and load from the
    recipe's t_gen), 1 for a model without one (the teacher itself)."""
    return float(getattr(G, "t_first", 1.0))


@torch.no_grad()
def sample(sd: Any, G: nn.Module, prompts: Sequence[str], steps: int = 1, seed: int = 0, batch: int = 256,
           t_first: float | None = None) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] of the generator at `steps` steps on its grid grids.trailing(steps, t_first)
    (no classifier-free guidance: it is in the weights; t_first: first_time(G) unless given). Initial noise from a
    generator seeded `seed` (as minisd.sample draws it), then the re-noising noise."""
    g = torch.Generator().manual_seed(seed)
    unet = G.unet
    h = unet.config.sample_size
    z1 = torch.randn(len(prompts), unet.config.in_channels, h, h, generator=g)
    t_first = first_time(G) if t_first is None else t_first
    out = []
    for k in range(0, len(prompts), batch):
        z = dmd.sample(G, z1[k:k + batch], steps, G.process, g, sd.text(list(prompts[k:k + batch])), t_first)
        out.append(sd.vae.decode(z).clamp(-1, 1))
    return torch.cat(out)


def evaluate(sd: Any, G: nn.Module, n: int = 500, steps: int = 1, seeds: Sequence[int] = (0, 1, 2),
             t_first: float | None = None) -> dict[str, Any]:
    """minisd.evaluate for a DMD2 generator: the same prompts per seed (minisd.evaluate_images), prompt adherence and
    KID/FD against held-out and training digits, mean and spread over the seeds (sampled as `sample`)."""
    return minisd.evaluate_images(lambda prompts, s: sample(sd, G, prompts, steps, seed=s, t_first=t_first), n,
                                  seeds, steps=steps)


def save(G: nn.Module, folder: str | Path, info: dict) -> Path:
    """folder/unet (diffusers' UNet2DConditionModel, safetensors) and folder/dmd2.json."""
    folder = Path(folder)
    G.unet.save_pretrained(folder / "unet", safe_serialization=True)
    (folder / META).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def load(sd: Any, folder: str | Path) -> nn.Module:
    """The generator saved by `save`, as a course model on sd's process (sd.model's weights are not touched), with
    its t_first from the JSON's recipe (t_gen; 1 when absent)."""
    G, meta = load_unet_student(folder, META, sd.model, f"DMD2 generator: recreate it with `{RECREATE}`")
    G.t_first = float(meta.get("recipe", {}).get("t_gen", 1.0))
    return G.eval()


def load_shipped(sd: Any) -> nn.Module:
    return load(sd, paths.shipped(shipped_dir() / SHIPPED, RECREATE))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.recipes.dmd",
                                     description="Distil the mini Stable Diffusion into a one-step DMD2 generator.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="DMD2 of the mini SD with the shipped recipe")
    p.add_argument("--out", default=str(shipped_dir()))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one setting of the recipe (dmd.DMDConfig), e.g. --set lr_g=2e-5 --set ttur=10")
    p.add_argument("--device", default="cpu", help="where the three networks train (cpu, cuda); data preparation "
                   "and the evaluation run on the CPU")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sd = minisd.load_mini_sd()
    t0 = time.perf_counter()
    try:
        cfg = override(recipe(), args.set)
    except ValueError as e:
        parser.error(str(e))
    G, done = distill_dmd2_sd(sd, minisd.digit_batches(sd), cfg, run=train_config(args.steps, args.batch, checkpoints=True),
                              ckpt_dir=Path(args.out) / "checkpoint", device=args.device)
    secs = time.perf_counter() - t0
    ev = evaluate(sd, G, args.n_eval, 1)
    info = {"kind": "dmd2", "gen_steps": 1, "timesteps": [round(1000 * cfg.t_gen) - 1], "w_distilled": cfg.real_w,
            "command": f"{RECREATE} (steps {args.steps}, batch {args.batch}{''.join(' --set ' + x for x in args.set)})",
            "recipe": asdict(cfg),
            "steps": args.steps, "batch": args.batch, "updates": done.updates, "train_seconds": round(secs),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu",
            "evaluation": {k: ev[k] for k in ("n", "seeds", "mean", "std")}}
    folder = save(G, Path(args.out) / SHIPPED, info)
    print(f"DMD2 mini SD: {args.steps} iterations in {secs:.0f} s; saved in {folder}")
    print(json.dumps(ev["mean"], indent=1))


if __name__ == "__main__":
    main()
