"""Where the course's files are: the shipped data (teachers, flows, classifier) and a writable cache.

    data_dir()     the shipped models: $COURSE_DATA if set, else the data/ folder of the checkout course_lib runs
                   from, else the copy installed with the course_lib wheel (course_lib/_data)
    cache_dir()    generated files (reflow pair caches): $COURSE_CACHE if set, else the checkout's data/cache,
                   else a user cache folder ($XDG_CACHE_HOME/course-lib, default ~/.cache/course-lib)
    shipped(folder, recreate)   the folder of one shipped model, or DataNotFound saying what to do

Nothing here touches the file system at import time beyond a few existence checks, and nothing raises: importing
course_lib works without any data; the loaders raise `DataNotFound` when a shipped model is actually needed.
The modules resolve their folders once, at import (teachers.TEACHER_DIR, classifier.CLASSIFIER_DIR, ...), so set
COURSE_DATA / COURSE_CACHE before importing course_lib.
"""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError

DATA_ENV, CACHE_ENV = "COURSE_DATA", "COURSE_CACHE"
SHIPPED = ("teachers", "reflow", "instaflow", "digits_classifier", "mini_sd", "prompts", "lcm", "tcd", "reward")   # the folders of data/ that the wheel ships
PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT = PACKAGE_DIR.parent                                          # the repository root, in a checkout
INSTALLED_DATA = PACKAGE_DIR / "_data"                                 # where a wheel puts data/ (setup.py)


class DataNotFound(CheckpointError):
    """A shipped model folder does not exist; the message names it, where course_lib looked, and what to do."""


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def in_checkout() -> bool:
    """True when course_lib runs from a checkout of the course (pyproject.toml and data/ next to course_lib/),
    as with `pip install -e .` or PYTHONPATH; False for an installed wheel."""
    return (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "data").is_dir()


def data_source() -> tuple[Path, str]:
    """(the data folder, how it was chosen). Never raises; the folder may not exist."""
    env = _env_path(DATA_ENV)
    if env is not None:
        return env, f"set by ${DATA_ENV}"
    if in_checkout():
        return CHECKOUT / "data", "the data/ folder of the checkout course_lib runs from"
    if INSTALLED_DATA.is_dir():
        return INSTALLED_DATA, "installed with the course_lib wheel"
    return INSTALLED_DATA, (f"NOT FOUND: ${DATA_ENV} is unset, course_lib does not run from a checkout, and its "
                            "installation has no data")


def data_dir() -> Path:
    """The folder holding teachers/, reflow/, instaflow/ and digits_classifier/ (see `data_source`)."""
    return data_source()[0]


def cache_dir() -> Path:
    """A folder for generated files (created by whoever writes there): $COURSE_CACHE, else the checkout's
    data/cache (git-ignored), else $XDG_CACHE_HOME/course-lib (default ~/.cache/course-lib)."""
    env = _env_path(CACHE_ENV)
    if env is not None:
        return env
    if in_checkout():
        return CHECKOUT / "data" / "cache"
    xdg = _env_path("XDG_CACHE_HOME")
    return (xdg if xdg is not None else Path.home() / ".cache") / "course-lib"


def datasets_dir() -> Path:
    """Where downloadable datasets (CIFAR-10) are read and downloaded: the data folder, unless that is the copy
    inside an installed package (site-packages is no place for downloads), then the cache folder."""
    folder, _ = data_source()
    return cache_dir() if folder == INSTALLED_DATA else folder


def shipped(folder: str | os.PathLike, recreate: str = "") -> Path:
    """`folder` (a shipped model's folder) if it exists, else DataNotFound naming it, where the data folder was
    looked for, and what to do. A folder that exists but holds broken files is left to the loader."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    root, how = data_source()
    hint = f" Or recreate it: {recreate}" if recreate else ""
    raise DataNotFound(
        f"the shipped model folder {folder} does not exist. course_lib's data folder is {root} ({how}). "
        f"Set ${DATA_ENV} to a folder holding {', '.join(f'{s}/' for s in SHIPPED)} (the data/ folder of a "
        f"checkout of the course: export {DATA_ENV}=/path/to/the/course/data) before importing course_lib, or "
        f"unset it to use the data installed with the course_lib wheel (pip install the wheel, not only the "
        f"code).{hint}")
