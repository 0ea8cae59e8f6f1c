"""Package layout for setuptools; everything else (metadata, dependencies) is in pyproject.toml.

- every package under course_lib/ (any folder with an __init__.py) is found automatically;
- the shipped models in data/ (teachers, reflow, instaflow, digits_classifier: safetensors + JSON) go into the
  wheel as course_lib/_data/, without moving data/ in the repository: the pseudo-package course_lib._data is
  mapped onto data/, and each of its folders is a data-only package. data/cache/ and anything else in data/ stay
  out. course_lib.paths finds whichever copy applies ($COURSE_DATA, the checkout's data/, or course_lib/_data).
This needs setup.py: pyproject.toml's [tool.setuptools] cannot add mapped packages to the automatic discovery.
"""
from pathlib import Path

from setuptools import find_packages, setup

SHIPPED = ("teachers", "reflow", "instaflow", "digits_classifier", "mini_sd", "prompts", "lcm", "tcd", "reward")   # = course_lib.paths.SHIPPED
HERE = Path(__file__).resolve().parent
# data/teachers/gmm-vp -> package course_lib._data.teachers.gmm-vp (files only, never imported)
DATA = [".".join(("course_lib._data", *folder.relative_to(HERE / "data").parts))
        for name in SHIPPED for folder in sorted([HERE / "data" / name, *(HERE / "data" / name).rglob("*")])
        if folder.is_dir()]

setup(
    packages=find_packages(include=["course_lib", "course_lib.*"]) + ["course_lib._data", *DATA],
    package_dir={"course_lib._data": "data"},
    package_data={**{package: ["*.safetensors", "*.json", "*.txt", "*.jsonl", "*.md"] for package in DATA},
                  "course_lib.scale": ["configs/*.json"]},          # the SD stages' shipped configs
)
