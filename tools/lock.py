"""Write constraints.txt (the versions the course was last tested with) and pin environment.yml to them.

    python tools/lock.py [PYTHON]      # PYTHON: the interpreter of the environment to freeze (default: .venv's)

`make lock` is the documented way: it installs the newest versions pyproject.toml's ranges allow into a fresh
.venv, runs this script, then runs the whole test suite on them. Commit constraints.txt and environment.yml only
when that passes. constraints.txt is a pip constraints file (`pip install -c constraints.txt -e '.[dev]'`): it
fixes versions without asking for packages, so its platform-specific pins (CUDA wheels, say) are ignored where
those packages are not needed.
"""
from __future__ import annotations

import datetime
import platform
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from course_lib.versions import canonical, read_lock

ROOT = Path(__file__).resolve().parents[1]
LOCK, ENVIRONMENT, PYPROJECT = ROOT / "constraints.txt", ROOT / "environment.yml", ROOT / "pyproject.toml"


def name_as_written(requirement: str) -> str:
    """'torch' of 'torch>=2.4'."""
    return re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)[1]


def requirement_name(requirement: str) -> str:
    return canonical(name_as_written(requirement))


def requirements() -> list[str]:
    """pyproject.toml's [project] dependencies followed by the dev extra, as written there."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("dev", []))


def freeze(python: str) -> list[str]:
    """`name==version` of every distribution in `python`'s environment except the course itself."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    pins = [l.strip() for l in out.splitlines() if "==" in l and not l.startswith(("-e", "#"))]
    return sorted((p for p in pins if canonical(p.split("==")[0]) not in ("course-lib", "pip", "setuptools", "wheel")),
                  key=lambda p: canonical(p.split("==")[0]))


def write_lock(python: str) -> dict[str, str]:
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"], check=True,
                             capture_output=True, text=True).stdout.strip()
    pins = freeze(python)
    header = ["# The versions the course was last tested with. `make lock` wrote this file "
              f"on {datetime.date.today()}",
              f"# (Python {version}, {platform.system()} {platform.machine()}) from the newest versions that "
              "pyproject.toml's ranges allowed,",
              "# then ran the test suite on them. `make install`, `make lab` and `make test` install these",
              "# (pip install -c constraints.txt); `make test LOCK=` in a fresh clone installs the newest instead.",
              "# Do not edit by hand: rerun `make lock`."]
    LOCK.write_text("\n".join(header + pins) + "\n", encoding="utf-8")
    return read_lock(LOCK)


def pinned_environment(pins: dict[str, str]) -> str:
    """environment.yml with its pip list pinned to the lock: each pyproject requirement as name==version."""
    text = ENVIRONMENT.read_text(encoding="utf-8")
    for requirement in requirements():
        name = requirement_name(requirement)
        if name not in pins:
            raise SystemExit(f"{requirement!r} is in pyproject.toml but not in {LOCK.name}: was it installed?")
        line = re.compile(rf"^(\s*-\s+){re.escape(name_as_written(requirement))}\s*[=<>!~].*$", re.M)
        if not line.search(text):
            raise SystemExit(f"environment.yml has no pip line for {requirement!r}")
        text = line.sub(lambda m: f"{m[1]}{name_as_written(requirement)}=={pins[name]}", text, count=1)
    return text


def main(argv: list[str]) -> None:
    python = argv[0] if argv else str(ROOT / ".venv" / "bin" / "python")
    pins = write_lock(python)
    ENVIRONMENT.write_text(pinned_environment(pins), encoding="utf-8")
    direct = ", ".join(f"{name_as_written(r)} {pins[requirement_name(r)]}" for r in requirements()[:6])
    print(f"{LOCK.name}: {len(pins)} pins ({direct}, ...); environment.yml pinned to them")


if __name__ == "__main__":
    main(sys.argv[1:])
