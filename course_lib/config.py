"""The scale dial: one place that reads COURSE_MODE, and small helpers every notebook uses.

    smoke   seconds per notebook (used by the tests; numbers are meaningless, every code path runs)
    laptop  minutes per notebook on a 2-core CPU; results are real
    full    the budgets of a serious reproduction (default when a GPU is present)
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator, TypeVar

import torch

MODES = ("smoke", "laptop", "full")
T = TypeVar("T")


def course_mode(override: str | None = None) -> str:
    """The active mode: `override` if given, else $COURSE_MODE, else "full" with a GPU, "laptop" without."""
    mode = override if override is not None else os.environ.get("COURSE_MODE")
    if mode is None or mode == "":
        mode = "full" if torch.cuda.is_available() else "laptop"
    mode = mode.strip().lower()
    if mode not in MODES:
        raise ValueError(f"unknown COURSE_MODE {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


def pick(mode: str, *, smoke: T, laptop: T, full: T) -> T:
    """Select the budget of `mode`: `pick(mode, smoke=200, laptop=4000, full=50_000)`."""
    table = {"smoke": smoke, "laptop": laptop, "full": full}
    if mode not in table:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    return table[mode]


def default_device() -> torch.device:
    """CUDA if present, then Apple MPS, else CPU. Code never reads a global device: pass this around."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (for layer initialisation) and return a CPU generator for explicit use."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded to `seed` (for layer initialisation), then restore the caller's
    global RNG state: library code uses this instead of reseeding the global generator, so calling a checker or a
    benchmark never changes the random draws of the notebook around it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


_ANNOUNCED: set[str] = set()


def announce_once(key: str, message: str) -> None:
    """Print `message` loudly, once per process per `key` (used for offline fallbacks)."""
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    bar = "!" * 78
    print(f"{bar}\n{message}\n{bar}", file=sys.stderr, flush=True)


def offline() -> bool:
    """True when Hugging Face / network access is switched off by environment (HF_HUB_OFFLINE=1)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def describe(mode: str, budgets: dict[str, Any]) -> str:
    """One line stating the mode and the budgets chosen, printed by every notebook's parameter cell."""
    items = ", ".join(f"{k}={v}" for k, v in budgets.items())
    return f"COURSE_MODE={mode}: {items}"
