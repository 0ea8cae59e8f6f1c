"""InstaFlow's triplets (noise eps, teacher latent x0, prompt index) from a Stable Diffusion teacher, on every process.

    torchrun --nproc_per_node 8 -m course_lib.scale.triplets --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --embeddings runs/sd15/embeddings --out runs/sd15/triplets --count 100000 --w 4.0

x0 = the teacher's probability-flow ODE from eps given the prompt, with classifier-free guidance in the course's
convention w (diffusers' guidance_scale = 1 + w; guidance.cfg) and the course's DPM-Solver++(2M) (samplers.dpmpp2m,
default grid of the teacher's process). The same module makes stage 2's pairs from the 2-RF (a flow teacher:
--w 0 --sampler euler).

Index i of the n triplets: noise from its own seed (`noise_seed(seed, i)`), prompt i mod (number of prompts). The
triplets are split into shards of --shard-size consecutive indices; process r of W generates shards r, r + W, ...
So the triplets do not depend on the number of processes, and a killed run resumes by skipping finished shards
(each written atomically). index.json keys the cache by the teacher's UNet and scheduler, w, sampler, steps, seed,
n, shard size and the embeddings: a cache from another teacher or guidance scale is refused and left untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from .. import grids
from ..guidance import cfg
from ..samplers import get_sampler
from ..sd import load_sd
from .common import (CacheMismatch, SourceError, check_key, device_of, dtype_of, model_key, needed, parse,
                     resolve_pipeline, save_atomic, write_json_atomic)
from .data import Embeddings
from .stage import dist_info

INDEX = "index.json"


def noise_seed(seed: int, i: int) -> int:
    """The seed of triplet i's noise: 63 bits of sha256("seed:i") (independent streams per index)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def noise(seed: int, idx: range | list[int], shape: tuple[int, ...]) -> Tensor:
    """(k, *shape) standard normal noise, row j from torch.Generator().manual_seed(noise_seed(seed, idx[j])) on the CPU."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, i))) for i in idx])


def teacher_key(teacher: str | os.PathLike) -> dict:
    return model_key(teacher, ("unet", "scheduler"))


def _init_group(world: int):
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist if world > 1 else None


@torch.no_grad()
def generate_triplets(teacher: str | os.PathLike, embeddings: str | os.PathLike, out: str | os.PathLike, n: int,
                      w: float = 2.0, steps: int = 25, sampler: str = "dpmpp2m", seed: int = 0, shard_size: int = 256,
                      batch_size: int = 16, device: str | None = None, model_dtype: str = "float32",
                      store_dtype: str = "float32", max_shards: int | None = None, progress: bool = True) -> Path:
    """Generate this process's shards of the n triplets (see the module docstring); returns the output folder."""
    rank, world = dist_info()
    dist = _init_group(world)
    out = Path(out)
    emb = Embeddings(embeddings, expect=None)
    key = {**teacher_key(teacher), "w": float(w), "sampler": sampler, "steps": int(steps), "seed": int(seed),
           "n": int(n), "shard_size": int(shard_size), "prompts_sha": emb.index["prompts_sha"],
           "text_encoder": emb.index["key"]["text_encoder"], "store_dtype": store_dtype}
    ipath = out / INDEX
    if ipath.is_file():
        check_key(json.loads(ipath.read_text())["key"], key, "triplets", ipath,
                  "Use another --out folder for this teacher / these settings (or delete this one to regenerate).")
    folder = resolve_pipeline(teacher)
    emb_key = emb.index["key"]
    check_key(emb_key, {**emb_key, **model_key(folder, ("text_encoder", "tokenizer"))}, "text embeddings",
              Path(embeddings) / "index.json", "The embeddings must come from the teacher's own text encoder.")
    dev, mdtype = device_of(device), dtype_of(model_dtype)
    sd = load_sd(folder, device=dev, dtype=mdtype)
    unet_cfg = sd.model.unet.config
    shape = (unet_cfg.in_channels, unet_cfg.sample_size, unet_cfg.sample_size)
    if rank == 0:
        write_json_atomic(ipath, {"key": key, "latent_shape": list(shape), "command": "python -m course_lib.scale.triplets"})
    model = cfg(sd.model, w) if w else sd.model
    run, grid = get_sampler(sampler), grids.default_grid(steps, sd.model.process)
    n_shards = (n + shard_size - 1) // shard_size
    mine = [s for s in range(rank, n_shards, world) if not (out / f"tri-{s:05d}.safetensors").is_file()]
    if max_shards is not None:
        mine = mine[:max_shards]
    bar = tqdm(total=sum(min(n, (s + 1) * shard_size) - s * shard_size for s in mine) * world, unit="img",
               desc=f"triplets ({sampler} {steps}, w={w}, {world} proc.)", disable=not (progress and rank == 0),
               mininterval=0.5)
    t0, made = time.perf_counter(), 0
    store = dtype_of(store_dtype)
    for s in mine:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        eps_all, x0_all, p_all = [], [], []
        for i in range(lo, hi, batch_size):
            idx = list(range(i, min(hi, i + batch_size)))
            eps = noise(seed, idx, shape)
            prompt = torch.tensor(idx) % emb.n
            c = emb.cond(prompt).to(dev)
            x0 = run(model, eps.to(dev), grid, sd.model.process, cond=c)   # float32 solver state
            eps_all.append(eps.to(store))
            x0_all.append(x0.float().cpu().to(store))
            p_all.append(prompt)
            bar.update(len(idx) * world)
        save_atomic(out / f"tri-{s:05d}.safetensors",
                    {"eps": torch.cat(eps_all), "x0": torch.cat(x0_all), "prompt": torch.cat(p_all),
                     "index": torch.arange(lo, hi)}, {"key": key})
        made += hi - lo
    bar.close()
    if dist is not None:
        dist.barrier()
    if rank == 0 and progress:
        dt = time.perf_counter() - t0
        print(f"triplets: {made} on process 0 in {dt:.1f} s ({made / max(dt, 1e-9):.2f} img/s per process); "
              f"{sum((out / f'tri-{s:05d}.safetensors').is_file() for s in range(n_shards))}/{n_shards} shards in {out}")
    return out


