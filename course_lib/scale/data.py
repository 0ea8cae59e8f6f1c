"""Data for the Stable Diffusion stages: prompt sources, and their text embeddings (and VAE latents of real images)
computed ONCE into a sharded safetensors cache keyed by the text encoder, tokenizer (and VAE) that made them.

    python -m course_lib.scale.data --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts captions_train2017.json --out runs/sd15/embeddings

Prompt sources (`read_source`), by what `--prompts` points at:
    course            the course's shipped prompt list, data/prompts/digits.txt
    *.txt             one prompt per line (UTF-8; blank lines skipped)
    *.jsonl           one {"prompt": ...} (or "caption" / "text") per line
    *.json            COCO captions (captions_train2017.json: annotations[].caption, image_id)
    *.tar, a folder of *.tar    webdataset shards: <key>.txt / .caption / .json caption, <key>.jpg / .png image
    *.parquet, a folder of them parquet shards (needs pyarrow): a caption column and, for images, an image column
A source that yields nothing fails at once, naming what it expected.

Cache layout (`--out`): index.json (the key, prompt count, shard size, the prompts' sha256), prompts.jsonl,
null.safetensors (the empty prompt's embedding, (1, L, D)), emb-00000.safetensors ... with "text" (k, L, D) and,
with --images, "latents" (k, 4, h, w). A cache made by another text encoder / tokenizer / VAE or from other prompts
is refused (CacheMismatch) and left as it is; a rerun after a kill skips the finished shards.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from .. import paths
from ..conditioning import Cond
from ..sd import load_sd
from .common import (CacheMismatch, SourceError, check_key, device_of, dtype_of, model_key, needed, parse,
                     resolve_pipeline, save_atomic, write_json_atomic)

CAPTION_KEYS = ("prompt", "caption", "text")
CAPTION_EXT = (".txt", ".caption")
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")
INDEX = "index.json"


@dataclass
class Example:
    prompt: str
    image: bytes | None = None      # encoded image (webdataset / parquet), None for prompt-only sources
    image_id: int | str | None = None


def course_prompts() -> Path:
    """The course's shipped prompt list (data/prompts/digits.txt)."""
    return paths.data_dir() / "prompts" / "digits.txt"


def _text_lines(path: Path) -> Iterator[Example]:
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise SourceError(f"{path} is not a text file (it holds NUL bytes); a prompt file is UTF-8 text, one prompt a line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path} is not UTF-8 text ({e}); a prompt file is UTF-8 text, one prompt a line") from e
    for line in text.splitlines():
        if line.strip():
            yield Example(line.strip())


def _caption_of(obj: dict, where: str) -> str:
    for k in CAPTION_KEYS:
        if isinstance(obj.get(k), str) and obj[k].strip():
            return obj[k].strip()
    raise SourceError(f"{where}: no caption; expected one of the keys {CAPTION_KEYS} with a non-empty string")


def _jsonl(path: Path) -> Iterator[Example]:
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            obj = json.loads(line)
            yield Example(_caption_of(obj, f"{path}, line {i + 1}"), image_id=obj.get("label", obj.get("image_id")))


def _coco(path: Path) -> Iterator[Example]:
    obj = json.loads(path.read_text(encoding="utf-8"))
    anns = obj.get("annotations") if isinstance(obj, dict) else None
    if not isinstance(anns, list) or not anns or not all(isinstance(a, dict) and "caption" in a for a in anns[:10]):
        raise SourceError(f"{path} is not a COCO captions file: expected {{'annotations': [{{'image_id': ..., "
                          "'caption': ...}, ...]}} (captions_train2017.json / captions_val2017.json)")
    for a in anns:
        yield Example(str(a["caption"]).strip(), image_id=a.get("image_id"))


def _tar_shards(paths_: list[Path], want_images: bool) -> Iterator[Example]:
    for shard in paths_:
        groups: dict[str, dict[str, bytes]] = {}        # members by key, in the shard's order
        with tarfile.open(shard) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(m.name), key)
                groups.setdefault(key, {})["." + ext.lower()] = tar.extractfile(m).read()
        for key, g in groups.items():
            cap = next((g[e].decode("utf-8").strip() for e in CAPTION_EXT if e in g), None)
            if cap is None and ".json" in g:
                cap = _caption_of(json.loads(g[".json"]), f"{shard}:{key}.json")
            img = next((g[e] for e in IMAGE_EXT if e in g), None)
            if cap and (img is not None or not want_images):
                yield Example(cap, img, key)


