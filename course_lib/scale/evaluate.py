"""Evaluate a distilled Stable Diffusion like the papers do, with one command; results as JSON and a table.

    python -m course_lib.scale.evaluate --pipeline runs/sd15/instaflow/pipeline --steps 1 --guidance-scale 1 \\
        --coco-images coco/val2017 --coco-captions coco/annotations/captions_val2017.json --split 2017-5k \\
        --clip openai/clip-vit-large-patch14 --out runs/sd15/eval

Protocol (InstaFlow, Table 1 / GigaGAN's COCO protocol), written down exactly:
    MS COCO 2017-5k   all 5000 images of val2017; for each image ONE of its captions, drawn with
                      torch.Generator().manual_seed(seed) (seed 0) among its annotations sorted by annotation id;
                      5000 samples, one per caption, from noise seeded by the caption's position
    MS COCO 2014-30k  30000 captions drawn without replacement (same generator) from val2014's annotations, one per
                      image; reference = the val2014 images of those captions
    images            generated at the pipeline's resolution (512 for SD 1.5), saved as PNG; reference images are
                      resized (shorter side, bicubic) and centre-cropped to the same resolution, then clean-fid
                      (mode "clean": its PIL bicubic resize to 299) computes FID with Inception-v3
                      (inception-2015-12-05.pt, clean-fid's weights)
    CLIP score        mean cosine similarity (x 1, not x 100) between the CLIP image and text embeddings of each
                      sample and its caption, with the CLIP model given by --clip (InstaFlow reports ViT-g/14;
                      name the model beside every number)
    latency           seconds per call at batch 1 (median of --repeats after --warmup calls, text encoding, the
                      UNet steps and the VAE decode included, CUDA synchronised); throughput in images/s at --batch
    grid              the first 16 samples as one PNG

Offline, each measurement says what it needs (the COCO images folder, Inception weights in /tmp, CLIP weights) and
is skipped, instead of failing obscurely. --digits evaluates a mini-SD-type pipeline (data/mini_sd, students of it):
prompt adherence by the digits classifier (course_lib.minisd.adherence) and KID against the held-out digits, over
--seeds, so laptop runs are judged too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .. import minisd
from .common import SourceError, device_of, write_json_atomic
from .data import centre_crop
from .export import load_lora_checked

INCEPTION = Path(tempfile.gettempdir()) / "inception-2015-12-05.pt"


def coco_captions(captions: str | os.PathLike, split: str = "2017-5k", seed: int = 0) -> list[dict]:
    """[{"image_id", "file_name", "caption"}] of the protocol's split (see the module docstring)."""
    obj = json.loads(Path(captions).read_text(encoding="utf-8"))
    if "annotations" not in obj or "images" not in obj:
        raise SourceError(f"{captions} is not a COCO captions file (annotations and images expected)")
    files = {im["id"]: im["file_name"] for im in obj["images"]}
    by_image: dict[int, list[dict]] = {}
    for a in sorted(obj["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(a["image_id"], []).append(a)
    g = torch.Generator().manual_seed(seed)
    ids = sorted(by_image)
    if split == "2014-30k":
        ids = [ids[i] for i in torch.randperm(len(ids), generator=g)[:30000].tolist()]
    elif split != "2017-5k":
        raise ValueError(f"unknown split {split!r}; valid: 2017-5k, 2014-30k")
    out = []
    for image_id in ids:
        anns = by_image[image_id]
        a = anns[int(torch.randint(len(anns), (1,), generator=g))]
        out.append({"image_id": image_id, "file_name": files[image_id], "caption": a["caption"].strip()})
    return out


def load_pipeline(folder: str | os.PathLike, device: torch.device, dtype: torch.dtype, lora: str | None = None):
    from diffusers import StableDiffusionPipeline

    if lora:
        pipe = load_lora_checked(folder, lora)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance_scale: float, seed: int, batch: int,
             resolution: int | None = None) -> Tensor:
    """Images (N, 3, H, W) in [0, 1]; sample k's noise from torch.Generator().manual_seed(seed + k) on the CPU."""
    out = []
    h = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, h // pipe.vae_scale_factor, h // pipe.vae_scale_factor)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        lat = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i + j))
                           for j in range(len(chunk))]).to(pipe.device, pipe.unet.dtype)
        out.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, latents=lat,
                        height=h, width=h, output_type="pt").images.float().cpu())
    return torch.cat(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def speed(pipe, steps: int, guidance_scale: float, batch: int, warmup: int = 2, repeats: int = 5) -> dict:
    """Latency (s per call at batch 1, median) and throughput (images/s at `batch`)."""
    res = {}
    for b in sorted({1, batch}):
        prompts = ["a photo of a cat"] * b
        for _ in range(warmup):
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt")
        times = []
        for _ in range(repeats):
            _sync(pipe.device)
            t0 = time.perf_counter()
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt")
            _sync(pipe.device)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        if b == 1:
            res["latency_s_batch1"] = med
        if b == batch:
            res[f"throughput_img_s_batch{batch}"] = b / med
    return res


def save_grid(images: Tensor, path: Path, nrow: int = 4) -> Path:
    x = (images[: nrow * nrow].clamp(0, 1) * 255).round().to(torch.uint8)
    n, _, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros(3, rows * h, nrow * w, dtype=torch.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = x[k]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def _save_pngs(images: Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(images):
        Image.fromarray((im.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(folder / f"{k:06d}.png")


def _reference_folder(coco_images: Path, records: list[dict], resolution: int, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for k, r in enumerate(records):
        dst = out / f"{k:06d}.png"
        if dst.is_file():
            continue
        centre_crop(Image.open(coco_images / r["file_name"]).convert("RGB"), resolution).save(dst)
    return out


@torch.no_grad()
def clip_score(images: Tensor, captions: list[str], clip: str, device: torch.device, batch: int = 64) -> float:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip).to(device).eval()
    proc = CLIPProcessor.from_pretrained(clip)
    sims = []
    for i in range(0, len(images), batch):
        inp = proc(text=captions[i:i + batch], images=list(images[i:i + batch]), return_tensors="pt", padding=True,
                   truncation=True, do_rescale=False).to(device)
        img = model.get_image_features(pixel_values=inp["pixel_values"])
        txt = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
        sims.append(torch.nn.functional.cosine_similarity(img, txt).cpu())
    return float(torch.cat(sims).mean())


def evaluate_coco(pipe, a, out: Path, device: torch.device) -> tuple[dict, list[str]]:
    """FID and CLIP score on the protocol's split, each skipped with a note when its inputs are missing."""
    res, notes = {}, []
    if not a.coco_captions:
        return res, ["COCO FID / CLIP score: pass --coco-captions (captions_val2017.json or captions_val2014.json) "
                     "and --coco-images (the val2017 / val2014 image folder)"]
    records = coco_captions(a.coco_captions, a.split, a.seed)[: a.limit or None]
    captions = [r["caption"] for r in records]
    images = generate(pipe, captions, a.steps, a.guidance_scale, a.seed, a.batch)
    _save_pngs(images, out / "samples")
    save_grid(images, out / "grid.png")
    res["n_samples"] = len(images)
    if not a.coco_images or not Path(a.coco_images).is_dir():
        notes.append(f"FID: the COCO images folder is needed (--coco-images; got {a.coco_images!r})")
    elif not INCEPTION.is_file():
        notes.append(f"FID: clean-fid's Inception weights are needed at {INCEPTION} (downloaded on first use from "
                     "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt)")
    else:
        from cleanfid import fid

        ref = _reference_folder(Path(a.coco_images), records, images.shape[-1], out / f"reference-{a.split}")
        res[f"fid_coco{a.split}"] = float(fid.compute_fid(str(out / "samples"), str(ref), mode="clean",
                                                          device=device, num_workers=0, verbose=False))
    if not a.clip:
        notes.append("CLIP score: pass --clip <a CLIP model folder or hub id in the local cache>")
    else:
        try:
            res["clip_score"] = clip_score(images, captions, a.clip, device)
            res["clip_model"] = a.clip
        except OSError as e:
            notes.append(f"CLIP score: could not load CLIP weights {a.clip!r} ({str(e).splitlines()[0]})")
    return res, notes


def evaluate_digits(pipe, a, out: Path) -> dict:
    """Adherence and held-out KID of a mini-SD-type pipeline on the course's prompt list, mean and std over seeds
    (minisd.evaluate_images); the grid shows the first seed's samples."""
    def images(prompts: list[str], s: int) -> Tensor:
        imgs = generate(pipe, prompts, a.steps, a.guidance_scale, 10_000 * s, a.batch) * 2 - 1
        if s == a.seeds[0]:
            save_grid((imgs + 1) / 2, out / "grid.png", nrow=8)
        return imgs

    return {"digits": minisd.evaluate_images(images, a.n_digits, a.seeds)}


def table(results: dict) -> str:
    rows = [(k, v) for k, v in results.items() if isinstance(v, (int, float))]
    digits = results.get("digits")
    if digits:
        rows += [(f"digits {k}", f"{digits['mean'][k]:.4g} ± {digits['std'][k]:.2g}") for k in digits["mean"]]
    lines = ["| measurement | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m course_lib.scale.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", required=True, help="a diffusers pipeline folder (an exported student, a teacher)")
    ap.add_argument("--lora", default=None, help="a LoRA folder to load onto --pipeline")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--guidance-scale", type=float, default=1.0, help="diffusers' scale (course w + 1); <= 1: none")
    ap.add_argument("--coco-images", default=None)
    ap.add_argument("--coco-captions", default=None)
    ap.add_argument("--split", default="2017-5k", choices=["2017-5k", "2014-30k"])
    ap.add_argument("--clip", default=None)
    ap.add_argument("--limit", type=int, default=0, help="evaluate on the first N captions only (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--digits", action="store_true", help="the mini-SD evaluation (adherence, held-out KID)")
    ap.add_argument("--n-digits", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--quiet", action="store_true", help="print nothing (results.json and results.md are written)")
    a = ap.parse_args(argv)
    device = device_of(a.device)
    out = Path(a.out)
    pipe = load_pipeline(a.pipeline, device, getattr(torch, a.dtype), a.lora)
    results: dict = {"pipeline": str(a.pipeline), "lora": a.lora, "steps": a.steps, "guidance_scale": a.guidance_scale,
                     "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                     "dtype": a.dtype}
    notes: list[str] = []
    if a.digits:
        results.update(evaluate_digits(pipe, a, out))
    else:
        res, notes = evaluate_coco(pipe, a, out, device)
        results.update(res)
    if a.speed:
        results.update(speed(pipe, a.steps, a.guidance_scale, a.batch, repeats=a.repeats))
    results["notes"] = notes
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(table(results) + "\n", encoding="utf-8")
    if not a.quiet:
        print(table(results))
        for n in notes:
            print("note:", n)
    return results


if __name__ == "__main__":
    main()
