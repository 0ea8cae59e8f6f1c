"""One training engine for every method in the course: phases, EMA, target networks, checkpoints, explicit seeds.

One network (a teacher, a PD student, a rectified flow):

    state = train(model, loss_fn, sample_batch, TrainConfig(steps=4000, batch_size=1024), ckpt_dir="runs/x")

Several networks, each with its own optimizer (a GAN, DMD2's generator and fake score, a consistency model
with its target network):

    done = train_networks({"critic": Network(D), "generator": Network(G, every=5)}, step_fn, sample_batch, cfg,
                          targets={"generator_ema": Target("generator", decay=0.99)}, ckpt_dir="runs/gan")

Watching a run (a notebook's figure): `observer(step, nets, losses)` is called every `observe_every` iterations,
after the iteration, with the networks by name and each network's losses so far (see `Observer`); training code
never needs a loop of its own.

`sample_batch(batch_size, generator) -> batch` draws data; `step_fn(ctx, batch) -> (B,)` returns per-sample
losses of the network `ctx.phase` (the engine takes the mean). Iteration `step` updates every network with
`step % every == 0`, one after another in declaration order (a "phase" each), so later phases see the updated
weights of earlier ones. All randomness after initialisation flows through one torch.Generator seeded with
`TrainConfig.seed`, whose state is checkpointed: a run that is killed and resumed from its last checkpoint
ends with exactly the weights of an uninterrupted run.

A checkpoint folder holds `trainer.safetensors` (every network, EMA, targets, optimizer tensors, RNG states,
and the run's JSON description in its metadata: one atomic file) and `config.json` (a readable mirror of it).

Under accelerate (`accelerator=`) batch_size is per process: the global batch is
batch_size x world size x grad_accum samples per update. The networks are wrapped in DDP (a whole copy on each
process), or with TrainConfig(fsdp=True) sharded by PyTorch's FSDP2: gradients and AdamW states stay sharded,
weights are gathered for each phase and freed after it (ZeRO-2's memory); checkpoints hold whole tensors either
way, and the returned networks are whole, plain modules. Targets are not supported with fsdp.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_tensors, save_tensors

TRAINER_WEIGHTS = "trainer.safetensors"
ALWAYS_CHANGEABLE = ("steps", "desc", "ckpt_every", "log_every", "fsdp")   # a resumed run may change these
PER_NETWORK = ("lr", "ema_decay", "grad_clip", "warmup", "lr_schedule", "weight_decay", "betas")


def lr_scale(update: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate factor for update number `update` (0-based) of `total`: linear warm-up, then a schedule."""
    scale = min(1.0, (update + 1) / warmup) if warmup > 0 else 1.0
    frac = update / max(1, total)
    if schedule == "linear":
        scale *= 1.0 - frac
    elif schedule == "cosine":
        scale *= 0.5 * (1.0 + math.cos(math.pi * frac))
    elif schedule != "constant":
        raise ValueError(f"unknown lr_schedule {schedule!r}; valid: constant, linear, cosine")
    return scale


@dataclass
class TrainConfig:
    steps: int                      # total iterations (= optimizer updates for one network)
    batch_size: int                 # samples per micro-batch (per process under accelerate)
    # PER_NETWORK: the single network's optimizer settings, read by train(); train_networks takes them from each
    # Network and refuses a TrainConfig that sets any of them
    lr: float = 1e-3                # Adam learning rate (after warm-up)
    ema_decay: float = 0.999        # EMA of the weights; 0 disables it
    grad_clip: float | None = 1.0   # max global grad norm; None disables clipping
    warmup: int = 0                 # linear learning-rate warm-up steps
    lr_schedule: str = "constant"   # "constant", "linear" (anneal to 0, as PD) or "cosine"
    weight_decay: float = 0.0       # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    ckpt_every: int = 0             # checkpoint every k iterations (0: only at the end); needs ckpt_dir
    seed: int = 0                   # seeds the generator that all data and noise draws use
    desc: str = "train"             # progress-bar label
    precision: str = "fp32"         # "fp32" or "bf16" (torch.autocast around the step function)
    grad_accum: int = 1             # micro-batches (each batch_size) per optimizer update
    grad_checkpointing: bool = False  # enable_gradient_checkpointing() on the diffusers submodules
    log_every: int = 25             # losses are fetched to the host (one sync) every log_every iterations
    fsdp: bool = False              # shard grads and AdamW states over the processes (FSDP2; weights per phase)

    def lr_at(self, step: int) -> float:
        """Learning rate for update number `step` (0-based)."""
        return self.lr * lr_scale(step, self.steps, self.warmup, self.lr_schedule)


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name in PER_NETWORK}   # train_networks' check


@dataclass
class Network:
    """One trained network with its own AdamW optimizer (over its parameters with requires_grad at the start)."""
    module: nn.Module
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    warmup: int = 0                 # warm-up over this network's first `warmup` updates
    lr_schedule: str = "constant"   # over this network's updates: constant, linear or cosine
    ema_decay: float = 0.0          # EMA of the trainable parameters (0: none)
    every: int = 1                  # updated on iterations where step % every == 0
    save_frozen: bool = True        # False: checkpoint only trainable params + buffers (a LoRA student)


