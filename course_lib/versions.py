"""The versions of the course's dependencies installed here, against those it was last tested with.

    python -m course_lib.versions      (or `make versions`)

constraints.txt, in the repository root, holds the versions the course was last tested with (written by
`make lock`); `make install` installs them. The test run prints summary() in its header, so every log says what it
ran with.
"""
from __future__ import annotations

import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .paths import CHECKOUT

LOCK = CHECKOUT / "constraints.txt"
# The dependencies whose releases have changed the course's results or broken it before, first in every report.
KEY = ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface-hub",
       "tokenizers", "numpy", "scipy", "clean-fid")


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} of a constraints file (name==version lines; comments ignored); {} if it is absent."""
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            pins[canonical(name)] = pinned.strip()
    return pins


def installed(names: tuple[str, ...] = KEY) -> dict[str, str | None]:
    """{name: installed version, or None}."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _base(v: str) -> str:
    return v.split("+", 1)[0]       # 2.14.1+cpu satisfies the lock's 2.14.1


def summary() -> str:
    """One line: Python and the KEY versions, then whether they are constraints.txt's (or which differ)."""
    have, lock = installed(), read_lock()
    text = f"Python {platform.python_version()}; " + ", ".join(f"{k} {v or 'missing'}" for k, v in have.items())
    if not lock:
        return text + " (no constraints.txt to compare with)"
    differ = [f"{k} {v} (locked {lock[canonical(k)]})" for k, v in have.items()
              if v and canonical(k) in lock and _base(v) != lock[canonical(k)]]
    return text + (f"; NOT the locked versions: {', '.join(differ)}" if differ else "; all as in constraints.txt")


if __name__ == "__main__":
    print(summary())