def _parquet(paths_: list[Path], want_images: bool) -> Iterator[Example]:
    try:
        import pyarrow.parquet as pq  # type: ignore[import-not-found]
    except ImportError as e:
        raise SourceError("reading parquet shards needs pyarrow, which is not installed here: pip install pyarrow "
                          "(or convert the shards to webdataset .tar files, which the course reads with tarfile)") from e
    for p in paths_:
        table = pq.read_table(p)
        cols = table.column_names
        cap = next((c for c in (*CAPTION_KEYS, "TEXT", "caption_text") if c in cols), None)
        if cap is None:
            raise SourceError(f"{p}: no caption column; expected one of {CAPTION_KEYS}, found {cols}")
        img = next((c for c in ("image", "jpg", "png", "img") if c in cols), None)
        if want_images and img is None:
            raise SourceError(f"{p}: no image column (image / jpg / png); found {cols}")
        for row in table.to_pylist():
            data = row.get(img) if img else None
            if isinstance(data, dict):
                data = data.get("bytes")
            if row[cap]:
                yield Example(str(row[cap]).strip(), data)


def read_source(source: str | os.PathLike, images: bool = False, limit: int | None = None) -> list[Example]:
    """The examples of a prompt source (see the module docstring). images=True keeps only examples with an image
    (webdataset / parquet). Raises SourceError when the source yields nothing, naming what it expected."""
    path = course_prompts() if str(source) == "course" else Path(source).expanduser()
    if not path.exists():
        extra = (" (the course's prompt list is written by the mini-SD part of the course; until it exists pass "
                 "your own prompt file)" if str(source) == "course" else "")
        raise SourceError(f"prompt source {path} does not exist{extra}")
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    tars = [p for p in files if p.suffix == ".tar"]
    parquets = [p for p in files if p.suffix == ".parquet"]
    if path.is_dir() and not (tars or parquets):
        raise SourceError(f"{path} is a folder without .tar (webdataset) or .parquet shards")
    if images and not (tars or parquets):
        raise SourceError(f"{path}: real images come from webdataset .tar or .parquet shards of image-caption pairs; "
                          "a prompt list has none")
    if tars:
        it, expected = _tar_shards(tars, images), "webdataset members <key>.txt (caption)" + (" and <key>.jpg/.png" if images else "")
    elif parquets:
        it, expected = _parquet(parquets, images), "rows with a caption column" + (" and an image column" if images else "")
    elif path.suffix == ".json":
        it, expected = _coco(path), "COCO annotations with captions"
    elif path.suffix == ".jsonl":
        it, expected = _jsonl(path), 'lines {"prompt": ...}'
    else:
        it, expected = _text_lines(path), "one prompt per line"
    out = list(itertools.islice(it, limit or None))
    if not out:
        raise SourceError(f"prompt source {path} yielded nothing: expected {expected}")
    return out


def centre_crop(im: Image.Image, resolution: int) -> Image.Image:
    """im with its shorter side resized to `resolution` (bicubic), then its centre resolution x resolution square."""
    w, h = im.size
    s = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


def load_image(data: bytes, resolution: int) -> Tensor:
    """An encoded image -> (3, r, r) in [-1, 1]: RGB, shorter side resized to r (bicubic), centre crop."""
    im = centre_crop(Image.open(io.BytesIO(data)).convert("RGB"), resolution)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


