"""A wheel of the course (what a cluster installs: no checkout, no editable install) holds every subpackage and
the shipped models, and works from anywhere: course_lib.paths finds the installed data, and without data the
loaders say to set COURSE_DATA. Also the resolution order of course_lib.paths in a checkout.

The wheel is built from a copy of the repository's files: setuptools builds in the source tree, which would leave
build/ and *.egg-info in the checkout (and stale files in build/lib end up in later wheels). The copy also gets
decoys (a pair cache in data/cache, a run in runs/, a pickle next to a teacher) that must stay out of the wheel.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from course_lib import paths, teachers
from course_lib.samplers import generate

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "course_lib"
N, STEPS = 512, 16   # samples drawn from the installed teacher
IGNORED = {".git", ".venv", "venv", "runs", "html", "build", "dist", "__pycache__", ".pytest_cache",
           ".ipynb_checkpoints"}
IGNORED_DATA = {"cache", "cifar-10-batches-py"}   # git-ignored folders of data/ (generated or downloaded)


def source_packages() -> list[str]:
    """Every package of the source tree: course_lib and each folder below it with an __init__.py."""
    return sorted(".".join(d.relative_to(ROOT).parts) for d in [PACKAGE, *PACKAGE.rglob("*")]
                  if d.is_dir() and (d / "__init__.py").is_file() and "__pycache__" not in d.parts)


def source_modules() -> list[str]:
    """Every module of the source tree (packages and .py files), as dotted names."""
    mods = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in PACKAGE.rglob("*.py")
            if "__pycache__" not in p.parts}
    return sorted(m.removesuffix(".__init__") for m in mods)


def shipped_files() -> list[str]:
    """The shipped files, relative to data/: every safetensors, JSON, text, JSON-lines and README file under
    data/<SHIPPED> (models, the mini Stable Diffusion's tokenizer, the prompt lists)."""
    data = ROOT / "data"
    return sorted(str(p.relative_to(data)) for name in paths.SHIPPED for p in (data / name).rglob("*")
                  if p.suffix in (".safetensors", ".json", ".txt", ".jsonl", ".md") and p.is_file())


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, the folder it was installed into with pip install --target)."""
    for tool in ("setuptools", "pip"):   # not imported here: setuptools replaces distutils when imported
        if importlib.util.find_spec(tool) is None:
            pytest.skip(f"{tool} is not installed in this interpreter: cannot build or install a wheel")
    if int(version("setuptools").split(".")[0]) < 77:
        pytest.skip(f"the build backend needs setuptools>=77 (pyproject.toml); this one is {version('setuptools')}")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    def ignore(folder: str, names: list[str]) -> list[str]:
        data = Path(folder) == ROOT / "data"
        return [n for n in names if n in IGNORED or n.endswith(".egg-info") or (data and n in IGNORED_DATA)]

    shutil.copytree(ROOT, src, ignore=ignore)
    for decoy in ("data/cache/reflow/decoy.safetensors", "data/cache/reflow/decoy.json", "runs/decoy/config.json",
                  "data/teachers/gmm-vp/decoy.pkl"):
        (src / decoy).parent.mkdir(parents=True, exist_ok=True)
        (src / decoy).write_text("{}")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist")])
    wheel, = (tmp / "dist").glob("course_lib-*.whl")
    site = tmp / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])
    return wheel, site


def run_installed(site: Path, tmp: Path, code: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `code` in a fresh interpreter that sees the installed copy first (PYTHONPATH) and no checkout: its
    working directory is an empty folder, COURSE_DATA and COURSE_CACHE are unset, the user cache is under tmp."""
    cwd = tmp / "cwd"
    cwd.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in (paths.DATA_ENV, paths.CACHE_ENV, "PYTHONPATH")}
    base.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp / "xdg"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                **(env or {}))
    return _run([sys.executable, "-c", code, *args], cwd=cwd, env=base).stdout


@pytest.mark.slow
def test_wheel_holds_every_subpackage_and_the_shipped_models(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in source_packages() if p.replace(".", "/") + "/__init__.py" not in names]
    assert not missing, f"subpackages missing from the wheel: {missing} (setup.py's find_packages should find them)"
    assert "course_lib/teachers.py" in names and "course_lib/paths.py" in names
    configs = {str(p.relative_to(ROOT)) for p in (PACKAGE / "scale" / "configs").glob("*.json")}
    assert configs and configs <= names, f"the SD stages' configs missing from the wheel: {sorted(configs - names)}"
    expected = {f"course_lib/_data/{f}" for f in shipped_files()}
    assert any(f.startswith("course_lib/_data/teachers/gmm-vp/") for f in expected), "no shipped teachers in data/"
    data = {n for n in names if n.startswith("course_lib/_data/")}
    assert data == expected, (f"shipped files missing from the wheel: {sorted(expected - data)}; "
                              f"files that should not ship: {sorted(data - expected)}")
    stray = [n for n in names if "cache" in n.split("/") or n.startswith(("runs/", "data/", "tests/"))]
    assert not stray, f"the wheel holds files it must not ship: {stray}"


