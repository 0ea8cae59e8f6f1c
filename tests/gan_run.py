"""A small GAN on the 2D Gaussian mixture, started as a subprocess by test_engine.py (which kills it midway).

Critic updated every iteration, generator every 5th, an EMA copy of the generator as a Target (hinge loss).
usage: python tests/gan_run.py CKPT_DIR STEPS SLEEP_SECONDS_PER_BATCH
"""
import sys
import time

import torch
from torch import nn

from course_lib.config import seeded
from course_lib.data2d import sample_2d
from course_lib.train import Network, Target, TrainConfig, train_networks

NOISE = 4


def mlp(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, o))


def step(ctx, x):
    """Hinge loss (Lim & Ye 2017): critic relu(1 - D(x)) + relu(1 + D(G(z))), generator -D(G(z)); both (B,)."""
    G, D = ctx.nets["generator"], ctx.nets["critic"]
    z = torch.randn(len(x), NOISE, generator=ctx.generator)
    if ctx.phase == "critic":
        return torch.relu(1 - D(x)).squeeze(1) + torch.relu(1 + D(G(z))).squeeze(1)
    return -D(G(z)).squeeze(1)


def run(ckpt_dir: str, steps: int, sleep: float = 0.0):
    torch.set_num_threads(1)
    with seeded(0):  # initialisation
        critic, generator = mlp(2, 1), mlp(NOISE, 2)

    def batch(n, g):
        time.sleep(sleep)  # slows the run so the test can kill it between checkpoints
        return sample_2d("gmm", n, g)[0]

    nets = {"critic": Network(critic, lr=2e-3, betas=(0.5, 0.9)),
            "generator": Network(generator, lr=1e-3, betas=(0.5, 0.9), every=5)}
    cfg = TrainConfig(steps=steps, batch_size=64, ckpt_every=5, log_every=7)
    return train_networks(nets, step, batch, cfg, targets={"generator_ema": Target("generator", decay=0.99)},
                          ckpt_dir=ckpt_dir, progress=False)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
