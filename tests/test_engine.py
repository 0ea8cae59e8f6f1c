"""The training engine with several networks: phases, targets, resume, LoRA-style students, grad accumulation,
bf16, gradient checkpointing, and a real two-process (DDP, gloo) run on the CPU."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from course_lib.checkpoint import CheckpointError
from course_lib.train import TRAINER_WEIGHTS, Network, Target, TrainConfig, train, train_networks

HERE = Path(__file__).parent
STEPS = 40


def _spawn(script: str, *args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(HERE / script), *map(str, args)], env=env)


def _config(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@pytest.mark.slow
def test_killed_gan_resumes_to_the_same_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _spawn("gan_run.py", full, STEPS, 0.0).wait(timeout=120) == 0
    proc = _spawn("gan_run.py", killed, STEPS, 0.1)
    deadline = time.time() + 120
    while _config(killed).get("step", 0) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stopped_at = _config(killed).get("step", 0)
    assert 10 <= stopped_at < STEPS, f"the run was not killed midway (checkpoint at step {stopped_at})"
    assert _spawn("gan_run.py", killed, STEPS, 0.0).wait(timeout=120) == 0
    a, b = load_file(str(full / TRAINER_WEIGHTS)), load_file(str(killed / TRAINER_WEIGHTS))
    assert a.keys() == b.keys() and any(k.startswith("target.generator_ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming from step {stopped_at}"
    ca, cb = _config(full), _config(killed)
    assert ca["updates"] == cb["updates"] == {"critic": STEPS, "generator": STEPS // 5}
    assert ca["losses"] == cb["losses"] and len(ca["losses"]["generator"]) == STEPS // 5
    # the target is an EMA of the generator: close to it, not equal
    gen = {k[len("net.generator."):]: v for k, v in a.items() if k.startswith("net.generator.")}
    tgt = {k[len("target.generator_ema."):]: v for k, v in a.items() if k.startswith("target.generator_ema.")}
    assert gen.keys() == tgt.keys() and any(not torch.equal(gen[k], tgt[k]) for k in gen)


def test_phases_see_updated_weights_and_only_their_network_has_grad():
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    teacher = nn.Linear(2, 1).requires_grad_(False)
    seen = []

    def step(ctx, x):
        grads = {k: all(p.requires_grad for p in m.parameters()) for k, m in ctx.nets.items()}
        assert grads == {"a": ctx.phase == "a", "b": ctx.phase == "b", "a_copy": False, "teacher": False}
        seen.append((ctx.step, ctx.phase, ctx.nets["a"].weight.detach().clone()))
        ctx.log("x_mean", x.mean())
        return (ctx.nets[ctx.phase](x) - teacher(x)).pow(2).squeeze(1)

    done = train_networks({"a": Network(a, lr=0.1), "b": Network(b, lr=0.1, every=2)}, step,
                          lambda n, g: torch.randn(n, 2, generator=g),
                          TrainConfig(steps=4, batch_size=8, log_every=3),
                          targets={"a_copy": Target("a")}, frozen={"teacher": teacher}, progress=False)
    assert [(s, p) for s, p, _ in seen] == [(0, "a"), (0, "b"), (1, "a"), (2, "a"), (2, "b"), (3, "a")]
    assert not torch.equal(seen[0][2], seen[1][2])                 # b's phase saw a after a's update
    assert done.updates == {"a": 4, "b": 2} and len(done.logs["x_mean"]) == 6
    assert torch.equal(done.targets["a_copy"].weight, a.weight)    # decay 0: a copy after each update
    with pytest.raises(ValueError, match=r"several networks \['a', 'b'\]: name one"):
        done.best()                                                # .best() and .model: one-network runs only
    assert all(p.requires_grad for p in [*a.parameters(), *b.parameters()])  # restored at the end


def test_train_networks_refuses_per_network_settings_in_the_train_config():
    """lr, ema_decay, grad_clip, warmup, lr_schedule, weight_decay and betas belong on each Network: a TrainConfig
    that sets them would be ignored, so train_networks refuses it (train() reads them for its one network)."""
    net = Network(nn.Linear(2, 1))
    step = lambda ctx, x: ctx.nets["n"](x).pow(2).squeeze(1)
    with pytest.raises(ValueError, match=r"TrainConfig\(lr=0\.01, betas=\(0\.5, 0\.9\)\).*on each Network"):
        train_networks({"n": net}, step, lambda n, g: torch.randn(n, 2, generator=g),
                       TrainConfig(steps=1, batch_size=4, lr=1e-2, betas=(0.5, 0.9)), progress=False)
    done = train_networks({"n": net}, step, lambda n, g: torch.randn(n, 2, generator=g),
                          TrainConfig(steps=1, batch_size=4), progress=False)      # the defaults are fine
    assert done.updates == {"n": 1}


def test_an_observer_sees_every_kth_step_and_leaves_the_run_unchanged():
    """observer(step, nets, losses) after every observe_every-th iteration: the step, the networks as they are then
    (under no_grad), each network's losses so far; the run's weights are those of a run without it."""
    def run(observer=None, every=1):
        torch.manual_seed(0)
        a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        step = lambda ctx, x: (ctx.nets[ctx.phase](x) - x.sum(1, keepdim=True)).pow(2).squeeze(1)
        done = train_networks({"a": Network(a, lr=0.1), "b": Network(b, lr=0.1, every=3)}, step,
                              lambda n, g: torch.randn(n, 2, generator=g), TrainConfig(steps=7, batch_size=8),
                              frozen={"teacher": nn.Linear(2, 1)}, progress=False, observer=observer,
                              observe_every=every)
        return a, b, done

    seen = []

    def observer(step, nets, losses):
        assert set(nets) == {"a", "b", "teacher"} and not torch.is_grad_enabled()
        seen.append((step, nets["a"].weight.clone(), {k: list(v) for k, v in losses.items()}))
        nets["a"](torch.randn(4, 2, generator=torch.Generator().manual_seed(step)))    # a forward pass: harmless

    a, b, done = run(observer, every=2)
    assert [s for s, _, _ in seen] == [2, 4, 6]
    assert [(len(l["a"]), len(l["b"])) for _, _, l in seen] == [(2, 1), (4, 2), (6, 2)]   # b: steps 0, 3, 6
    assert seen[-1][2]["a"] == done.losses["a"][:6]
    assert not torch.equal(seen[0][1], seen[1][1])                         # the weights of that moment
    a0, b0, plain = run()
    assert torch.equal(a.weight, a0.weight) and torch.equal(b.weight, b0.weight) and done.losses == plain.losses
    with pytest.raises(ValueError, match="observe_every"):
        run(observer, every=0)


def _regression(tmp_path: Path, allow: bool = False, **changes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1))
    cfg = TrainConfig(**{"steps": 5, "batch_size": 16, "ema_decay": 0.9, **changes})
    return train(model, lambda m, x, g: (m(x).squeeze(1) - x.sum(1)).pow(2),
                 lambda n, g: torch.randn(n, 2, generator=g), cfg, ckpt_dir=tmp_path / "r", progress=False,
                 allow_config_change=allow)


def test_resuming_with_changed_settings_names_them(tmp_path):
    _regression(tmp_path)
    with pytest.raises(CheckpointError, match=r"lr: 0\.001 -> 0\.01.*allow_config_change") as e:
        _regression(tmp_path, steps=8, lr=1e-2)
    assert "other settings" in str(e.value)
    with pytest.raises(CheckpointError, match="seed"):
        _regression(tmp_path, steps=8, seed=1)
    with pytest.raises(CheckpointError, match="grad_accum"):
        _regression(tmp_path, steps=8, grad_accum=2)
    state = _regression(tmp_path, steps=8, log_every=2)                 # longer runs may continue
    assert state.step == 8 and len(state.losses["model"]) == 8
    state = _regression(tmp_path, allow=True, steps=10, lr=1e-2)
    assert state.step == 10 and len(state.losses["model"]) == 10
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train_config"]["lr"] == 1e-2


def test_the_weights_file_alone_is_the_checkpoint(tmp_path):
    """config.json is a mirror: a run killed between the two writes resumes from trainer.safetensors."""
    _regression(tmp_path)
    (tmp_path / "r" / "config.json").write_text('{"step": 2, "losses": [')  # a stale, torn mirror
    state = _regression(tmp_path, steps=7)
    assert state.step == 7 and len(state.losses["model"]) == 7


class LoRALinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank adapter B A (Hu et al. 2021), and a buffer."""

    def __init__(self, d: int = 64, r: int = 2):
        super().__init__()
        self.base = nn.Linear(d, d).requires_grad_(False)
        self.A, self.B = nn.Parameter(torch.randn(r, d) / d ** 0.5), nn.Parameter(torch.zeros(d, r))
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.A.T @ self.B.T)


