"""Backbones, and the adapter that turns any backbone into the course's model interface.

Every backbone has the signature `net(x, timestep, class_labels=None) -> out` and knows nothing about the
noise process or the parameterization. `Denoiser(net, process, parameterization)` is the course model:

    model(x, t, y=None) -> Pred(x0, eps)          x (B, ...), t (B,) in [0, 1], y (B,) int class labels

It feeds the backbone `process.timestep(t)` and converts its native output with `predictions.to_pred`.
Checkpoints store the backbone's constructor arguments under a registered architecture name (never a
class path), the process and the parameterization; `load_denoiser` rebuilds the model from them.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .checkpoint import load_tensors, save_tensors, CheckpointError
from .predictions import Pred, to_pred
from .processes import AffineProcess, make_process


def timestep_embedding(timestep: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017; DDPM) of timesteps in [0, 1000]: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLP2D(nn.Module):
    """Time-conditioned MLP for low-dimensional data: `depth` hidden layers of width `hidden`, SiLU.

    The time embedding (plus a class embedding when num_classes is set, with index num_classes reserved for
    the null label of classifier-free guidance) is added to every hidden layer's pre-activation.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, num_classes: int | None = None,
                 emb_dim: int = 128):
        super().__init__()
        self.dim, self.hidden, self.depth, self.num_classes, self.emb_dim = dim, hidden, depth, num_classes, emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.emb_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    def config(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "num_classes": self.num_classes,
                "emb_dim": self.emb_dim}

    def embed(self, timestep: Tensor, class_labels: Tensor | None) -> Tensor:
        e = self.time_mlp(timestep_embedding(timestep, self.emb_dim).to(self.inp.weight.dtype))
        if self.class_emb is not None:
            if class_labels is None:  # unconditional call of a conditional net: use the null label
                class_labels = torch.full((len(timestep),), self.num_classes, device=timestep.device)
            e = e + self.class_emb(class_labels)
        return torch.nn.functional.silu(e)

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        e = self.embed(timestep, class_labels)                                     # (B, hidden)
        h = torch.nn.functional.silu(self.inp(x) + self.emb_proj[0](e))          # (B, hidden)
        for layer, proj in zip(self.layers, self.emb_proj[1:]):
            h = torch.nn.functional.silu(layer(h) + proj(e))
        return self.out(h)                                                         # (B, dim)


class UNet(nn.Module):
    """diffusers' UNet2DModel behind the course's backbone signature (it returns a tensor, not an output object).

    Class-conditional when num_classes is set; index num_classes is the null label for guidance.
    """

    def __init__(self, sample_size: int = 16, in_channels: int = 1, block_out_channels: tuple[int, ...] = (32, 64, 64),
                 layers_per_block: int = 1, num_classes: int | None = None, attention: bool = False,
                 norm_num_groups: int = 8):
        super().__init__()
        from diffusers import UNet2DModel

        self.kwargs = dict(sample_size=sample_size, in_channels=in_channels, block_out_channels=list(block_out_channels),
                           layers_per_block=layers_per_block, num_classes=num_classes, attention=attention,
                           norm_num_groups=norm_num_groups)
        n = len(block_out_channels)
        down = ["DownBlock2D"] * n
        up = ["UpBlock2D"] * n
        if attention:  # attention at the lowest resolution only
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.num_classes = num_classes
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=norm_num_groups,
            num_class_embeds=(num_classes + 1) if num_classes else None,
        )

    def config(self) -> dict:
        return dict(self.kwargs)

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if self.num_classes and class_labels is None:
            class_labels = torch.full((len(x),), self.num_classes, device=x.device, dtype=torch.long)
        return self.unet(x, timestep, class_labels=class_labels).sample


class DiffusersUNet(nn.Module):
    """Adapter for any diffusers UNet2DModel built elsewhere (e.g. google/ddpm-cifar10-32): returns `.sample`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.unet(x, timestep, class_labels=class_labels).sample


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp2d": MLP2D, "unet": UNet}


def build_net(arch: str, **kwargs: Any) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model architecture {arch!r}; valid ones: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


class Denoiser(nn.Module):
    """The course's model interface around a backbone: (x, t, y) -> Pred(x0, eps)."""

    def __init__(self, net: nn.Module, process: AffineProcess, parameterization: str):
        super().__init__()
        self.net, self.process, self.parameterization = net, process, parameterization

    def raw(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The backbone's native output (what a training loss in this parameterization compares)."""
        return self.net(x, self.process.timestep(t).to(x.dtype), class_labels=y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Pred:
        return to_pred(self.raw(x, t, y), x, t.to(x.dtype), self.process, self.parameterization)

    def config(self) -> dict:
        arch = next((k for k, v in ARCHITECTURES.items() if isinstance(self.net, v)), None)
        if arch is None or not hasattr(self.net, "config"):
            raise ValueError(f"cannot save a Denoiser around {type(self.net).__name__}: register it in ARCHITECTURES")
        return {"arch": arch, "net": self.net.config(), "process": self.process.config(),
                "parameterization": self.parameterization}


def build_denoiser(config: dict) -> Denoiser:
    """Rebuild a Denoiser (random weights) from `Denoiser.config()`."""
    proc = dict(config["process"])
    return Denoiser(build_net(config["arch"], **config["net"]), make_process(proc.pop("name"), **proc),
                    config["parameterization"])


def save_denoiser(folder: str | os.PathLike, model: Denoiser, extra: dict | None = None) -> None:
    save_tensors(folder, model.state_dict(), {"denoiser": model.config(), **(extra or {})})


def load_denoiser(folder: str | os.PathLike, how_to_recreate: str = "", device: str | torch.device = "cpu"
                  ) -> tuple[Denoiser, dict]:
    """Load a Denoiser saved by `save_denoiser`; returns (model in eval mode, the whole config)."""
    tensors, config = load_tensors(folder, how_to_recreate)
    if "denoiser" not in config:
        raise CheckpointError(f"{folder}/config.json does not describe a denoiser (no 'denoiser' key).")
    model = build_denoiser(config["denoiser"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {folder} do not match the model its config.json describes: {e}") from e
    return model.to(device).eval(), config
