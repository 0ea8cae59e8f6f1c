"""`python -m course_lib.bench.dmd_ship gmm --iters 1000`: train and save a longer-trained one-step DMD2 student of
a 2D teacher (bench dmd2's 2D recipe; `bench.dmd.ship_2d`) to data/dmd2_2d, which notebook 09 loads beside its short
runs."""
from __future__ import annotations

import argparse

from ..paths import data_dir
from ..recipes.dmd import SHIPPED_2D
from .dmd import ship_2d

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m course_lib.bench.dmd_ship")
    parser.add_argument("dataset", choices=["gmm", "checkerboard"])
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--gan", type=int, default=0, help="1: DMD2 with its GAN term; 0: the ablation without it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder (default: the course's data/dmd2_2d)")
    a = parser.parse_args()
    print(ship_2d(a.dataset, a.iters, a.out or data_dir() / SHIPPED_2D, gan=bool(a.gan), seed=a.seed))
