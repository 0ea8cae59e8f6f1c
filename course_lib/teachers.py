"""Teacher recipes: how every model shipped in data/teachers/ was trained, and how to load it.

    python -m course_lib.teachers list
    python -m course_lib.teachers train digits            # retrain a shipped teacher (resumable)
    python -m course_lib.teachers train all

A recipe is data + backbone + process + parameterization + TrainConfig. Notebooks load the shipped weights
with `load_teacher(name)` so they start at once; notebook 00 also trains 2D teachers itself, with the same
`teacher_recipe` at the budget of its mode.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import paths
from .conditioning import labels
from .config import announce_once, default_device, offline, seeded
from .data2d import sample_2d
from .images import batch_sampler, load_digits
from .losses import denoising_loss
from .models import Denoiser, DiffusersUNet, MLP2D, UNet, load_denoiser, save_denoiser
from .processes import make_process
from .train import Trained, TrainConfig, train

DATA_DIR = paths.data_dir()             # $COURSE_DATA, the checkout's data/, or the copy installed with the wheel
TEACHER_DIR = DATA_DIR / "teachers"


@dataclass
class Recipe:
    name: str
    dataset: str                      # a 2D dataset name or "digits"
    process: str                      # "vp-cosine" (diffusion) or "rf" (flow matching)
    parameterization: str             # "v" for diffusion, "velocity" for flow matching
    net: dict[str, Any]               # backbone constructor arguments
    cfg: TrainConfig
    conditional: bool = False         # class-conditional with label dropout (classifier-free guidance)
    p_uncond: float = 0.1

    def build(self) -> Denoiser:
        net = UNet(**self.net) if self.dataset == "digits" else MLP2D(**self.net)
        return Denoiser(net, make_process(self.process), self.parameterization)

    def sampler(self) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]:
        if self.dataset == "digits":
            x, y = load_digits(16, split="train")
            return batch_sampler(x, y if self.conditional else None)

        def sample(n: int, g: torch.Generator):
            x, y = sample_2d(self.dataset, n, g)
            return x, (y if self.conditional else None)

        return sample

    def loss(self, model: Denoiser, batch, g: torch.Generator) -> torch.Tensor:
        x0, y = batch
        cond = labels(y, model.net.num_classes) if self.conditional else None
        return denoising_loss(model, x0, g, cond, p_uncond=self.p_uncond if self.conditional else 0.0)


MLP_2D = {"dim": 2, "hidden": 256, "depth": 4}
CFG_2D = TrainConfig(steps=6000, batch_size=1024, lr=1e-3, warmup=200, lr_schedule="cosine", ema_decay=0.999,
                     ckpt_every=2000, seed=0)
RECIPES: dict[str, Recipe] = {}
for _ds in ("checkerboard", "gmm"):
    RECIPES[f"{_ds}-vp"] = Recipe(f"{_ds}-vp", _ds, "vp-cosine", "v", MLP_2D, replace(CFG_2D, desc=f"{_ds}-vp"))
    RECIPES[f"{_ds}-rf"] = Recipe(f"{_ds}-rf", _ds, "rf", "velocity", MLP_2D, replace(CFG_2D, desc=f"{_ds}-rf"))
# Class-conditional teacher for guided distillation (notebook 02): overlapping classes, label dropout 0.15 (CFG).
RECIPES["gmm-overlap-vp"] = Recipe("gmm-overlap-vp", "gmm-overlap", "vp-cosine", "v", {**MLP_2D, "num_classes": 8},
                                   replace(CFG_2D, desc="gmm-overlap-vp"), conditional=True, p_uncond=0.15)
RECIPES["digits"] = Recipe(
    "digits", "digits", "vp-cosine", "v",
    {"sample_size": 16, "in_channels": 1, "block_out_channels": (32, 64, 64), "layers_per_block": 1,
     "num_classes": 10},
    TrainConfig(steps=8000, batch_size=64, lr=3e-4, warmup=200, ema_decay=0.9995, ckpt_every=250, seed=0,
                desc="digits teacher"),
    conditional=True,
)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown teacher {name!r}; valid teachers: {', '.join(RECIPES)}")
    return RECIPES[name]


def teacher_recipe(dataset: str, kind: str = "vp", steps: int | None = None, **overrides: Any) -> Recipe:
    """The recipe of the shipped 2D teacher for `dataset` ("vp" diffusion or "rf" flow matching), with a
    training budget of `steps` updates and any other TrainConfig fields overridden (for notebooks)."""
    base = RECIPES.get(f"{dataset}-{kind}")
    if base is None:
        base = Recipe(f"{dataset}-{kind}", dataset, "vp-cosine" if kind == "vp" else "rf",
                      "v" if kind == "vp" else "velocity", MLP_2D, replace(CFG_2D, desc=f"{dataset}-{kind}"))
    cfg = replace(base.cfg, **({"steps": steps} if steps is not None else {}), **overrides)
    return replace(base, cfg=cfg)


def fit(recipe: Recipe, ckpt_dir: str | os.PathLike | None = None, progress: bool = True,
        device: str | torch.device = "cpu") -> Trained:
    """Train a recipe from scratch (or resume from ckpt_dir) on `device`. Returns the engine's Trained; `.best()` is
    the EMA model. Data and noise are drawn on the CPU from the run's generator, so results do not depend on device."""
    with seeded(recipe.cfg.seed):  # initialisation; the caller's global RNG is left as it was
        model = recipe.build()
    draw = recipe.sampler()

    def sample_batch(n: int, g: torch.Generator):
        x, y = draw(n, g)
        return x.to(device), (y.to(device) if y is not None else None)

    return train(model.to(device), recipe.loss, sample_batch, recipe.cfg, ckpt_dir=ckpt_dir,
                 progress=progress, extra_config={"recipe": recipe.name})


