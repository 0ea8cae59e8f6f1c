"""What every module of the scale-up shares: a stage's config file + command line, fingerprints of pretrained parts,
atomic files, the run folder's stage.json and the student export --run rebuilds from it. What only the training
stages share (the engine's settings, the process group, the train-then-export run) is in stage.py.

    parse(stage, description, add_args, argv)   JSON config (configs/<stage>.json, or --config FILE) as defaults,
                                                every setting also a --flag; returns an argparse.Namespace
    fingerprint_folder(folder)                  sha256 of a component folder's content (weights + configs without
                                                the library's version stamps; a tokenizer by what it does)
    describe_folder(folder), explain_difference the same content in parts, and what differs between two, in words
    scan_folder(folder)                         both from one read of the files
    model_key(source, parts)                    {"source", parts...: fingerprint, "detail"}: what a cache was made from
    check_key(found, wanted, what, path)        CacheMismatch naming every differing entry (weights, config key...)
    unet_record(base)                           a LoRA's record of its base UNet folder (base.json)
    save_atomic(path, tensors, metadata)        write to .tmp then rename: a killed run never leaves half a file
    STAGE_FILE, build_student(pipeline, ...)    a run's settings file; its UNet read as a rectified flow (+ LoRA)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from .. import sd as sdlib
from ..checkpoint import atomic_write

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SAMPLED_HASH_BYTES = 1 << 24       # larger weight files are fingerprinted by size + 16 MiB from start, middle, end


class CacheMismatch(RuntimeError):
    """A cache (embeddings, triplets) was made with other model parts or settings; nothing was changed. The message
    says what differs (weights, a config key, the tokenizer, a setting)."""


class SourceError(ValueError):
    """A data source yields nothing usable; the message says what was expected."""


def load_config(stage: str, path: str | os.PathLike | None = None) -> dict:
    """The stage's settings: the JSON file `path`, or the shipped configs/<stage>.json."""
    file = Path(path) if path else CONFIG_DIR / f"{stage}.json"
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist (shipped configs: "
                                f"{', '.join(sorted(p.name for p in CONFIG_DIR.glob('*.json')))})")
    if file.suffix in (".yaml", ".yml"):
        import yaml
        return dict(yaml.safe_load(file.read_text()) or {})
    return json.loads(file.read_text())