def test_lora_student_checkpoints_only_its_adapter(tmp_path):
    def run(steps):
        torch.manual_seed(0)
        net = Network(LoRALinear(), lr=1e-2, ema_decay=0.9, save_frozen=False)
        step = lambda ctx, x: (ctx.nets["student"](x) - 2 * x).pow(2).mean(1)
        return train_networks({"student": net}, step, lambda n, g: torch.randn(n, 64, generator=g),
                              TrainConfig(steps=steps, batch_size=8), ckpt_dir=tmp_path / f"s{steps}", progress=False)

    done = run(6)
    tensors = load_file(str(tmp_path / "s6" / TRAINER_WEIGHTS))
    assert {k for k in tensors if k.startswith("net.")} == {"net.student.A", "net.student.B", "net.student.scale"}
    assert {k for k in tensors if k.startswith("ema.")} == {"ema.student.A", "ema.student.B"}
    assert set(done.ema["student"]) == {"A", "B"}
    assert not torch.equal(done.ema["student"]["B"], done.nets["student"].B)
    best = done.best("student")
    assert torch.equal(best.B, done.ema["student"]["B"])
    assert torch.equal(best.base.weight, done.nets["student"].base.weight)
    # resuming a 3-step checkpoint (the base comes from the caller's module) reaches the same adapter
    run(3)
    shutil.copytree(tmp_path / "s3", tmp_path / "s6b")
    (tmp_path / "s6").rename(tmp_path / "s6_done")
    (tmp_path / "s6b").rename(tmp_path / "s6")
    resumed = run(6)
    for k in ("A", "B"):
        assert torch.equal(getattr(resumed.nets["student"], k), getattr(done.nets["student"], k))
        assert torch.equal(resumed.ema["student"][k], done.ema["student"][k])


