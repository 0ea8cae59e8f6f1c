"""Image data. Offline: scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes), upsampled.
Online: CIFAR-10 through torchvision (see `load_cifar10`). Images are float tensors in [-1, 1], (N, C, H, W).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import paths

DATA_DIR = paths.data_dir()          # the course's data/ folder ($COURSE_DATA, the checkout's, or the installed copy)
DATASETS_DIR = paths.datasets_dir()  # where CIFAR-10 is read and downloaded (the data folder, or the user cache)
CIFAR_FOLDER = "cifar-10-batches-py"


class DatasetUnavailable(RuntimeError):
    """An image dataset cannot be had here (offline, or files missing); the message says what to use instead."""


def load_digits(size: int = 16, split: str = "all") -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as (x (N, 1, size, size) in [-1, 1], y (N,) long).

    The 8x8 scans (values 0..16) are upsampled bilinearly to `size`. split: "all" (1797), "train" (first 1500)
    or "test" (last 297), a fixed split so that classifiers and metrics never see the same images.
    """
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0          # (1797, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    splits = {"all": slice(None), "train": slice(0, 1500), "test": slice(1500, None)}
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(splits)}")
    return x[splits[split]], y[splits[split]]


def batch_sampler(x: Tensor, y: Tensor | None = None) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor | None]]:
    """A `sample_batch(n, generator)` for the training loop that draws n rows of (x, y) with replacement."""

    def sample(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        idx = torch.randint(len(x), (n,), generator=generator, device=generator.device).to(x.device)
        return x[idx], (y[idx] if y is not None else None)

    return sample


def _cifar10_class():
    """torchvision's CIFAR10 with the per-file md5 entries set to None (the file must exist, content unchecked).

    torchvision checks hard-coded md5 sums of the five training batches, the test batch and batches.meta, which
    rejects any locally written file in the same format (e.g. the tests' tiny CIFAR). The archive's md5 is kept,
    so a real download is still verified by torchvision before it is extracted.
    """
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return LocalCIFAR10


def load_cifar10(root: str | os.PathLike | None = None, train: bool = True,
                 download: bool = True) -> tuple[Tensor, Tensor]:
    """CIFAR-10 (Krizhevsky 2009) as (x (N, 3, 32, 32) float32 in [-1, 1], y (N,) long), N = 50000 or 10000.

    Reads `root`/cifar-10-batches-py (root defaults to the course's data/ folder, whatever the working directory,
    or to the user cache folder for an installed wheel: images.DATASETS_DIR)
    through torchvision's CIFAR10 (the official pickled format; nothing else here unpickles). When the folder is
    absent and download=True, torchvision downloads the 163 MB archive and checks its md5. Raises
    DatasetUnavailable when the data cannot be had: the course never falls back to another dataset silently.
    """
    root = Path(root) if root is not None else DATASETS_DIR
    folder = root / CIFAR_FOLDER
    alternative = (f"Use dataset='digits' (ships with scikit-learn) or put {CIFAR_FOLDER} "
                   f"(from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) in {root}/.")
    dataset_class = _cifar10_class()
    try:
        ds = dataset_class(str(root), train=train, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        if download:
            raise DatasetUnavailable(f"CIFAR-10 could not be downloaded or read ({e}). {alternative}") from e
        raise DatasetUnavailable(f"CIFAR-10 was not found in {folder} and download=False. Pass download=True "
                                 f"(needs the network). {alternative}") from e
    except OSError as e:  # URLError, timeouts, disk errors
        raise DatasetUnavailable(f"CIFAR-10 could not be downloaded (offline? {e}). {alternative}") from e
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError) as e:  # a broken file
        raise DatasetUnavailable(f"the CIFAR-10 files in {folder} are unreadable ({type(e).__name__}: {e}). "
                                 f"Delete the folder and download again. {alternative}") from e
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float()                      # (N, 3, 32, 32) in 0..255
    x = x / 127.5 - 1.0
    y = torch.tensor(ds.targets, dtype=torch.long)
    return x, y