def parse(stage: str, description: str, add_args: Callable[[argparse.ArgumentParser], None],
          argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` with the config file's values as defaults (a flag on the command line wins).

    Every key of the config must be a known flag (dashes or underscores): a typo in a config file is an error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    ap = argparse.ArgumentParser(prog=f"python -m course_lib.scale.{stage}", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help=f"JSON/YAML settings (default: the shipped configs/{stage}.json)")
    add_args(ap)
    defaults = load_config(stage, known.config) if (known.config or (CONFIG_DIR / f"{stage}.json").is_file()) else {}
    dests = {a.dest for a in ap._actions}
    unknown = [k for k in defaults if k.replace("-", "_") not in dests and not k.startswith("_")]
    if unknown:
        raise SystemExit(f"{known.config or CONFIG_DIR / (stage + '.json')}: unknown settings {unknown}; "
                         f"known: {sorted(d for d in dests if d not in ('help', 'config'))}")
    ap.set_defaults(**{k.replace("-", "_"): v for k, v in defaults.items() if not k.startswith("_")})
    args = ap.parse_args(argv)
    missing = [a.option_strings[0] for a in ap._actions if getattr(a, "_required_setting", False)
               and getattr(args, a.dest) is None]
    if missing:
        ap.error(f"these settings are needed (in the config file or on the command line): {', '.join(missing)}")
    return args


def needed(ap: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    """A setting that must come from the config file or the command line (argparse's required=True would refuse
    a value given by the config file)."""
    action = ap.add_argument(*flags, default=None, **kwargs)
    action._required_setting = True


# Keys a config file carries that say how it was written, not what the component is: the library versions that
# wrote it and what loaders add (every key starting with "_" is dropped too: _diffusers_version, _name_or_path,
# _class_name, _commit_hash...). A component re-saved by a newer transformers or diffusers keeps its fingerprint.
VOLATILE_KEYS = ("transformers_version", "diffusers_version", "is_local", "local_files_only", "name_or_path",
                 "cache_dir")


def _config_content(path: Path) -> dict | None:
    """A JSON config file's content without its volatile keys (VOLATILE_KEYS, "_..."); None if it is no JSON object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    return {k: v for k, v in obj.items() if not k.startswith("_") and k not in VOLATILE_KEYS}


def _hash_bytes(f, start: int, size: int, h) -> None:
    """Hash bytes [start, start + size) of an open file: all of them, or 16 MiB at the start, middle and end."""
    if size <= 3 * SAMPLED_HASH_BYTES:
        f.seek(start)
        h.update(f.read(size))
        return
    for off in (0, size // 2, size - SAMPLED_HASH_BYTES):
        f.seek(start + off)
        h.update(f.read(SAMPLED_HASH_BYTES))


def _hash_file(path: Path, h) -> None:
    """Content, not packaging: JSON configs by _config_content, safetensors by their tensor table (without
    metadata) and data bytes, other files by their bytes."""
    h.update(path.name.encode())
    if path.suffix == ".json":
        content = _config_content(path)
        if content is not None:
            h.update(json.dumps(content, sort_keys=True).encode())
            return
    size = path.stat().st_size
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            h.update(json.dumps(header, sort_keys=True).encode())
            _hash_bytes(f, 8 + n, size - 8 - n, h)
        else:
            _hash_bytes(f, 0, size, h)


# Text a tokenizer's fingerprint tokenizes: words, digits, punctuation and bytes, so that merges show in it too.
TOKENIZER_PROBE = ["a photo of an astronaut riding a horse on the moon", "a handwritten seven with a thick stroke",
                   "the digit 7, thin, in red", "0123456789 !?,.;:'\"()[]{}<>-_+=*/\\|&%$#@^~`", "Ünïcödé ß 漢字 🙂"]


def fingerprint_tokenizer(folder: Path) -> str:
    """A tokenizer's fingerprint by what it does, not by its files (transformers re-saves a tokenizer as
    tokenizer.json + tokenizer_config.json only, dropping vocab.json and merges.txt): its vocabulary, maximum length
    and the token ids of TOKENIZER_PROBE."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    content = {"vocab": sorted(tok.get_vocab().items()), "max": tok.model_max_length,
               "probe": [tok(t, verbose=False).input_ids for t in TOKENIZER_PROBE]}
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def _content_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith((".tmp", ".lock")) and not p.name.startswith(".")]


def _is_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


class _Both:
    """Two sha256 hashers fed the same bytes (a weight file counts towards the fingerprint and the weights' hash)."""

    def __init__(self, *hashers):
        self.hashers = hashers

    def update(self, data: bytes) -> None:
        for h in self.hashers:
            h.update(data)


def scan_folder(folder: str | os.PathLike) -> tuple[str, dict]:
    """(fingerprint_folder, describe_folder) of a component folder from one read of its files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist")
    if _is_tokenizer(folder):
        fp = fingerprint_tokenizer(folder)
        return fp, {"tokenizer": fp}
    every, weights, config = hashlib.sha256(), hashlib.sha256(), {}
    for p in _content_files(folder):
        content = _config_content(p) if p.suffix == ".json" else None
        if content is None:
            _hash_file(p, _Both(every, weights))
        else:
            _hash_file(p, every)
            config[str(p.relative_to(folder))] = content
    return every.hexdigest()[:16], {"weights": weights.hexdigest()[:16], "config": config}


def fingerprint_folder(folder: str | os.PathLike) -> str:
    """sha256 (first 16 hex digits) over the content of a component folder's files (sorted by name): the same
    weights, configs and vocabulary give the same fingerprint however often, and by whichever library version, they
    were re-saved. A tokenizer folder (one with tokenizer_config.json) is fingerprinted by what it does
    (fingerprint_tokenizer). describe_folder splits the same content into parts a refusal can name."""
    return scan_folder(folder)[0]


def describe_folder(folder: str | os.PathLike) -> dict:
    """What a component folder is, in the parts a refusal names: {"tokenizer": its fingerprint} for a tokenizer,
    else {"weights": sha256 (16 hex digits) of every non-config file, "config": {file name: content without the
    volatile keys}}. Two folders with equal fingerprint_folder have equal descriptions, and the other way round."""
    return scan_folder(folder)[1]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def explain_difference(found: dict, wanted: dict, found_name: str = "cache", wanted_name: str = "this run") -> list[str]:
    """What differs between two describe_folder records, in words: the weights, each config key that differs (with
    both values), a config file only one has, or the tokenizer's behaviour. [] when they are equal."""
    out = []
    if "tokenizer" in found or "tokenizer" in wanted:
        if found.get("tokenizer") != wanted.get("tokenizer"):
            out.append("the tokenizer splits text into other tokens (another vocabulary, merges or maximum length)")
        return out
    if found.get("weights") != wanted.get("weights"):
        out.append("the weights differ")
    fc, wc = found.get("config", {}), wanted.get("config", {})
    for name in sorted(set(fc) | set(wc)):
        if name not in fc or name not in wc:
            out.append(f"{name} only in {found_name if name in fc else wanted_name}")
            continue
        for k in sorted(set(fc[name]) | set(wc[name])):
            a, b = fc[name].get(k, "(absent)"), wc[name].get(k, "(absent)")
            if a != b:
                out.append(f"{name} key {k!r}: {_short(a)} ({found_name}) != {_short(b)} ({wanted_name})")
    return out


def resolve_pipeline(source: str | os.PathLike) -> Path:
    """The local folder of a diffusers pipeline: a folder, or a hub id resolved in the local Hugging Face cache
    (snapshot_download with local_files_only unless HF_HUB_OFFLINE is unset). Raises with what to do."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file() or not (path / "unet").is_dir():
            raise SourceError(f"{path} is not a diffusers Stable Diffusion pipeline folder (it needs model_index.json, "
                              "unet/, vae/, text_encoder/, tokenizer/, scheduler/). Pass the pipeline's folder or a "
                              "hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download     # lazy: its hub client takes 0.4 s to import
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        return Path(snapshot_download(str(source), local_files_only=offline,
                                      allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
    except Exception as e:
        raise SourceError(f"could not find the pipeline {source!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                          "Pass a local diffusers folder, or download it first: "
                          f"huggingface-cli download {source}") from e


def model_key(source: str | os.PathLike, parts: tuple[str, ...]) -> dict:
    """{"source": the pipeline, part: fingerprint_folder(folder/part) for each part, "detail": {part:
    describe_folder(folder/part)}}: what a cache was made from, with enough detail for check_key to say what differs."""
    folder = resolve_pipeline(source)
    scans = {p: scan_folder(folder / p) for p in parts}
    return {"source": str(source), **{p: fp for p, (fp, _) in scans.items()},
            "detail": {p: detail for p, (_, detail) in scans.items()}}


def check_key(found: dict, wanted: dict, what: str, path: Path, fix: str) -> None:
    """CacheMismatch naming what differs: for a model part, its weights, the config keys or the tokenizer (from the
    keys' "detail"; a cache written before details were kept shows the two fingerprints), for a setting, its two
    values. The cache's source path itself may differ, and "detail" is compared through the parts it describes."""
    fd, wd = found.get("detail") or {}, wanted.get("detail") or {}
    diff = []
    for k in wanted:
        if k in ("source", "detail") or found.get(k) == wanted[k]:
            continue
        why = explain_difference(fd[k], wd[k]) if k in fd and k in wd else []
        diff.append(f"{k}: {'; '.join(why)}" if why else f"{k}: {found.get(k)!r} (cache) != {wanted[k]!r} (this run)")
    if diff:
        raise CacheMismatch(f"{path} holds {what} made with other model parts or settings than this run's "
                            f"({' | '.join(diff)}); it was left untouched. {fix}")


def unet_record(base: Path) -> dict:
    """What a LoRA's base.json records of the UNet folder it was trained on: {"unet_fingerprint", "unet_detail"}
    (both None when the base is no local folder). export.load_lora_checked compares them with a pipeline's UNet."""
    if not base.is_dir():
        return {"unet_fingerprint": None, "unet_detail": None}
    fp, detail = scan_folder(base)
    return {"unet_fingerprint": fp, "unet_detail": detail}


def save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(metadata, sort_keys=True)} if metadata else None
    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata=meta))


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def dtype_of(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(table)}")
    return table[name]


def device_of(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


STAGE_FILE = "stage.json"      # a training stage's settings, in its run folder (export --run reads it)


def build_student(pipeline: str | os.PathLike, lora: int = 0, lora_alpha: float | None = None, seed: int = 0,
                  device: torch.device | str = "cpu"):
    """(sd, student): the pipeline's parts, and its UNet read as a rectified flow (trainable, or with a LoRA)."""
    sd = sdlib.load_sd(resolve_pipeline(pipeline), device=device)
    student = sdlib.as_rectified_flow(sd.model)
    if lora:
        sdlib.add_lora(student, r=lora, alpha=lora_alpha, seed=seed)
        sd.model.lora = student.lora
    return sd, student
