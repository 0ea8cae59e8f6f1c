"""Checkpoints are a folder with `model.safetensors` (tensors only) and `config.json`. Nothing is ever unpickled.

    save_tensors(folder, tensors, config)   write both files atomically (a killed run never leaves half a file)
    load_tensors(folder)                    -> (tensors, config), with errors that say which file and what to do
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the file and how to recreate it."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, 0o644)  # safetensors creates files readable by their owner only
    os.replace(tmp, path)


def save_tensors(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict,
                 weights_name: str = WEIGHTS) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(folder / weights_name, lambda p: save_file(flat, str(p)))
    _atomic_write(folder / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return folder


def load_tensors(folder: str | os.PathLike, how_to_recreate: str = "",
                 weights_name: str = WEIGHTS) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    hint = f" To recreate it: {how_to_recreate}" if how_to_recreate else ""
    wpath, cpath = folder / weights_name, folder / CONFIG
    for p in (wpath, cpath):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing.{hint}")
    try:
        config = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint config {cpath} is corrupted ({e}).{hint}") from e
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint weights {wpath} are corrupted ({e}).{hint}") from e
    return tensors, config
