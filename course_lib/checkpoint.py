"""Checkpoints are a folder with `model.safetensors` (tensors only) and `config.json`. Nothing is ever unpickled.

    save_tensors(folder, tensors, config)   write both files atomically (a killed run never leaves half a file)
    load_tensors(folder)                    -> (tensors, config), with errors that say which file and what to do

With `embed_config=True` the config is also stored inside the weights file (safetensors metadata), so the
weights file alone is one atomic unit; config.json is then a human-readable mirror, and `load_tensors` trusts
the embedded copy (a run killed between the two writes leaves a stale config.json, never a wrong resume).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the file and how to recreate it."""


def atomic_write(path: Path, write) -> None:
    """write(tmp) to path's .tmp sibling, then rename it to path: a killed run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, 0o644)  # safetensors creates files readable by their owner only
    os.replace(tmp, path)


def save_tensors(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict,
                 weights_name: str = WEIGHTS, embed_config: bool = False) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True)
    meta = {"config": text} if embed_config else None
    atomic_write(folder / weights_name, lambda p: save_file(flat, str(p), metadata=meta))
    atomic_write(folder / CONFIG, lambda p: p.write_text(text))
    return folder


def load_tensors(folder: str | os.PathLike, how_to_recreate: str = "",
                 weights_name: str = WEIGHTS) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    hint = f" To recreate it: {how_to_recreate}" if how_to_recreate else ""
    wpath, cpath = folder / weights_name, folder / CONFIG
    if not wpath.is_file():
        raise CheckpointError(f"checkpoint file {wpath} is missing.{hint}")
    try:
        with safe_open(str(wpath), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint weights {wpath} are corrupted ({e}).{hint}") from e
    if "config" in meta:  # written atomically with the tensors: authoritative
        return tensors, json.loads(meta["config"])
    if not cpath.is_file():
        raise CheckpointError(f"checkpoint file {cpath} is missing.{hint}")
    try:
        config = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint config {cpath} is corrupted ({e}).{hint}") from e
    return tensors, config
