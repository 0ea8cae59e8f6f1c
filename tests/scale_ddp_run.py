"""A two-process run of a course_lib.scale stage (torchrun, gloo on the CPU), launched by the tests with `launch`:

    torchrun --standalone --nproc_per_node 2 tests/scale_ddp_run.py OUT_JSON_PREFIX <stage> <args...>

stage: instaflow_reflow (the student), dmd2 (generator and critic) or hypersd (the LoRA student of a stage).

Each rank records digests of the batches it drew and of its student's weights after training: OUT_JSON_PREFIX<r>.json.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def launch(prefix: Path, stage: str, args: list[str], timeout: int = 300) -> dict[int, dict]:
    """Run this script on two gloo processes with torchrun (the tests' environment, killed_stage.ENV) and return
    each rank's record {rank: {"world", "batches", "weights"}}; skips the calling test where torchrun cannot start
    two processes on this machine."""
    import pytest
    from killed_stage import ENV

    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, str(prefix), stage, *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("Gloo", "gloo", "EADDRINUSE", "rendezvous")):
        pytest.skip(f"torchrun could not start two gloo processes here:\n{proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r: json.loads(Path(f"{prefix}{r}.json").read_text()) for r in (0, 1)}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def record_batches(owner, name: str, pick, drawn: list[str]) -> None:
    """Replace owner.<name>, a factory of samplers sample(n, g) -> batch, by one whose samplers also append the digest
    of pick(batch) (the batch's latents) to `drawn`."""
    factory = getattr(owner, name)

    def recording(*args, **kwargs):
        sample = factory(*args, **kwargs)

        def wrapped(n, g):
            batch = sample(n, g)
            drawn.append(digest(pick(batch)))
            return batch

        return wrapped

    setattr(owner, name, recording)


def main() -> None:
    prefix, stage, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    import course_lib.scale.instaflow_reflow as instaflow_reflow

    drawn: list[str] = []
    record_batches(instaflow_reflow, "triplet_batches", lambda batch: batch[0], drawn)
    if stage == "dmd2":                       # DMD2: batches are dicts {"x": real latents, "y": Cond}
        import course_lib.scale.dmd2 as dmd2

        record_batches(dmd2, "batches", lambda batch: batch["x"], drawn)
        done = dmd2.main(argv)
        nets = {"generator": done.nets["generator"], "critic": done.nets["critic"]}
    elif stage == "hypersd":                  # Hyper-SD: batches are dicts {"x": real latents, "cond": Cond}
        import course_lib.scale.hypersd as hypersd

        record_batches(hypersd, "batches", lambda batch: batch["x"], drawn)
        done = hypersd.main(argv)
        nets = {"": done.nets["student"]}
    else:
        done = instaflow_reflow.main(argv) if stage == "instaflow_reflow" else None
        nets = {"": done.nets["student"]}
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    weights = {(f"{name}." if name else "") + k: digest(v) for name, net in nets.items()
               for k, v in net.state_dict().items()}
    with open(f"{prefix}{rank}.json", "w") as f:
        json.dump({"world": world, "batches": drawn, "weights": weights}, f)


if __name__ == "__main__":
    main()
