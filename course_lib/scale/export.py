"""Export a trained student in the formats the ecosystem loads.

    full student   <out>/pipeline/: a diffusers StableDiffusionPipeline folder (safetensors) with the stock flow
                   scheduler (sd.FLOW_SCHEDULER), so plain diffusers samples the one-step student with
                   pipe(prompt, num_inference_steps=1, guidance_scale=1) and a 2-RF with 25 steps
    LoRA student   <out>/lora/pytorch_lora_weights.safetensors (diffusers / peft keys: pipe.load_lora_weights(folder)),
                   <out>/lora/lora_kohya.safetensors (kohya / ComfyUI / A1111 keys: lora_unet_<module>.lora_down.weight,
                   .lora_up.weight, .alpha) and base.json (the base UNet's fingerprint). A LoRA student of the
                   rectified-flow reading needs the flow scheduler too: swap it in with sd.flow_scheduler(...)

    python -m course_lib.scale.export --run runs/sd15/2rf [--from-ema/--no-from-ema] [--out DIR]   re-export a run's
        latest checkpoint (e.g. an intermediate one) with the settings in its stage.json
    python -m course_lib.scale.export --kohya runs/sd15/2rf-lora/lora --out lora_kohya.safetensors

One LoRA for every step count (Hyper-SD, TCD): `tcd_pipeline(base, lora)` is load_lora_checked with diffusers'
TCDScheduler; pipe(prompt, num_inference_steps=n, guidance_scale=1, eta=gamma) samples it at any n (eta is TCD's
gamma; tests/test_hypersd_serving.py holds it to the course's distill.tcd.sss at 1, 2, 4 and 8 steps).

Key names follow diffusers' own kohya reader (diffusers.loaders.lora_conversion_utils._convert_unet_lora_key):
kohya names SD 1.x modules by their diffusers path with dots as underscores; tests/test_scale_export.py loads the
kohya file back through diffusers and compares the UNet's output with the adapter's.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .. import sd as sdlib
from ..checkpoint import load_tensors
from ..sd import LORA_WEIGHTS
from ..train import TRAINER_WEIGHTS
from .common import (STAGE_FILE, SourceError, build_student, explain_difference, scan_folder, unet_record,
                     write_json_atomic)

KOHYA_FILE = "lora_kohya.safetensors"


def to_kohya(state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """diffusers/peft LoRA keys (unet.<module>.lora_A.weight / lora.down.weight ...) -> kohya keys
    lora_unet_<module with _ for .>.lora_down.weight / .lora_up.weight, plus .alpha (a 0-d tensor) per module."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if not k.startswith("unet."):
            raise ValueError(f"only UNet LoRA weights convert to kohya keys here; got {k!r}")
        for a, b in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"),
                     (".lora.down.weight", ".lora_down.weight"), (".lora.up.weight", ".lora_up.weight")):
            if k.endswith(a):
                module = k[len("unet."):-len(a)]
                name = "lora_unet_" + module.replace(".", "_")
                out[name + b] = v
                out[name + ".alpha"] = torch.tensor(float(alpha))
                break
        else:
            raise ValueError(f"unexpected LoRA key {k!r} (expected ...lora_A/lora_B.weight)")
    return out


