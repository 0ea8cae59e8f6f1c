"""One training loop for every method in the course: progress bar, EMA, checkpoints, resume, explicit seeds.

    state = train(model, loss_fn, sample_batch, TrainConfig(steps=4000, batch_size=1024), ckpt_dir="runs/x")

`sample_batch(batch_size, generator) -> batch` draws data; `loss_fn(model, batch, generator) -> (B,)` returns
per-sample losses (the loop takes the mean). All randomness after initialisation flows through one
torch.Generator seeded with `TrainConfig.seed`, whose state is checkpointed: a run that is killed and
resumed from its last checkpoint ends with exactly the weights of an uninterrupted run.

A checkpoint folder holds `trainer.safetensors` (model, EMA, optimizer tensors, RNG state) and
`config.json` (step, loss history, the TrainConfig, optimizer hyperparameters, the model's config).
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_tensors, save_tensors

TRAINER_WEIGHTS = "trainer.safetensors"


@dataclass
class TrainConfig:
    steps: int                      # total optimizer updates
    batch_size: int                 # samples per update
    lr: float = 1e-3                # Adam learning rate (after warm-up)
    ema_decay: float = 0.999        # EMA of the weights kept beside the model; 0 disables it
    grad_clip: float | None = 1.0   # max global grad norm; None disables clipping
    warmup: int = 0                 # linear learning-rate warm-up steps
    lr_schedule: str = "constant"   # "constant", "linear" (anneal to 0, as PD) or "cosine"
    weight_decay: float = 0.0       # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    ckpt_every: int = 0             # checkpoint every k steps (0: only at the end); needs ckpt_dir
    seed: int = 0                   # seeds the generator that all data and noise draws use
    desc: str = "train"             # progress-bar label

    def lr_at(self, step: int) -> float:
        """Learning rate for update number `step` (0-based)."""
        scale = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        frac = step / max(1, self.steps)
        if self.lr_schedule == "linear":
            scale *= 1.0 - frac
        elif self.lr_schedule == "cosine":
            scale *= 0.5 * (1.0 + math.cos(math.pi * frac))
        elif self.lr_schedule != "constant":
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; valid: constant, linear, cosine")
        return self.lr * scale


@dataclass
class TrainState:
    model: nn.Module                 # the trained weights
    ema: nn.Module | None            # EMA weights (None when ema_decay == 0)
    step: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def best(self) -> nn.Module:
        """The weights to sample from: the EMA if there is one."""
        return self.ema if self.ema is not None else self.model


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _pack(state: TrainState, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict[str, Tensor]:
    tensors = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    if state.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in state.ema.state_dict().items()})
    for idx, st in opt.state_dict()["state"].items():
        for key, val in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val)
    tensors["rng"] = gen.get_state()
    return tensors


def save_training(folder: str | os.PathLike, state: TrainState, opt: torch.optim.Optimizer, gen: torch.Generator,
                  cfg: TrainConfig, extra: dict[str, Any] | None = None) -> None:
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
    config = {"step": state.step, "losses": state.losses, "train_config": asdict(cfg), "param_groups": groups,
              **(extra or {})}
    if hasattr(state.model, "config"):
        config["model"] = state.model.config()
    save_tensors(folder, _pack(state, opt, gen), config, weights_name=TRAINER_WEIGHTS)


def _restore(folder: Path, state: TrainState, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    tensors, config = load_tensors(folder, "delete the folder to start the run from scratch",
                                   weights_name=TRAINER_WEIGHTS)
    try:
        state.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if state.ema is not None:
            state.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    except RuntimeError as e:
        raise CheckpointError(f"{folder / TRAINER_WEIGHTS} was written for another model: {e}. "
                              "Use another ckpt_dir or delete this one.") from e
    opt_state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    sd = opt.state_dict()
    sd["state"] = opt_state
    opt.load_state_dict(sd)
    gen.set_state(tensors["rng"])
    state.step, state.losses = int(config["step"]), list(config["losses"])


def train(model: nn.Module, loss_fn: Callable[[nn.Module, Any, torch.Generator], Tensor],
          sample_batch: Callable[[int, torch.Generator], Any], cfg: TrainConfig,
          ckpt_dir: str | os.PathLike | None = None, extra_config: dict[str, Any] | None = None,
          progress: bool = True, generator_device: str | torch.device = "cpu") -> TrainState:
    """Train `model` for cfg.steps updates, resuming from `ckpt_dir` when it holds a checkpoint of this run.

    Ctrl-C (KeyboardInterrupt) writes a checkpoint before it propagates, so nothing is lost.
    """
    gen = torch.Generator(device=generator_device).manual_seed(cfg.seed)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    state = TrainState(model=model, ema=ema)
    opt = _optimizer(model, cfg)
    folder = Path(ckpt_dir) if ckpt_dir is not None else None
    if folder is not None and (folder / TRAINER_WEIGHTS).exists():
        _restore(folder, state, opt, gen)
        if state.step >= cfg.steps:
            return state

    def checkpoint() -> None:
        if folder is not None:
            save_training(folder, state, opt, gen, cfg, extra_config)

    model.train()
    bar = tqdm(total=cfg.steps, initial=state.step, desc=cfg.desc, disable=not progress, mininterval=0.5)
    smooth = None
    rng_at_step_start, stepped = gen.get_state(), False
    try:
        while state.step < cfg.steps:
            rng_at_step_start, stepped = gen.get_state(), False
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(state.step)
            loss = loss_fn(model, sample_batch(cfg.batch_size, gen), gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            stepped = True
            if ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1.0 - cfg.ema_decay)
                    for be, bm in zip(ema.buffers(), model.buffers()):
                        be.copy_(bm)
            state.step += 1
            value = float(loss.detach())
            state.losses.append(value)
            smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
            bar.update(1)
            if state.step % 25 == 0:
                bar.set_postfix(loss=f"{smooth:.4f}")
            if cfg.ckpt_every and state.step % cfg.ckpt_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        # Nearly all time is spent before opt.step(): such an interrupted step has not touched the weights, so
        # rewinding the generator lets the resumed run redo it exactly. An interrupt that lands inside the
        # optimizer/EMA update is saved as it is (resuming then is not bit-exact).
        if not stepped:
            gen.set_state(rng_at_step_start)
        checkpoint()
        bar.close()
        if folder is not None:
            print(f"interrupted at step {state.step}; checkpoint saved in {folder}. Run the same call again to resume.")
        raise
    bar.close()
    checkpoint()
    model.eval()
    if ema is not None:
        ema.eval()
    return state