@dataclass
class Target:
    """A frozen copy of network `source`, updated after each update of it: target <- mu target + (1 - mu) source
    with mu = decay or decay(step) (0: a plain copy). Consistency models' theta^-, an EMA teacher."""
    source: str
    decay: float | Callable[[int], float] = 0.0


@dataclass
class StepContext:
    """What a step function sees. nets: every network, target and frozen module by name; only nets[phase] has
    gradients (the others are plain modules without grad, holding their latest weights)."""
    phase: str
    step: int
    generator: torch.Generator
    nets: Mapping[str, nn.Module]
    _pending: list = field(default_factory=list, repr=False)
    # FSDP only: a generator seeded by (seed, step, phase), the same on every process, for the draws that must agree
    # across processes (how many times a network is called: each call may gather its weights). None otherwise.
    shared: torch.Generator | None = None

    def log(self, name: str, value: Tensor | float) -> None:
        """Record an extra scalar (kept on the device; fetched with the losses every log_every iterations)."""
        self._pending.append(("log", name, value.detach().float().reshape(()) if isinstance(value, Tensor) else value))


@dataclass
class Trained:
    """What train() and train_networks return: trained modules, EMA tensors, targets and histories, by network name
    (train()'s one network is "model": .model and .best() reach it without the name)."""
    nets: dict[str, nn.Module]
    ema: dict[str, dict[str, Tensor]]       # network -> {parameter name: EMA tensor} (networks with ema_decay > 0)
    targets: dict[str, nn.Module]
    step: int
    updates: dict[str, int]
    losses: dict[str, list[float]]          # network -> loss of each of its updates
    logs: dict[str, list[float]]            # name -> values given to ctx.log

    def _name(self, name: str | None) -> str:
        if name is not None:
            return name
        if len(self.nets) != 1:
            raise ValueError(f"this run trained several networks {list(self.nets)}: name one (.nets[name], "
                             ".best(name))")
        return next(iter(self.nets))

    @property
    def model(self) -> nn.Module:
        """The trained network of a one-network run (train()'s)."""
        return self.nets[self._name(None)]

    def best(self, name: str | None = None) -> nn.Module:
        """The weights to sample from: a copy of the network (the only one when name is None) with its EMA weights,
        or the network itself when it has no EMA."""
        name = self._name(name)
        if name not in self.ema:
            return self.nets[name]
        model = copy.deepcopy(self.nets[name]).requires_grad_(False).eval()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in self.ema[name].items():
                params[k].copy_(v)
        return model


# observer(step, nets, losses): step the number of iterations done (1, 2, ...); nets every network, target and frozen
# module by name (plain modules in training mode, called under no_grad: leave their weights and modes as they are,
# and draw random numbers from a generator of your own, so that observing never changes the run); losses
# {network: its update losses so far} (host floats, a copy)
Observer = Callable[[int, Mapping[str, nn.Module], Mapping[str, list[float]]], None]


def _synced_methods(module: nn.Module) -> tuple[str, ...]:
    """The methods of `module` that step functions call instead of forward and that must therefore run through DDP /
    gather FSDP's weights as forward does: what its class declares in `synced_methods` (a Denoiser's `raw`, which
    training losses call; a DMD2 critic's `raw` and `logits`), none otherwise."""
    return tuple(getattr(type(module), "synced_methods", ()))


class _Synced:
    """A DDP-wrapped network as its step function sees it: calls go through DDP (which averages gradients over
    the processes), attributes (e.g. a Denoiser's .process) come from the network itself. The methods the network
    declares in `synced_methods` also run through DDP: for that one call the module's forward is that method."""

    def __init__(self, wrapped: nn.Module, module: nn.Module):
        self._wrapped, self._module = wrapped, module

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        attr = getattr(self._module, name)
        if name not in _synced_methods(self._module) or not callable(attr):
            return attr

        def through_ddp(*args, **kwargs):
            self._module.forward = attr                  # an instance attribute shadows the class's forward
            try:
                return self._wrapped(*args, **kwargs)
            finally:
                del self._module.forward

        return through_ddp


@dataclass
class _Run:
    """Runtime state of one Network."""
    name: str
    spec: Network
    trainable: dict[str, nn.Parameter]      # recorded at the start: the only parameters the engine toggles
    opt: torch.optim.Optimizer
    total: int                              # updates over cfg.steps iterations
    ema: dict[str, Tensor] | None = None
    wrapped: Any = None                     # what the step function calls (the module, or a _Synced DDP view)
    ddp: nn.Module | None = None            # the DDP wrapper under accelerate with several processes
    skeleton: nn.Module | None = None       # FSDP: an unsharded copy on the meta device, filled at the end
    updates: int = 0
    losses: list[float] = field(default_factory=list)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a batch (a tensor, tuple, list, dict, or anything with .to) to `device`."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if hasattr(batch, "to") else batch