def load_teacher(name: str, device: str | torch.device = "cpu") -> Denoiser:
    """A shipped teacher from data/teachers/<name>, in eval mode, gradients off."""
    get_recipe(name)
    recreate = f"python -m course_lib.teachers train {name}"
    model, _ = load_denoiser(paths.shipped(TEACHER_DIR / name, recreate), recreate, device=device)
    return model.requires_grad_(False)


HUB_TEACHERS = {
    # hub id: (process, parameterization); the UNet's config says the rest
    "google/ddpm-cifar10-32": (dict(name="sd", beta_schedule="linear", beta_start=1e-4, beta_end=0.02), "eps"),
}


def load_hub_teacher(repo_id: str = "google/ddpm-cifar10-32", device: str | torch.device = "cpu") -> Denoiser | None:
    """A public pretrained teacher from the Hugging Face Hub, wrapped as a course model; None (with one loud
    message) when it cannot be downloaded, so a notebook can carry on with the shipped digits teacher."""
    from diffusers import UNet2DModel

    if repo_id not in HUB_TEACHERS:
        raise ValueError(f"unknown hub teacher {repo_id!r}; known: {', '.join(HUB_TEACHERS)}")
    proc, param = HUB_TEACHERS[repo_id]
    try:
        if offline():
            raise OSError("HF_HUB_OFFLINE=1")
        unet = UNet2DModel.from_pretrained(repo_id, use_safetensors=None)
    except Exception as e:  # no network, no cache, or the hub refused: the course runs on shipped data instead
        announce_once("hub", f"OFFLINE: could not load {repo_id} from the Hugging Face Hub ({type(e).__name__}: {e}).\n"
                             "The course continues with the shipped digits teacher (data/teachers/digits).")
        return None
    proc = dict(proc)
    return Denoiser(DiffusersUNet(unet), make_process(proc.pop("name"), **proc), param).to(device).eval().requires_grad_(False)


def export(state: Trained, recipe: Recipe, folder: Path, steps_done: int) -> None:
    last = state.losses["model"][-100:]
    save_denoiser(folder, state.best(), {"recipe": recipe.name, "steps": steps_done, "train_config": vars(recipe.cfg),
                                         "final_loss_mean_last_100": sum(last) / max(1, len(last))}, half=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m course_lib.teachers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    tr = sub.add_parser("train")
    tr.add_argument("names", nargs="+", help=f"teachers to train, or 'all': {', '.join(RECIPES)}")
    tr.add_argument("--runs", default="runs/teachers", help="checkpoint folder (a rerun resumes from it)")
    tr.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for r in RECIPES.values():
            print(f"{r.name:18s} {r.dataset:13s} {r.process:10s} {r.parameterization:9s} steps={r.cfg.steps}")
        return
    names = list(RECIPES) if args.names == ["all"] else args.names
    for name in names:
        recipe = get_recipe(name)
        state = fit(recipe, Path(args.runs) / name, device=args.device or default_device())
        export(state, recipe, TEACHER_DIR / name, state.step)
        print(f"wrote {TEACHER_DIR / name}")


if __name__ == "__main__":
    main()
