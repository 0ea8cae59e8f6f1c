"""Progressive distillation on 2D in two processes (DDP on CPU, gloo), launched by test_engine.py:

    torchrun --standalone --nproc_per_node 2 tests/ddp_run.py OUT_DIR

Three runs in each process: 20 steps into OUT_DIR/full, then 10 steps into OUT_DIR/resumed and the same call
with 20 steps, which resumes from that checkpoint; then 5 steps of a teacher's denoising loss (which calls
model.raw, not forward). Each rank writes OUT_DIR/rank{r}.json: hashes of the batches
it drew in the full run and of its final weights after each run.
"""
import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from course_lib.config import seeded
from course_lib.data2d import sample_2d
from course_lib.distill.pd import distill_round
from course_lib.losses import denoising_loss
from course_lib.models import MLP2D, Denoiser
from course_lib.processes import VPCosine
from course_lib.train import TrainConfig, train


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
    with seeded(0):  # the same teacher in both processes
        teacher = Denoiser(MLP2D(hidden=32, depth=2), VPCosine(), "v")
    initial = {k: digest(v) for k, v in teacher.state_dict().items()}
    drawn: list[str] = []

    def batch(n, g):
        x = sample_2d("gmm", n, g)[0]
        drawn.append(digest(x))
        return {"x": x}

    def run(name: str, steps: int) -> dict[str, str]:
        cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-3, ema_decay=0.9, ckpt_every=5, seed=3)
        _, state = distill_round(teacher, 2, batch, run=cfg, ckpt_dir=out / name, progress=False,
                                 accelerator=accelerator)
        return {k: digest(v) for k, v in {**state.model.state_dict(),
                                          **{f"ema.{k}": v for k, v in state.best().state_dict().items()}}.items()}

    full = run("full", 20)
    batches = list(drawn)
    run("resumed", 10)
    resumed = run("resumed", 20)
    # a teacher's denoising loss calls model.raw (not forward): it must be gradient-synced too
    with seeded(1):
        model = Denoiser(MLP2D(hidden=32, depth=2), VPCosine(), "v")
    cfg = TrainConfig(steps=5, batch_size=32, lr=1e-2, ema_decay=0.0, seed=4)
    state = train(model, lambda m, x, g: denoising_loss(m, x, g), lambda n, g: sample_2d("gmm", n, g)[0], cfg,
                  progress=False, accelerator=accelerator)
    raw = {k: digest(v) for k, v in state.model.state_dict().items()}
    (out / f"rank{accelerator.process_index}.json").write_text(
        json.dumps({"batches": batches, "initial": initial, "full": full, "resumed": resumed, "raw": raw}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
