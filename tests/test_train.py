"""The training loop: a killed run resumes to exactly the weights of an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from course_lib.checkpoint import CheckpointError
from course_lib.train import TRAINER_WEIGHTS, TrainConfig
from conftest import interrupt_on_call

sys.path.insert(0, str(Path(__file__).parent))
from train_run import run  # noqa: E402

SCRIPT = Path(__file__).parent / "train_run.py"
STEPS = 30


def _spawn(ckpt: Path, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(ckpt), str(STEPS), str(sleep)], env=env)


def _step(ckpt: Path) -> int:
    try:
        return json.loads((ckpt / "config.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # 1. an uninterrupted run
    assert _spawn(full, 0.0).wait(timeout=120) == 0
    # 2. the same run, killed with SIGKILL (no chance to clean up) after its second checkpoint
    proc = _spawn(killed, 0.1)
    deadline = time.time() + 120
    while _step(killed) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stopped_at = _step(killed)
    assert 10 <= stopped_at < STEPS, f"the run was not killed midway (checkpoint at step {stopped_at})"
    # 3. resume: the same command picks up from the checkpoint
    assert _spawn(killed, 0.0).wait(timeout=120) == 0
    a, b = load_file(str(full / TRAINER_WEIGHTS)), load_file(str(killed / TRAINER_WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming from step {stopped_at}"
    la = json.loads((full / "config.json").read_text())["losses"]
    lb = json.loads((killed / "config.json").read_text())["losses"]
    assert la == lb and len(la) == STEPS


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tmp_path, monkeypatch):
    reference = run(str(tmp_path / "ref"), STEPS)
    import train_run

    real = interrupt_on_call(monkeypatch, train_run, "denoising_loss", 13)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "int"), STEPS)
    assert _step(tmp_path / "int") == 12  # saved on the way out, not only at the step-10 checkpoint
    monkeypatch.setattr(train_run, "denoising_loss", real)
    resumed = run(str(tmp_path / "int"), STEPS)
    for (k, p), q in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), k
    for p, q in zip(reference.best().parameters(), resumed.best().parameters()):
        assert torch.equal(p, q)


def test_training_reduces_the_loss_and_ema_differs_from_weights(tmp_path):
    from course_lib.data2d import sample_2d
    from course_lib.losses import denoising_loss
    from course_lib.models import MLP2D, Denoiser
    from course_lib.processes import VPCosine

    torch.manual_seed(0)
    initial = Denoiser(MLP2D(hidden=32, depth=2), VPCosine(), "v")
    state = run(str(tmp_path / "r"), 200, lr=1e-2)
    x0 = sample_2d("gmm", 8192, torch.Generator().manual_seed(1))[0]

    def held_out(model):  # the same t and noise for both models
        with torch.no_grad():
            return float(denoising_loss(model, x0, torch.Generator().manual_seed(2)).mean())

    assert held_out(state.model) < 0.9 * held_out(initial)  # much of this loss is irreducible (v near t = 1)
    assert any(not torch.equal(p, q) for p, q in zip(state.model.parameters(), state.best().parameters()))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    run(str(tmp_path / "r"), 5)
    from course_lib.losses import denoising_loss
    from course_lib.models import MLP2D, Denoiser
    from course_lib.processes import VPCosine
    from course_lib.train import train

    other = Denoiser(MLP2D(hidden=16, depth=2), VPCosine(), "v")
    with pytest.raises(CheckpointError, match="another model"):
        train(other, lambda m, x, g: denoising_loss(m, x, g), lambda n, g: torch.randn(n, 2, generator=g),
              TrainConfig(steps=10, batch_size=8), ckpt_dir=tmp_path / "r", progress=False)


def test_lr_schedules():
    cfg = TrainConfig(steps=100, batch_size=1, lr=1.0, warmup=10, lr_schedule="linear")
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(50) == pytest.approx(0.5) and cfg.lr_at(99) < 0.02
    cos = TrainConfig(steps=100, batch_size=1, lr=1.0, lr_schedule="cosine")
    assert cos.lr_at(0) == 1.0 and cos.lr_at(50) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        TrainConfig(steps=1, batch_size=1, lr_schedule="nope").lr_at(0)
