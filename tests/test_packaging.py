"""pyproject.toml's ranges, constraints.txt's pins (the versions last tested) and environment.yml agree: every
requirement is pinned in constraints.txt to a version its range allows, and environment.yml's pip list is the same
requirements pinned to those versions. environment.yml is parsed line by line (the file is simple) so no YAML
library is needed."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from course_lib.versions import canonical, read_lock

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT, ENVIRONMENT = ROOT / "pyproject.toml", ROOT / "environment.yml"
ENV_NAME = "diffusion-distillation"


def pyproject_requirements() -> list[str]:
    """[project] dependencies followed by the dev extra, as written in pyproject.toml."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("dev", []))


def _unquote(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def parse_environment(text: str) -> dict:
    """{'name': str, 'conda': [top-level dependencies], 'pip': [the pip: list]} of a simple environment.yml.

    Understands block lists only (`- item`), comments, and one nested `- pip:` list.
    """
    result: dict = {"name": None, "conda": [], "pip": []}
    section, pip_indent = None, None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            key, _, value = line.partition(":")
            section, pip_indent = key.strip(), None
            if section == "name":
                result["name"] = _unquote(value)
            continue
        item = re.match(r"^\s*-\s+(.*)$", line)
        if section != "dependencies":
            continue
        if item is None:
            raise ValueError(f"environment.yml line {number}: expected '- item' under dependencies, got {raw!r}")
        if pip_indent is not None and indent > pip_indent:
            result["pip"].append(_unquote(item[1]))
        elif item[1].strip() == "pip:":
            pip_indent = indent
        else:
            pip_indent = None
            result["conda"].append(_unquote(item[1]))
    return result


ENV = parse_environment(ENVIRONMENT.read_text(encoding="utf-8"))


LOCK = read_lock(ROOT / "constraints.txt")


def test_the_lock_pins_every_requirement_inside_its_range():
    assert LOCK, "constraints.txt is missing or empty: run `make lock`"
    problems = []
    for text in pyproject_requirements():
        req = Requirement(text)
        pinned = LOCK.get(canonical(req.name))
        if pinned is None:
            problems.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req.name}=={pinned} is outside pyproject.toml's {text!r}")
    assert not problems, ("constraints.txt does not fit pyproject.toml: " + "; ".join(problems) +
                          ". Rerun `make lock` after changing a range.")


def test_pip_list_is_pyproject_pinned_to_the_lock():
    expected = [f"{Requirement(r).name}=={LOCK.get(canonical(Requirement(r).name))}" for r in pyproject_requirements()]
    actual = ENV["pip"]
    editable = [r for r in actual if r.startswith("-e") or r in (".", "./")]
    assert not editable, (
        f"environment.yml installs {editable} through pip; keep only dependencies there "
        "(users run `pip install -e . --no-deps` after creating the environment)"
    )
    missing = [r for r in expected if r not in actual]
    extra = [r for r in actual if r not in expected]
    duplicates = sorted({r for r in actual if actual.count(r) > 1})
    assert not (missing or extra or duplicates), (
        "environment.yml's pip: list must be pyproject.toml's [project] dependencies + dev extra, each pinned to "
        "its version in constraints.txt (`make lock` writes both).\n"
        f"  expected but not in environment.yml: {missing}\n"
        f"  in environment.yml but not expected: {extra}\n"
        f"  listed twice in environment.yml: {duplicates}"
    )


def test_environment_basics():
    assert ENV["name"] == ENV_NAME, f"environment.yml should be named {ENV_NAME!r}, not {ENV['name']!r}"
    assert "pip" in ENV["conda"], "environment.yml must list `pip` among its conda dependencies"
    pythons = [d for d in ENV["conda"] if re.match(r"^python\s*[=<>]", d)]
    assert len(pythons) == 1, f"environment.yml must pin python once, found {pythons}"
    version = re.search(r"(\d+)\.(\d+)", pythons[0])
    assert version, f"cannot read a python version from {pythons[0]!r}"
    floor = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["requires-python"]
    needed = re.fullmatch(r">=\s*(\d+)\.(\d+)", floor)
    assert needed, f"update this test for requires-python = {floor!r}"
    got, want = (int(version[1]), int(version[2])), (int(needed[1]), int(needed[2]))
    assert got >= want, f"environment.yml pins {pythons[0]!r} but pyproject requires-python is {floor!r}"


def test_parser_agrees_with_yaml():
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(ENVIRONMENT.read_text(encoding="utf-8"))
    conda = [d for d in data["dependencies"] if isinstance(d, str)]
    pip = [r for d in data["dependencies"] if isinstance(d, dict) for r in d.get("pip", [])]
    assert (data["name"], conda, pip) == (ENV["name"], ENV["conda"], ENV["pip"])


def test_parser_reports_mismatch_clearly():
    text = "name: x\ndependencies:\n  - python=3.11\n  - pip\n  - pip:\n    - 'numpy>=2'  # comment\n    - -e .\n"
    assert parse_environment(text) == {"name": "x", "conda": ["python=3.11", "pip"], "pip": ["numpy>=2", "-e ."]}


def test_make_lock_would_write_this_environment_yml():
    """tools/lock.py (run by `make lock`) pins environment.yml from constraints.txt: on today's files it changes
    nothing, and a range with no pin is refused instead of written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock", ROOT / "tools" / "lock.py")
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    assert lock.pinned_environment(LOCK) == ENVIRONMENT.read_text(encoding="utf-8")
    with pytest.raises(SystemExit, match="not in constraints.txt"):
        lock.pinned_environment({k: v for k, v in LOCK.items() if k != "diffusers"})