def test_grad_accum_matches_one_big_batch():
    data = torch.randn(64 * 6, 3, generator=torch.Generator().manual_seed(0))

    def run(batch, accum):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
        rows = iter(data.split(batch))                                 # the same rows in the same order
        train(model, lambda m, x, g: (m(x).squeeze(1) - x.prod(1)).pow(2), lambda n, g: next(rows),
              TrainConfig(steps=6, batch_size=batch, grad_accum=accum, ema_decay=0.0, lr=1e-2), progress=False)
        return model

    a, b = run(64, 1), run(32, 2)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_on_cpu_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Linear(32, 1))
    dtypes = set()

    def loss(m, x, g):
        out = m(x).squeeze(1)
        dtypes.add(out.dtype)
        return (out.float() - x.sum(1)).pow(2)

    state = train(model, loss, lambda n, g: torch.randn(n, 4, generator=g),
                  TrainConfig(steps=60, batch_size=64, lr=1e-2, precision="bf16", ema_decay=0.0), progress=False)
    assert dtypes == {torch.bfloat16} and model[0].weight.dtype == torch.float32
    assert sum(state.losses["model"][-10:]) < 0.3 * sum(state.losses["model"][:10])
    with pytest.raises(ValueError, match="bf16"):
        train(model, loss, lambda n, g: torch.randn(n, 4, generator=g),
              TrainConfig(steps=1, batch_size=4, precision="fp16"), progress=False)