class Triplets:
    """A finished triplet cache: rows(idx) -> (eps, x0, prompt index) for global indices idx (k,)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        ipath = self.folder / INDEX
        if not ipath.is_file():
            raise SourceError(f"{self.folder} holds no triplets ({INDEX} is missing): make them with "
                              "python -m course_lib.scale.triplets")
        self.index = json.loads(ipath.read_text())
        self.key = self.index["key"]
        self.n, self.size = int(self.key["n"]), int(self.key["shard_size"])
        n_shards = (self.n + self.size - 1) // self.size
        missing = [s for s in range(n_shards) if not (self.folder / f"tri-{s:05d}.safetensors").is_file()]
        if missing:
            raise SourceError(f"{self.folder}: {len(missing)} of {n_shards} triplet shards are missing (e.g. {missing[:3]}); "
                              "rerun the same triplets command to finish them")
        self._files = [safe_open(str(self.folder / f"tri-{s:05d}.safetensors"), "pt") for s in range(n_shards)]

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        eps, x0, p = [], [], []
        for i in idx.tolist():
            s, r = divmod(int(i), self.size)
            f = self._files[s]
            eps.append(f.get_slice("eps")[r:r + 1])
            x0.append(f.get_slice("x0")[r:r + 1])
            p.append(f.get_slice("prompt")[r:r + 1])
        return torch.cat(eps).float(), torch.cat(x0).float(), torch.cat(p)


def main(argv: list[str] | None = None) -> None:
    def add(ap):
        needed(ap, "--teacher", help="SD pipeline (hub id or folder); for stage 2 the 2-RF's exported pipeline")
        needed(ap, "--embeddings", help="the text-embedding cache (python -m course_lib.scale.data)")
        needed(ap, "--out")
        needed(ap, "--count", type=int, help="number of triplets")
        ap.add_argument("--w", type=float, default=2.0, help="guidance, course convention (guidance_scale = 1 + w)")
        ap.add_argument("--steps", type=int, default=25)
        ap.add_argument("--sampler", default="dpmpp2m")
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--shard-size", type=int, default=256)
        ap.add_argument("--batch-size", type=int, default=16)
        ap.add_argument("--device", default="auto")
        ap.add_argument("--model-dtype", default="float32", help="the teacher's weights (float16 on a GPU)")
        ap.add_argument("--store-dtype", default="float32")
        ap.add_argument("--max-shards", type=int, default=None, help="stop after this many shards (per process)")
        ap.add_argument("--no-progress", action="store_true")

    a = parse("triplets", __doc__, add, argv)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        generate_triplets(a.teacher, a.embeddings, a.out, a.count, a.w, a.steps, a.sampler, a.seed, a.shard_size,
                          a.batch_size, a.device, a.model_dtype, a.store_dtype, a.max_shards, not a.no_progress)
    except (SourceError, CacheMismatch) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
