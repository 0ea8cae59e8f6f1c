"""A small training run, started as a subprocess by test_train.py (which kills it midway).

usage: python tests/train_run.py CKPT_DIR STEPS SLEEP_SECONDS_PER_STEP
"""
import sys
import time

import torch

from course_lib.data2d import sample_2d
from course_lib.losses import denoising_loss
from course_lib.models import MLP2D, Denoiser
from course_lib.processes import VPCosine
from course_lib.train import TrainConfig, train


def run(ckpt_dir: str, steps: int, sleep: float = 0.0, lr: float = 1e-3):
    torch.set_num_threads(1)
    torch.manual_seed(0)  # initialisation
    model = Denoiser(MLP2D(hidden=32, depth=2), VPCosine(), "v")

    def batch(n, g):
        time.sleep(sleep)  # slows the run so the test can kill it between checkpoints
        return sample_2d("gmm", n, g)[0]

    cfg = TrainConfig(steps=steps, batch_size=64, lr=lr, ckpt_every=5, warmup=3, lr_schedule="linear")
    return train(model, lambda m, x, g: denoising_loss(m, x, g), batch, cfg, ckpt_dir=ckpt_dir, progress=False)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
