"""Shared by the Stable Diffusion stage tests: run a `python -m course_lib.scale.<stage>` command in a subprocess and
SIGKILL it midway (no chance to clean up), so that the test can rerun the same command and check the resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}


def step_of(ckpt: Path) -> int:
    """The step of the engine's checkpoint in ckpt (0 while there is none, or while it is being written)."""
    try:
        return json.loads((ckpt / "config.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def kill_midway(module: str, args: list[str], ckpt: Path, total: int, after: int = 3) -> int:
    """Start `python -m module args`, SIGKILL it once its checkpoint in ckpt reaches step `after` (or after 120 s),
    and return the step it was stopped at, asserting that it was stopped midway (1 <= step < total)."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], env=ENV, stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while step_of(ckpt) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stopped = step_of(ckpt)
    assert 1 <= stopped < total, f"the run was not killed midway (checkpoint at step {stopped})"
    return stopped


def assert_same_checkpoint(expected: Path, resumed: Path, why: str) -> dict:
    """The engine's checkpoints in two run folders' checkpoint/ hold the same tensors, bit for bit (`why` names the
    resume, for the message); returns the first one's tensors."""
    import torch
    from safetensors.torch import load_file

    from course_lib.train import TRAINER_WEIGHTS

    a, b = (load_file(str(Path(d) / "checkpoint" / TRAINER_WEIGHTS)) for d in (expected, resumed))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after {why}"
    return a