@pytest.mark.slow
def test_installed_wheel_imports_everything_and_samples_a_shipped_teacher(installed, tmp_path):
    _, site = installed
    code = """
import importlib, json, os, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
import course_lib
site, modules, out = Path(sys.argv[1]).resolve(), json.loads(sys.argv[2]), sys.argv[3]
for name in modules:
    file = Path(importlib.import_module(name).__file__).resolve()
    assert file.is_relative_to(site), f"{name} imported from {file}, not from the installed copy in {site}"
from course_lib import paths, samplers, teachers
root, how = paths.data_source()
assert root.resolve() == site / "course_lib" / "_data", (root, how)
assert teachers.TEACHER_DIR.resolve() == site / "course_lib" / "_data" / "teachers", teachers.TEACHER_DIR
assert paths.cache_dir() == Path(os.environ["XDG_CACHE_HOME"]) / "course-lib", paths.cache_dir()
teacher = teachers.load_teacher("gmm-vp")
x = samplers.generate(teacher, teacher.process, (%d, 2), "dpmpp2m", %d, generator=torch.Generator().manual_seed(0))
save_file({"x": x}, out)
print(course_lib.__file__)
""" % (N, STEPS)
    out = tmp_path / "x.safetensors"
    printed = run_installed(site, tmp_path, code, str(site), json.dumps(source_modules()), str(out))
    assert Path(printed.strip()).resolve() == (site / "course_lib" / "__init__.py").resolve()
    x = load_file(out)["x"]
    assert x.shape == (N, 2) and torch.isfinite(x).all()
    checkout = teachers.load_teacher("gmm-vp")   # the same files in data/teachers: the same samples, bit for bit
    assert torch.equal(x, generate(checkout, checkout.process, (N, 2), "dpmpp2m", STEPS,
                                   generator=torch.Generator().manual_seed(0)))


@pytest.mark.slow
def test_installed_wheel_without_data_says_to_set_COURSE_DATA(installed, tmp_path):
    _, site = installed
    empty = tmp_path / "empty"
    empty.mkdir()
    code = """
from course_lib import classifier, paths, teachers
from course_lib.recipes import instaflow, reflow
loaders = {"teacher": lambda: teachers.load_teacher("gmm-vp"), "classifier": classifier.load_digits_classifier,
           "flow": reflow.load_digits_flow, "instaflow": lambda: instaflow.load_digits_model("digits-instaflow")}
for name, load in loaders.items():
    try:
        load()
    except paths.DataNotFound as e:
        print(name, "|", str(e).replace(chr(10), " "))
    else:
        raise SystemExit(f"{name}: loaded without data")
"""
    lines = run_installed(site, tmp_path, code, env={paths.DATA_ENV: str(empty)}).strip().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["teacher", "classifier", "flow", "instaflow"]
    for line in lines:
        assert "$COURSE_DATA" in line and str(empty) in line and "export COURSE_DATA=" in line, line
    assert "python -m course_lib.teachers train gmm-vp" in lines[0]


def test_paths_resolution_in_a_checkout(monkeypatch, tmp_path):
    for var in (paths.DATA_ENV, paths.CACHE_ENV):
        monkeypatch.delenv(var, raising=False)
    assert paths.in_checkout()
    assert paths.data_dir() == ROOT / "data" and paths.cache_dir() == ROOT / "data" / "cache"
    assert paths.datasets_dir() == ROOT / "data"
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path / "d"))
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "c"))
    assert paths.data_source() == (tmp_path / "d", "set by $COURSE_DATA")
    assert paths.cache_dir() == tmp_path / "c" and paths.datasets_dir() == tmp_path / "d"
    assert paths.shipped(tmp_path, "x") == tmp_path
    with pytest.raises(paths.DataNotFound, match=r"(?s)\$COURSE_DATA.*recreate it: python -m x"):
        paths.shipped(tmp_path / "d" / "teachers" / "gmm-vp", "python -m x")