def from_kohya(state: dict[str, Tensor], module_names: list[str]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The inverse on a known UNet: kohya keys -> (peft keys unet.<module>.lora_A/B.weight, alpha per module)."""
    by_kohya = {"lora_unet_" + m.replace(".", "_"): m for m in module_names}
    out, alphas = {}, {}
    for k, v in state.items():
        base, _, kind = k.partition(".")
        if base not in by_kohya:
            raise ValueError(f"kohya key {k!r} names no module of this UNet (another base model?)")
        m = by_kohya[base]
        if kind == "alpha":
            alphas[m] = float(v)
        else:
            out[f"unet.{m}." + {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}[kind]] = v
    return out, alphas


def save_kohya(lora_folder: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Convert a diffusers LoRA folder (sd.save_lora) to one kohya-format safetensors file (default in the folder)."""
    folder = Path(lora_folder)
    path = folder / LORA_WEIGHTS
    if not path.is_file():
        raise SourceError(f"{folder} holds no diffusers LoRA ({LORA_WEIGHTS}); export one with sd.save_lora")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    alpha = _alpha(meta, state)
    target = Path(out) if out else folder / KOHYA_FILE
    save_file(to_kohya(state, alpha), str(target), metadata={"ss_network_alpha": str(alpha),
                                                             "ss_network_dim": str(_rank(state))})
    return target


def _rank(state: dict[str, Tensor]) -> int:
    return int(next(v.shape[0] for k, v in state.items() if "lora_A" in k or "lora.down" in k))


def _alpha(meta: dict, state: dict[str, Tensor]) -> float:
    """The adapter's lora_alpha from the metadata diffusers writes ({"unet.lora_alpha": ..., ...}); one alpha for
    every module (per-module alpha_pattern / rank_pattern are refused rather than converted wrongly)."""
    cfg = json.loads(meta.get("lora_adapter_metadata", "{}"))
    cfg = {k.split(".", 1)[1] if k.startswith("unet.") else k: v for k, v in cfg.items()}
    if cfg.get("alpha_pattern") or cfg.get("rank_pattern"):
        raise ValueError("this LoRA has per-module alpha/rank patterns; the kohya conversion here writes one alpha")
    if "lora_alpha" in cfg:
        return float(cfg["lora_alpha"])
    return float(_rank(state))      # peft's default: alpha = r (scale 1)


def export_student(sd, student, out: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write `student` (an SDDenoiser; full or LoRA) under out/pipeline or out/lora (see the module docstring)."""
    out = Path(out)
    if student.lora is not None:
        folder = out / "lora"
        if student.reference is None:
            raise ValueError("the LoRA student has no reference to its base model")
        sdlib.save_lora(student, folder)
        save_kohya(folder)
        base = Path(student.reference["source"]) / (student.reference["subfolder"] or "")
        write_json_atomic(folder / "base.json", {"base": student.reference, **unet_record(base),
                                                 "process": student.process.config(),
                                                 "parameterization": student.parameterization, **(meta or {})})
        return folder
    folder = out / "pipeline"
    sdlib.save_student(sd, folder, model=student)
    write_json_atomic(folder / "course_stage.json", meta or {})
    return folder


def check_lora_base(pipe_folder: str | os.PathLike, lora_folder: str | os.PathLike) -> dict:
    """SourceError when the LoRA in `lora_folder` was trained on another base than `pipe_folder`'s UNet (base.json's
    UNet fingerprint; what differs in words); returns base.json's record ({} without one)."""
    lora_folder = Path(lora_folder)
    info = json.loads((lora_folder / "base.json").read_text()) if (lora_folder / "base.json").is_file() else {}
    have, detail = scan_folder(Path(pipe_folder) / "unet")
    if info.get("unet_fingerprint") and info["unet_fingerprint"] != have:
        why = explain_difference(info["unet_detail"], detail, "its base", "this UNet") \
            if info.get("unet_detail") else [f"fingerprint {info['unet_fingerprint']} against {have}"]
        raise SourceError(f"the LoRA in {lora_folder} was trained on another base model: {pipe_folder}'s UNet is not "
                          f"the one it was trained on ({info['base']['source']}): {'; '.join(why)}. "
                          "Load it onto the base it was trained on.")
    return info


def load_lora_checked(pipe_folder: str | os.PathLike, lora_folder: str | os.PathLike):
    """A StableDiffusionPipeline from `pipe_folder` with the LoRA in `lora_folder`, after checking that the LoRA
    was trained on this base (check_lora_base): another base model is a clear error, not a silent mismatch. A
    rectified-flow LoRA gets the flow scheduler."""
    from diffusers import StableDiffusionPipeline

    lora_folder = Path(lora_folder)
    info = check_lora_base(pipe_folder, lora_folder)
    pipe = StableDiffusionPipeline.from_pretrained(pipe_folder, safety_checker=None, requires_safety_checker=False)
    try:
        pipe.load_lora_weights(str(lora_folder))
    except (ValueError, RuntimeError, KeyError) as e:
        raise SourceError(f"the LoRA in {lora_folder} does not fit the UNet of {pipe_folder} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}): another base model?") from e
    if info.get("parameterization") == "velocity":
        pipe.scheduler = sdlib.flow_scheduler(pipe.scheduler.config)
    return pipe


def tcd_pipeline(pipe_folder: str | os.PathLike, lora_folder: str | os.PathLike):
    """The serving path of a LoRA distilled for every step count (Hyper-SD, TCD): load_lora_checked (another base
    model is refused) with diffusers' TCDScheduler, whose eta is TCD's gamma (distill.tcd.sss step for step)."""
    from diffusers import TCDScheduler

    pipe = load_lora_checked(pipe_folder, lora_folder)
    if sdlib.is_flow_scheduler(pipe.scheduler.config):
        raise SourceError(f"the LoRA in {lora_folder} reads the UNet as a rectified flow; TCDScheduler samples "
                          "epsilon / v-prediction models: use the flow scheduler it ships with")
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    return pipe


def reexport(run: str | os.PathLike, out: str | os.PathLike | None = None, from_ema: bool = True) -> Path:
    """Rebuild a run's student from its stage.json and its latest checkpoint (EMA weights if it has them); export."""
    run = Path(run)
    if not (run / STAGE_FILE).is_file():
        raise SourceError(f"{run} is not a run folder of course_lib.scale ({STAGE_FILE} is missing)")
    st = json.loads((run / STAGE_FILE).read_text())
    s = st["settings"]
    sd, student = build_student(s.get("teacher") or s["init"], s["lora"], s.get("lora_alpha"), s["seed"])
    tensors, config = load_tensors(run / "checkpoint", weights_name=TRAINER_WEIGHTS)
    prefix = "ema.student." if from_ema and any(k.startswith("ema.student.") for k in tensors) else "net.student."
    params = dict(student.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith(prefix):
                name = k[len(prefix):]
                (params[name] if name in params else dict(student.named_buffers())[name]).copy_(v)
    return export_student(sd, student, out or run, {"stage": st["stage"], "steps": config["step"],
                                                   "weights": prefix.split(".")[0], "reexported": True})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m course_lib.scale.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a run folder (stage.json + checkpoint/) to export again")
    ap.add_argument("--kohya", help="a diffusers LoRA folder to convert to kohya keys")
    ap.add_argument("--out", default=None)
    ap.add_argument("--from-ema", action=argparse.BooleanOptionalAction, default=True)
    a = ap.parse_args(argv)
    try:
        if a.kohya:
            print(save_kohya(a.kohya, a.out))
        elif a.run:
            print(reexport(a.run, a.out, a.from_ema))
        else:
            ap.error("pass --run RUN_FOLDER or --kohya LORA_FOLDER")
    except SourceError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
