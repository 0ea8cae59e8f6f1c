"""Shared by the Stable Diffusion stage tests (test_scale_lcm, test_scale_dmd2): a small webdataset shard of
image-caption pairs for a stage to train on."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

from course_lib import minisd


def _png(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def shards(path: Path, n: int = 8) -> Path:
    """A webdataset shard of n image-caption pairs: mini-SD digits (16 x 16, coloured) and their captions."""
    d = minisd.training_digits()
    colours = list(minisd.COLOURS)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            c = colours[i % len(colours)]
            img = minisd.colourize(d.x[i:i + 1], minisd.COLOUR_TABLE[i % len(colours)].expand(1, 3))[0]
            rgb = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            cap = minisd.caption(int(d.y[i]), minisd.THICKNESS[int(d.thick[i])], c, 4).encode()
            for name, raw in ((f"{i:03d}.png", _png(rgb)), (f"{i:03d}.txt", cap)):
                info = tarfile.TarInfo(name)
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return path