def prompts_sha(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def embedding_key(model: str | os.PathLike, images: bool, resolution: int | None) -> dict:
    parts = ("text_encoder", "tokenizer") + (("vae",) if images else ())
    return {**model_key(model, parts), **({"resolution": resolution} if images else {})}


@torch.no_grad()
def build_embeddings(model: str | os.PathLike, prompts: str | os.PathLike, out: str | os.PathLike,
                     images: bool = False, resolution: int = 512, shard_size: int = 1024, batch_size: int = 64,
                     limit: int | None = None, device: str | None = None, dtype: str = "float16",
                     progress: bool = True) -> Path:
    """Text embeddings (and latents) of every example of `prompts` with `model`'s text encoder (and VAE): the cache
    described in the module docstring. Returns the cache folder."""
    out = Path(out)
    examples = read_source(prompts, images=images, limit=limit)
    texts = [e.prompt for e in examples]
    key = embedding_key(model, images, resolution)
    index = {"key": key, "n": len(texts), "shard_size": shard_size, "prompts_sha": prompts_sha(texts),
             "source": str(prompts), "dtype": dtype, "images": images}
    ipath = out / INDEX
    if ipath.is_file():
        old = json.loads(ipath.read_text())
        check_key({**old["key"], **{k: old.get(k) for k in ("n", "shard_size", "prompts_sha")}},
                  {**key, **{k: index[k] for k in ("n", "shard_size", "prompts_sha")}}, "text embeddings", ipath,
                  "Use another --out folder, or delete this one to rebuild it.")
    dev = device_of(device)
    sd = load_sd(resolve_pipeline(model), device=dev)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ipath, index)
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t, "id": e.image_id}) + "\n"
                                               for t, e in zip(texts, examples)), encoding="utf-8")
    store = dtype_of(dtype)
    null = sd.text.embed([""]).to(store)
    save_atomic(out / "null.safetensors", {"null_text": null}, {"key": key})
    shards = range((len(texts) + shard_size - 1) // shard_size)
    bar = tqdm(total=len(texts), desc="embeddings", disable=not progress, mininterval=0.5, unit="prompt")
    for s in shards:
        path = out / f"emb-{s:05d}.safetensors"
        lo, hi = s * shard_size, min(len(texts), (s + 1) * shard_size)
        if path.is_file():
            bar.update(hi - lo)
            continue
        text, lat = [], []
        for i in range(lo, hi, batch_size):
            j = min(hi, i + batch_size)
            text.append(sd.text.embed(texts[i:j]).to(store).cpu())
            if images:
                imgs = torch.stack([load_image(examples[k].image, resolution) for k in range(i, j)]).to(dev)
                lat.append(sd.vae.encode(imgs).to(store).cpu())
            bar.update(j - i)
        save_atomic(path, {"text": torch.cat(text), **({"latents": torch.cat(lat)} if images else {})},
                    {"key": key, "first": lo})
    bar.close()
    return out


class Embeddings:
    """A cache written by build_embeddings: text(idx) -> (k, L, D), latents(idx), null (1, L, D), prompts."""

    def __init__(self, folder: str | os.PathLike, expect: dict | None = None):
        self.folder = Path(folder)
        ipath = self.folder / INDEX
        if not ipath.is_file():
            raise SourceError(f"{self.folder} holds no text-embedding cache ({INDEX} is missing): build it with "
                              "python -m course_lib.scale.data --model ... --prompts ... --out " + str(self.folder))
        self.index = json.loads(ipath.read_text())
        if expect is not None:
            check_key(self.index["key"], {k: v for k, v in expect.items()
                                          if k in ("text_encoder", "tokenizer", "detail")},
                      "text embeddings", ipath, "Build the embeddings with this model's text encoder and tokenizer "
                      "(python -m course_lib.scale.data) into another folder.")
        self.n, self.size = int(self.index["n"]), int(self.index["shard_size"])
        n_shards = (self.n + self.size - 1) // self.size
        missing = [s for s in range(n_shards) if not (self.folder / f"emb-{s:05d}.safetensors").is_file()]
        if missing:
            raise SourceError(f"{self.folder}: shards {missing[:5]}... are missing; rerun the embeddings command to finish them")
        self._files = [safe_open(str(self.folder / f"emb-{s:05d}.safetensors"), "pt") for s in range(n_shards)]
        with safe_open(str(self.folder / "null.safetensors"), "pt") as f:
            self.null = f.get_tensor("null_text").float()

    def _rows(self, name: str, idx: Tensor) -> Tensor:
        rows = []
        for i in idx.tolist():
            if not 0 <= i < self.n:
                raise IndexError(f"prompt index {i} outside the cache's {self.n} prompts")
            s, r = divmod(i, self.size)
            rows.append(self._files[s].get_slice(name)[r:r + 1])
        return torch.cat(rows).float()

    def text(self, idx: Tensor) -> Tensor:
        return self._rows("text", idx)

    def latents(self, idx: Tensor) -> Tensor:
        if not self.index.get("images"):
            raise SourceError(f"{self.folder} holds text embeddings only; real-image latents need --images")
        return self._rows("latents", idx)

    def cond(self, idx: Tensor):
        return Cond(text=self.text(idx), null_text=self.null)

    def prompts(self) -> list[str]:
        return [json.loads(l)["prompt"] for l in (self.folder / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]


def main(argv: list[str] | None = None) -> None:
    def add(ap):
        needed(ap, "--model", help="SD pipeline: hub id (in the local HF cache) or a diffusers folder")
        needed(ap, "--prompts", help="course | prompts.txt | prompts.jsonl | COCO captions .json | .tar / .parquet shards")
        needed(ap, "--out", help="cache folder")
        ap.add_argument("--images", action="store_true", help="also encode the real images (webdataset / parquet)")
        ap.add_argument("--resolution", type=int, default=512)
        ap.add_argument("--shard-size", type=int, default=1024)
        ap.add_argument("--batch-size", type=int, default=64)
        ap.add_argument("--limit", type=int, default=None, help="use the first N examples only")
        ap.add_argument("--device", default="auto")
        ap.add_argument("--dtype", default="float16", help="storage dtype of embeddings and latents")

    a = parse("data", __doc__, add, argv)
    try:
        out = build_embeddings(a.model, a.prompts, a.out, a.images, a.resolution, a.shard_size, a.batch_size, a.limit,
                               a.device, a.dtype)
    except (SourceError, CacheMismatch) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"embeddings of {json.loads((out / INDEX).read_text())['n']} prompts in {out}")


if __name__ == "__main__":
    main()