def _model_config(module: nn.Module) -> dict | None:
    try:
        return module.config() if callable(getattr(module, "config", None)) else None
    except (ValueError, TypeError):
        return None


def _describe(cfg: TrainConfig, runs: list[_Run], targets: Mapping[str, Target], frozen: Mapping[str, nn.Module],
              world: int, extra: dict | None) -> dict:
    """The run's settings as JSON; a resume compares them with the checkpoint's."""
    decay = lambda d: d if not callable(d) else f"{d.__module__}.{d.__qualname__}"
    nets = {r.name: {**{f.name: getattr(r.spec, f.name) for f in fields(Network) if f.name != "module"},
                     "model": _model_config(r.spec.module)} for r in runs}
    desc = {"train_config": asdict(cfg), "networks": nets, "world_size": world, "extra_config": extra or {},
            "targets": {k: {"source": t.source, "decay": decay(t.decay)} for k, t in targets.items()},
            "frozen": {k: _model_config(m) for k, m in frozen.items()}}
    return json.loads(json.dumps(desc))  # tuples -> lists, as they come back from the file


def _changes(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changes(old.get(k), new.get(k), f"{path}.{k}".lstrip("."))]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _enable_checkpointing(name: str, module: nn.Module) -> None:
    found = [m for m in module.modules() if hasattr(m, "enable_gradient_checkpointing")
             and getattr(m, "_supports_gradient_checkpointing", True)]
    if not found:
        raise ValueError(f"grad_checkpointing: network {name!r} ({type(module).__name__}) has no submodule with "
                         "enable_gradient_checkpointing() (a diffusers model); set grad_checkpointing=False")
    for m in found:
        m.enable_gradient_checkpointing()


def _fetch(pending: list, runs: dict[str, _Run], logs: dict[str, list[float]]) -> None:
    """Move the pending losses and logs to the host: one device sync for all of them."""
    idx = [i for i, (_, _, v) in enumerate(pending) if isinstance(v, Tensor)]
    values = [v for _, _, v in pending]
    if idx:
        dev = values[idx[0]].device
        for i, v in zip(idx, torch.stack([values[i].to(dev) for i in idx]).tolist()):
            values[i] = v
    for (kind, name, _), v in zip(pending, values):
        (runs[name].losses if kind == "loss" else logs.setdefault(name, [])).append(float(v))
    pending.clear()


def _kept(module: nn.Module, trainable: Mapping[str, Tensor], save_frozen: bool) -> dict[str, Tensor]:
    """State-dict entries to checkpoint: all, or only trainable parameters and buffers."""
    params = dict(module.named_parameters())
    return {k: v for k, v in module.state_dict().items() if save_frozen or k in trainable or k not in params}


def _load(module: nn.Module, tensors: dict[str, Tensor], may_miss: set[str], where: str) -> None:
    state = module.state_dict()
    if any(_is_dtensor(v) for v in state.values()):       # FSDP: each process keeps its shard of each tensor
        tensors = {k: _like(v, state[k]) if k in state else v for k, v in tensors.items()}
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        if unexpected or set(missing) - may_miss:
            raise RuntimeError(f"missing keys {sorted(set(missing) - may_miss)}, unexpected keys {unexpected}")
    except RuntimeError as e:
        raise CheckpointError(f"{where} was written for another model: {e}. "
                              "Use another ckpt_dir or delete this one.") from e


# --- FSDP (PyTorch's FSDP2, fully_shard): the same checkpoint format, whole networks back at the end ----------------

def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a sharded one (a collective: every process calls it), or t itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def _row_sharded(t: Any) -> bool:
    """A DTensor split by rows over a one-dimensional mesh (FSDP2's layout of every parameter)."""
    from torch.distributed.tensor import Shard

    return _is_dtensor(t) and t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),)