def test_gradient_checkpointing_gives_the_same_gradients():
    from course_lib.models import UNet

    def grads(checkpointing):
        torch.manual_seed(0)
        model = UNet(sample_size=8, block_out_channels=(32, 32), norm_num_groups=8)
        loss = lambda m, x, g: m(x, torch.full((len(x),), 10.0)).pow(2).flatten(1).mean(1)
        train(model, loss, lambda n, g: torch.randn(n, 1, 8, 8, generator=g),
              TrainConfig(steps=1, batch_size=4, grad_clip=None, ema_decay=0.0, grad_checkpointing=checkpointing),
              progress=False)
        assert model.unet.is_gradient_checkpointing == checkpointing
        return [p.grad for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="'model'.*enable_gradient_checkpointing"):
        train(nn.Linear(2, 2), lambda m, x, g: m(x).sum(1), lambda n, g: torch.randn(n, 2, generator=g),
              TrainConfig(steps=1, batch_size=2, grad_checkpointing=True), progress=False)


@pytest.mark.slow
def test_two_process_ddp_run(tmp_path):
    """torchrun starts two gloo processes on the CPU: progressive distillation with a checkpoint folder."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(HERE / "ddp_run.py"),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    ranks = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    if proc.returncode != 0 and not (tmp_path / "full").exists() and any(
            s in proc.stderr for s in ("Gloo", "gloo", "EADDRINUSE", "rendezvous")):
        pytest.skip(f"torchrun could not start two gloo processes here:\n{proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads(p.read_text()) for p in ranks)
    assert len(r0["batches"]) == 20 and not set(r0["batches"]) & set(r1["batches"])   # each rank its own data
    assert r0["full"] == r1["full"]                                                   # gradients were averaged
    assert r0["full"]["net.out.weight"] != r0["initial"]["net.out.weight"]            # and training moved them
    assert r0["resumed"] == r0["full"] and r1["resumed"] == r1["full"]                # 10 + 10 steps == 20 steps
    assert r0["raw"] == r1["raw"]                                 # a loss through model.raw is synced as well
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "rank0.json", "rank1.json", "resumed"]
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["config.json", TRAINER_WEIGHTS]
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["world_size"] == 2 and config["step"] == 20
    assert load_file(str(tmp_path / "full" / TRAINER_WEIGHTS))["rng"].shape[0] == 2   # both generators saved


def test_a_checkpoint_of_the_old_trainer_says_what_to_do(tmp_path):
    from course_lib.checkpoint import save_tensors
    save_tensors(tmp_path / "r", {"model.0.weight": torch.zeros(16, 2), "rng": torch.Generator().get_state()},
                 {"step": 3, "losses": [1.0, 1.0, 1.0]}, weights_name=TRAINER_WEIGHTS)   # no embedded config
    with pytest.raises(CheckpointError, match="older version.*delete"):
        _regression(tmp_path)


def test_sharded_training_is_refused_clearly():
    """FSDP / DeepSpeed shard the parameters; the engine says so instead of training the wrong tensors."""
    class FakeAccelerator:
        distributed_type = "DistributedType.FSDP"
        mixed_precision = "no"

    with pytest.raises(NotImplementedError, match="DDP"):
        train(nn.Linear(2, 2), lambda m, x, g: m(x).sum(1), lambda n, g: torch.randn(n, 2, generator=g),
              TrainConfig(steps=1, batch_size=2), progress=False, accelerator=FakeAccelerator())