def _full_all(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """{k: _full(v)} with one all-gather per dtype instead of one collective per tensor (a checkpoint of a UNet
    holds a thousand: on a CPU the per-tensor DTensor dispatch cost more than the training steps). Every process
    calls it with the same keys in the same order; tensors not row-sharded go through _full."""
    import torch.distributed as dist

    rows = [k for k, v in tensors.items() if _row_sharded(v)]
    sharded = set(rows)
    out = {k: v if k in sharded else _full(v) for k, v in tensors.items()}
    if not rows:
        return out
    group, world = tensors[rows[0]].device_mesh.get_group(), tensors[rows[0]].device_mesh.size()
    local = {k: tensors[k].to_local() for k in rows}
    counts = torch.tensor([local[k].shape[0] for k in rows], device=local[rows[0]].device)
    gathered_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(gathered_counts, counts, group=group)                   # each process's rows of each tensor
    held = dict(zip(rows, torch.stack(gathered_counts, 1).tolist()))        # key -> rows held by each process
    for dtype in dict.fromkeys(local[k].dtype for k in rows):
        keys = [k for k in rows if local[k].dtype == dtype]
        numel = [[held[k][r] * tensors[k].shape[1:].numel() for k in keys] for r in range(world)]  # (world, keys)
        flat = torch.cat([local[k].reshape(-1) for k in keys])
        padded = flat.new_zeros(max(sum(n) for n in numel))
        padded[:flat.numel()] = flat
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        pieces = [buf[:sum(n)].split(n) for buf, n in zip(gathered, numel)]   # (world, keys) flat pieces
        out.update({k: torch.cat([p[i] for p in pieces]).view(tensors[k].shape) for i, k in enumerate(keys)})
    return out


def _clip_grad_norm_(params: list[Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ (scale every gradient by max_norm / (||g|| + 1e-6) when that is below 1, with
    ||g|| the L2 norm of all gradients together). Row-sharded gradients (FSDP) take one all-reduce of the shards'
    sums of squares instead of torch's per-tensor DTensor dispatch; the norm is the same up to rounding."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not all(_row_sharded(g) for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    local = [g.to_local() for g in grads]
    sq = torch.stack([v.float().pow(2).sum() for v in local]).sum()
    dist.all_reduce(sq, group=grads[0].device_mesh.get_group())
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local, coef.to(local[0].dtype))


def _like(value: Tensor, ref: Tensor | None) -> Tensor:
    """A whole tensor laid out as ref: this process's shard when ref is sharded."""
    if ref is None or not _is_dtensor(ref):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)


def _check_fsdp(accelerator, targets: Mapping[str, Target]) -> None:
    import torch.distributed as dist

    if accelerator is None or not dist.is_initialized():
        raise ValueError("TrainConfig(fsdp=True) shards over processes: launch with `accelerate launch` or `torchrun` "
                         "and pass the Accelerator (one process trains without it)")
    if targets:
        raise NotImplementedError(f"targets {sorted(targets)} (EMA copies followed every update) are not supported "
                                  "with fsdp; train with DDP (fsdp=False)")


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of module with every parameter and buffer on the meta device (no memory): the unsharded network's
    skeleton, filled with the trained weights at the end."""
    memo: dict[int, Any] = {id(b): torch.empty_like(b, device="meta") for b in module.buffers()}
    memo.update({id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                 for p in module.parameters()})
    return copy.deepcopy(module, memo)


def _shard(module: nn.Module, units: int = 16) -> None:
    """FSDP2 on a network, innermost first: fully_shard every submodule whose not yet sharded parameters reach 1/units
    of the network's (the blocks), then every module still holding parameters of its own (leaves left over, such as
    conv_in: every parameter then lives in a module that is only ever called through forward, so a step function may
    call any submodule), then the network. The methods a step function calls instead of forward (each sharded module's
    `synced_methods`: a Denoiser's raw, a critic's logits) gather the parameters as forward does.

    Gathered weights stay gathered until the engine frees them at the end of each phase (reshard_after_forward=False):
    a step may backpropagate through a network that is frozen in this phase (DMD2's generator loss goes through the
    critic's GAN head), or run one network's forward several times before its backward (the critic's fake score, on
    noisy, real and generated samples). Gradients and AdamW states stay sharded throughout: ZeRO-2's memory, with the
    weights freed between phases."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    device = next(module.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    threshold = max(1, sum(p.numel() for p in module.parameters()) // units)
    covered: set[int] = set()
    sharded: list[nn.Module] = []

    def shard(m: nn.Module) -> None:
        fully_shard(m, mesh=mesh, reshard_after_forward=False)   # see the docstring
        covered.update(id(p) for p in m.parameters())
        sharded.append(m)

    def blocks(m: nn.Module) -> int:
        """Shard m's large subtrees bottom-up; returns the parameters of m's subtree still unsharded."""
        left = sum(blocks(c) for c in m.children()) + sum(p.numel() for p in m.parameters(recurse=False))
        if m is not module and left >= threshold and not isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            shard(m)                                  # (a list of blocks has no forward: its blocks are units)
            return 0
        return left

    def leftovers(m: nn.Module) -> None:
        for c in m.children():
            leftovers(c)
        if m is not module and any(id(p) not in covered for p in m.parameters(recurse=False)):
            shard(m)

    blocks(module)
    leftovers(module)
    shard(module)
    # FSDP2 makes the first sharded module to run forward the root; a step function may call a submodule first
    # (DMD's dm_loss calls critic.fake before critic.logits), so the network is made the root now
    module._get_fsdp_state()._lazy_init()
    for m in sharded:
        for name in _synced_methods(m):
            if callable(getattr(type(m), name, None)):
                register_fsdp_forward_method(m, name)


def _reshard(module: nn.Module) -> None:
    """Free the gathered weights of every sharded submodule."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _unsharded(r: _Run) -> nn.Module:
    """The trained network as a plain module on this process's device: the skeleton with the whole weights."""
    state = _full_all(r.spec.module.state_dict())
    device = next(iter(r.trainable.values())).device
    plain = r.skeleton.to_empty(device=device)
    plain.load_state_dict(state)
    with torch.no_grad():                        # buffers are not sharded; non-persistent ones are in no state dict
        buffers = dict(r.spec.module.named_buffers())
        for k, b in plain.named_buffers():
            b.copy_(buffers[k])
    return plain.train(r.spec.module.training)


def train_networks(networks: Mapping[str, Network], step_fn: Callable[[StepContext, Any], Tensor],
                   sample_batch: Callable[[int, torch.Generator], Any], cfg: TrainConfig, *,
                   targets: Mapping[str, Target] | None = None, frozen: Mapping[str, nn.Module] | None = None,
                   ckpt_dir: str | os.PathLike | None = None, extra_config: dict[str, Any] | None = None,
                   progress: bool = True, generator_device: str | torch.device = "cpu", accelerator=None,
                   allow_config_change: bool = False, observer: Observer | None = None,
                   observe_every: int = 1) -> Trained:
    """Train `networks` for cfg.steps iterations, resuming from `ckpt_dir` when it holds a checkpoint of this run.

    step_fn(ctx, batch) -> per-sample losses (B,) of network ctx.phase; batches are moved to the networks' device.
    Each Network carries its own optimizer settings (lr, betas, weight_decay, grad_clip, warmup, lr_schedule,
    ema_decay): a cfg that sets any of them raises ValueError, since the engine would not read them.
    Resuming with changed settings raises CheckpointError naming them (steps, desc, ckpt_every and log_every may
    change), unless allow_config_change. Ctrl-C (KeyboardInterrupt) writes a checkpoint before it propagates.
    observer(step, nets, losses) is called after every observe_every-th iteration (step % observe_every == 0), on
    the main process only (not with fsdp, whose networks are sharded); it leaves the run unchanged (`Observer`).
    """
    set_here = [f"{k}={getattr(cfg, k)!r}" for k in PER_NETWORK if getattr(cfg, k) != _DEFAULTS[k]]
    if set_here:
        raise ValueError(f"TrainConfig({', '.join(set_here)}): train_networks does not read these per-network "
                         "settings; set them on each Network(...) instead (e.g. Network(module, lr=...)) and leave "
                         "them at their defaults in the TrainConfig")
    return _train_networks(networks, step_fn, sample_batch, cfg, targets=targets, frozen=frozen, ckpt_dir=ckpt_dir,
                           extra_config=extra_config, progress=progress, generator_device=generator_device,
                           accelerator=accelerator, allow_config_change=allow_config_change, observer=observer,
                           observe_every=observe_every)


def _train_networks(networks: Mapping[str, Network], step_fn: Callable[[StepContext, Any], Tensor],
                    sample_batch: Callable[[int, torch.Generator], Any], cfg: TrainConfig, *,
                    targets: Mapping[str, Target] | None, frozen: Mapping[str, nn.Module] | None,
                    ckpt_dir: str | os.PathLike | None, extra_config: dict[str, Any] | None, progress: bool,
                    generator_device: str | torch.device, accelerator, allow_config_change: bool,
                    observer: Observer | None = None, observe_every: int = 1) -> Trained:
    """train_networks without the check of cfg's per-network fields: train() records its single network's settings
    in cfg (they are that network's), so its checkpoints describe the run as before."""
    # 1. check the arguments, build an optimizer per network and the target copies
    targets, frozen = dict(targets or {}), dict(frozen or {})
    names = [*networks, *targets, *frozen]
    if len(set(names)) != len(names) or any("." in n for n in names):
        raise ValueError(f"names of networks, targets and frozen modules must be unique and without dots: {names}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {cfg.precision!r}: use 'fp32' or 'bf16' (fp16 would need loss scaling)")
    if cfg.grad_accum < 1 or cfg.log_every < 1 or observe_every < 1:
        raise ValueError("grad_accum, log_every and observe_every must be at least 1")
    if observer is not None and cfg.fsdp:
        raise ValueError("an observer sees whole networks; with fsdp they are sharded over the processes")
    for t in targets.values():
        if t.source not in networks:
            raise ValueError(f"Target source {t.source!r} is not one of the networks {list(networks)}")
    if cfg.fsdp:
        _check_fsdp(accelerator, targets)
    runs: list[_Run] = []
    for name, spec in networks.items():
        if not any(p.requires_grad for p in spec.module.parameters()):
            raise ValueError(f"network {name!r} has no parameter with requires_grad; pass it as frozen= instead")
        if cfg.grad_checkpointing:
            _enable_checkpointing(name, spec.module)
        skeleton = None
        if cfg.fsdp:                   # shard first: the optimizer must hold the sharded parameters
            skeleton = _meta_copy(spec.module)
            _shard(spec.module.to(accelerator.device))
        trainable = {k: p for k, p in spec.module.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(trainable.values(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
        runs.append(_Run(name, spec, trainable, opt, total=len(range(0, cfg.steps, spec.every)), skeleton=skeleton))
    by_name = {r.name: r for r in runs}
    copies = {k: copy.deepcopy(by_name[t.source].spec.module).requires_grad_(False).eval() for k, t in targets.items()}

    # 2. accelerate: wrap each network (DDP) and its optimizer; EMA tensors; one generator stream per process
    rank, world, main = 0, 1, True
    for r in runs:
        r.wrapped = r.spec.module
    if accelerator is not None:
        if accelerator.mixed_precision != "no":
            raise ValueError("set the precision with TrainConfig.precision and leave the Accelerator's "
                             f"mixed_precision at 'no' (got {accelerator.mixed_precision!r})")
        if str(accelerator.distributed_type).split(".")[-1] in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise NotImplementedError(f"the course's engine shards with its own FSDP2 path, not accelerate's "
                                      f"{accelerator.distributed_type} plugin: launch with --multi_gpu (DDP) and set "
                                      "TrainConfig(fsdp=True) (the stage scripts' --fsdp).")
        rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
        for r in runs:
            if cfg.fsdp:
                continue                          # sharded already: FSDP reduce-scatters the gradients itself
            wrapped, r.opt = accelerator.prepare(r.spec.module, r.opt)
            if wrapped is not r.spec.module:
                r.ddp, r.wrapped = wrapped, _Synced(wrapped, r.spec.module)
        for m in [*copies.values(), *frozen.values()]:
            m.to(accelerator.device)
    for r in runs:  # EMA tensors beside the weights (after prepare has moved them to the device)
        r.ema = {k: p.detach().clone() for k, p in r.trainable.items()} if r.spec.ema_decay > 0 else None
    device = next(iter(runs[0].trainable.values())).device
    # Process r draws from seed + r * 0x9E3779B9 (the golden-ratio increment): process 0 keeps cfg.seed, so a
    # single-process run is unchanged, and the low 32 bits (all a CPU mt19937 generator uses) differ by rank.
    gen = torch.Generator(device=generator_device).manual_seed(cfg.seed + rank * 0x9E3779B9)
    step, logs = 0, {}
    description = _describe(cfg, runs, targets, frozen, world, extra_config)
    folder = Path(ckpt_dir) if ckpt_dir is not None else None

    # 3. resume: every process reads the checkpoint and restores its own generator
    if folder is not None and (folder / TRAINER_WEIGHTS).exists():
        step, logs = _restore(folder, description, runs, copies, targets, gen, rank, world, allow_config_change)

    pending: list = []
    saved_at = [step if folder is not None and (folder / TRAINER_WEIGHTS).exists() else None]

    def checkpoint() -> None:
        if folder is None:
            return
        saved_at[0] = step
        _fetch(pending, by_name, logs)
        rng = gen.get_state()[None]                                   # (1, n) bytes
        if accelerator is not None:
            accelerator.wait_for_everyone()
            rng = accelerator.gather(rng.to(accelerator.device)).cpu()  # (world, n): every process's stream
        tensors = _checkpoint_tensors(runs, copies, targets) if main or cfg.fsdp else None  # FSDP: a collective
        if main:
            _save(folder, description, runs, tensors, rng, step, logs)
        if accelerator is not None:
            accelerator.wait_for_everyone()

    # 4. the loop: each iteration runs the phases of the networks due at this step
    for r in runs:
        r.spec.module.train()
        for p in r.trainable.values():
            p.requires_grad_(False)                                   # switched on during the network's own phase
    views = {**{r.name: r.spec.module for r in runs}, **copies, **frozen}
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.desc, disable=not (progress and main), mininterval=0.5)
    rng_at_step_start, updates_at_step_start = gen.get_state(), [r.updates for r in runs]
    try:
        while step < cfg.steps:
            rng_at_step_start, updates_at_step_start = gen.get_state(), [r.updates for r in runs]
            for r in runs:
                if step % r.spec.every:
                    continue
                # 4a. one phase: only r's trainable parameters take gradients (r is called through DDP)
                for p in r.trainable.values():
                    p.requires_grad_(True)
                shared = None
                if cfg.fsdp:
                    shared = torch.Generator().manual_seed(cfg.seed + 1_000_003 * step + 7_919 * runs.index(r))
                ctx = StepContext(r.name, step, gen, {**views, r.name: r.wrapped}, pending, shared)
                loss = _phase(r, ctx, step_fn, sample_batch, cfg, device, accelerator)
                for o in runs:
                    if o.skeleton is not None:
                        _reshard(o.spec.module)       # FSDP: the weights gathered in this phase are freed
                for p in r.trainable.values():
                    p.requires_grad_(False)
                # 4b. the targets that follow r
                for k, t in targets.items():
                    if t.source == r.name:
                        _follow(copies[k], r, t.decay(step) if callable(t.decay) else t.decay)
                pending.append(("loss", r.name, loss))
            # 4c. bookkeeping: losses to the host every log_every iterations, checkpoints every ckpt_every
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0:
                _fetch(pending, by_name, logs)
                recent = {("loss" if len(runs) == 1 else r.name): r.losses[-cfg.log_every:] for r in runs if r.losses}
                bar.set_postfix({k: f"{sum(v) / len(v):.4f}" for k, v in recent.items()})
            if observer is not None and main and step % observe_every == 0:
                _fetch(pending, by_name, logs)
                with torch.no_grad():
                    observer(step, views, {r.name: list(r.losses) for r in runs})
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        # Nearly all time is spent before an optimizer step: if none happened in this iteration, the weights are
        # untouched, and rewinding the generator lets the resumed run redo it exactly. An interrupt after a
        # phase's update is saved as it is (resuming then is not bit-exact).
        if [r.updates for r in runs] == updates_at_step_start:
            gen.set_state(rng_at_step_start)
        checkpoint()
        bar.close()
        if folder is not None and main:
            print(f"interrupted at step {step}; checkpoint saved in {folder}. Run the same call again to resume.")
        raise
    finally:
        for r in runs:
            for p in r.trainable.values():
                p.requires_grad_(True)
    bar.close()
    if saved_at[0] != step:                     # not saved at this step already (ckpt_every divides steps)
        checkpoint()
    _fetch(pending, by_name, logs)
    for r in runs:
        r.spec.module.eval()
        if r.skeleton is not None:               # FSDP: every process gets the whole trained network back
            r.spec.module, r.ema = _unsharded(r), None if r.ema is None else _full_all(r.ema)
    return Trained(nets={r.name: r.spec.module for r in runs}, ema={r.name: r.ema for r in runs if r.ema is not None},
                   targets=copies, step=step, updates={r.name: r.updates for r in runs},
                   losses={r.name: r.losses for r in runs}, logs=logs)


def _phase(r: _Run, ctx: StepContext, step_fn: Callable, sample_batch: Callable, cfg: TrainConfig,
           device: torch.device, accelerator) -> Tensor:
    """One update of network r: grad_accum micro-batches, clipping, the optimizer step, the EMA.
    Returns the update's mean loss as a detached scalar tensor (left on the device)."""
    for g in r.opt.param_groups:
        g["lr"] = r.spec.lr * lr_scale(r.updates, r.total, r.spec.warmup, r.spec.lr_schedule)
    r.opt.zero_grad(set_to_none=True)
    bf16 = cfg.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for micro in range(cfg.grad_accum):
        batch = to_device(sample_batch(cfg.batch_size, ctx.generator), device)
        last = micro == cfg.grad_accum - 1
        if r.skeleton is not None:
            r.spec.module.set_requires_gradient_sync(last)                  # FSDP: reduce-scatter once
        with contextlib.nullcontext() if last or r.ddp is None else accelerator.no_sync(r.ddp):  # all-reduce once
            with autocast:
                loss = step_fn(ctx, batch).float().mean()                  # per-sample (B,) -> scalar, in fp32
            if cfg.grad_accum > 1:
                loss = loss / cfg.grad_accum
            loss.backward()
        total = loss.detach() if micro == 0 else total + loss.detach()
    if r.spec.grad_clip is not None:
        _clip_grad_norm_(list(r.trainable.values()), r.spec.grad_clip)
    r.opt.step()
    r.updates += 1
    if r.ema is not None:
        with torch.no_grad():
            for k, p in r.trainable.items():
                r.ema[k].lerp_(p, 1.0 - r.spec.ema_decay)
    return total


@torch.no_grad()
def _follow(target: nn.Module, source: _Run, mu: float) -> None:
    """target <- mu target + (1 - mu) source over the source's trainable parameters; buffers are copied."""
    params = dict(target.named_parameters())
    for k, p in source.trainable.items():
        params[k].copy_(p) if mu == 0 else params[k].lerp_(p, 1.0 - mu)
    for bt, bs in zip(target.buffers(), source.spec.module.buffers()):
        bt.copy_(bs)


def _checkpoint_tensors(runs: list[_Run], copies: dict[str, nn.Module], targets: Mapping[str, Target]
                        ) -> dict[str, Tensor]:
    """Every network (whole tensors, also under FSDP: gathering them is a collective), EMA, optimizer state and
    target, under the checkpoint's names."""
    tensors: dict[str, Tensor] = {}
    for r in runs:
        kept = _kept(r.spec.module, r.trainable, r.spec.save_frozen)
        tensors.update({f"net.{r.name}.{k}": v for k, v in kept.items()})
        tensors.update({f"ema.{r.name}.{k}": v for k, v in (r.ema or {}).items()})
        for idx, st in r.opt.state_dict()["state"].items():
            tensors.update({f"opt.{r.name}.{idx}.{key}": torch.as_tensor(val) for key, val in st.items()})
    tensors = _full_all(tensors)                         # FSDP: whole tensors (a collective), one gather per dtype
    for k, t in targets.items():
        source = next(r for r in runs if r.name == t.source)
        tensors.update({f"target.{k}.{n}": v for n, v in _kept(copies[k], source.trainable, False).items()})
    return tensors


def _save(folder: Path, description: dict, runs: list[_Run], tensors: dict[str, Tensor], rng: Tensor, step: int,
          logs: dict) -> None:
    tensors = {"rng": rng, **tensors}
    losses = {r.name: r.losses for r in runs}
    config = {"step": step, "updates": {r.name: r.updates for r in runs}, "logs": logs,
              "losses": losses[runs[0].name] if len(runs) == 1 else losses, **description}
    save_tensors(folder, tensors, config, weights_name=TRAINER_WEIGHTS, embed_config=True)


def _restore(folder: Path, description: dict, runs: list[_Run], copies: dict[str, nn.Module],
             targets: Mapping[str, Target], gen: torch.Generator, rank: int, world: int,
             allow_config_change: bool) -> tuple[int, dict]:
    where = folder / TRAINER_WEIGHTS
    tensors, config = load_tensors(folder, "delete the folder to start the run from scratch",
                                   weights_name=TRAINER_WEIGHTS)
    if "networks" not in config or "rng" not in tensors or tensors["rng"].ndim != 2:
        raise CheckpointError(f"{where} was written by an older version of course_lib.train; delete {folder} "
                              "to start the run from scratch.")
    if tensors["rng"].shape[0] != world:
        raise CheckpointError(f"{where} was written by a run with {tensors['rng'].shape[0]} processes; this one has "
                              f"{world}. Resume with the same number of processes, or use another ckpt_dir.")
    # compare the settings, except those a longer (or differently logged) continuation may change
    old, new = ({**c, "train_config": {k: v for k, v in c["train_config"].items() if k not in ALWAYS_CHANGEABLE
                                        + PER_NETWORK}} for c in (config, description))
    changes = _changes({k: old.get(k) for k in new}, new)
    if changes and not allow_config_change:
        paths = [c.split(":")[0].split(".") for c in changes]
        models = any(p[0] == "frozen" or p[0] == "networks" and p[2:3] == ["model"] for p in paths)
        kind = "another model" if models else "other settings"
        raise CheckpointError(f"{where} was written for {kind}; changed: {'; '.join(changes)}. Run with the "
                              "checkpoint's settings, pass allow_config_change=True to continue with the new ones, "
                              "or use another ckpt_dir.")
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for r in runs:
        frozen_names = {k for k, _ in r.spec.module.named_parameters()} - set(r.trainable)
        _load(r.spec.module, part(f"net.{r.name}."), set() if r.spec.save_frozen else frozen_names, str(where))
        if r.ema is not None:
            ema = part(f"ema.{r.name}.")
            if set(ema) != set(r.ema):
                raise CheckpointError(f"{where} has no EMA for network {r.name!r} (ema_decay was 0 when it was "
                                      "written); set ema_decay=0 or use another ckpt_dir.")
            for k, v in ema.items():
                r.ema[k].copy_(_like(v, r.ema[k]))
        params = [p for g in r.opt.param_groups for p in g["params"]]
        opt_state: dict[int, dict[str, Tensor]] = {}
        for k, v in part(f"opt.{r.name}.").items():
            idx, key = k.split(".", 1)
            p = params[int(idx)] if int(idx) < len(params) else None
            opt_state.setdefault(int(idx), {})[key] = _like(v, p) if p is not None and v.shape == p.shape else v
        sd = r.opt.state_dict()
        sd["state"] = opt_state
        r.opt.load_state_dict(sd)
        r.updates = int(config["updates"][r.name])
        losses = config["losses"]
        r.losses = list(losses if isinstance(losses, list) else losses[r.name])
    for k, t in targets.items():
        source = next(r for r in runs if r.name == t.source)
        frozen_names = {n for n, _ in copies[k].named_parameters()} - set(source.trainable)
        _load(copies[k], part(f"target.{k}."), frozen_names, str(where))
    gen.set_state(tensors["rng"][rank].clone())  # a copy: set_state misreads a row view (storage offset)
    return int(config["step"]), {k: list(v) for k, v in config.get("logs", {}).items()}


def train(model: nn.Module, loss_fn: Callable[[nn.Module, Any, torch.Generator], Tensor],
          sample_batch: Callable[[int, torch.Generator], Any], cfg: TrainConfig,
          ckpt_dir: str | os.PathLike | None = None, extra_config: dict[str, Any] | None = None,
          progress: bool = True, generator_device: str | torch.device = "cpu", accelerator=None,
          allow_config_change: bool = False, observer: Observer | None = None, observe_every: int = 1) -> Trained:
    """Train one network (`loss_fn(model, batch, generator) -> (B,)`) with the hyperparameters in cfg: a thin
    wrapper around train_networks; the result's network is "model" (.model, .best(): its EMA when cfg.ema_decay > 0,
    .losses["model"]). Resumes from `ckpt_dir`; Ctrl-C writes a checkpoint before it propagates. observer: as in
    train_networks (its nets hold "model")."""
    net = Network(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                  warmup=cfg.warmup, lr_schedule=cfg.lr_schedule, ema_decay=cfg.ema_decay)
    return _train_networks({"model": net}, lambda ctx, batch: loss_fn(ctx.nets["model"], batch, ctx.generator),
                           sample_batch, cfg, targets=None, frozen=None, ckpt_dir=ckpt_dir,
                           extra_config=extra_config, progress=progress,
                           generator_device=generator_device, accelerator=accelerator,
                           allow_config_change=allow_config_change, observer=observer, observe_every=observe_every)
