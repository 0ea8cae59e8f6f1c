"""What every benchmark shares, written once: rows (schema 2), timing, the 2D references and data floors, the
class-conditional reference, the digits helpers, NFE sweeps and the tables that put rows side by side.

Devices: models run on the benchmark's device; every noise tensor is drawn on the CPU from an explicit generator
and then moved (the same numbers on every device); metrics are computed on CPU copies of the samples."""
from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

SCHEMA = 2
NFES = (1, 2, 4, 8, 16, 32, 64, 128)


def row(dataset: str, model: str, metric: str, value: float, seconds: float, *, nfe: int | None,
        steps: int | None, device: str | torch.device, **extra) -> dict:
    """One result row. nfe: network evaluations per sample (a classifier-free-guided evaluation counts 2, Heun
    with n steps 2n - 1); steps: solver steps (both None for "data" rows); seconds: wall time of producing the
    samples (not the metric); device: where the model ran. Extra fields (sampler, n, w, train_seconds,
    train_updates, ...) follow."""
    return {"schema": SCHEMA, "dataset": dataset, "model": model, "nfe": nfe, "steps": steps, "metric": metric,
            "value": float(value), "seconds": round(float(seconds), 4), "device": str(device), **extra}


EVAL_SEEDS = 3   # every compared number: mean and spread over this many evaluation seeds (DESIGN.md, Measurements)


def eval_seeds(seed: int, n: int = EVAL_SEEDS) -> list[int]:
    """The evaluation seeds of a benchmark run with base `seed`: each gives fresh noise and fresh reference samples
    (derive both from it). The first is `seed` itself, so seed 0's draws are those of a single-seed run."""
    return [seed + 1000 * k for k in range(n)]


def spread_row(dataset: str, model: str, metric: str, values: Sequence[float], seconds: float, *, nfe: int | None,
               steps: int | None, device: str | torch.device, **extra) -> dict:
    """A row of one measurement repeated over evaluation seeds: value = the mean, `std` the sample standard deviation,
    `n_seeds` and the per-seed `values` beside it (every other field as in `row`)."""
    from ..metrics import spread

    mean, std = spread(values)
    return row(dataset, model, metric, mean, seconds, nfe=nfe, steps=steps, device=device, std=std,
               n_seeds=len(values), values=[float(v) for v in values], **extra)


def pm(mean: float, std: float | None) -> str:
    """"mean ± std" for tables (4 significant digits)."""
    return f"{mean:.4g}" if std is None else f"{mean:.4g} ± {std:.2g}"


def nfe(sampler: str, steps: int, guided: bool = False) -> int:
    """Network evaluations per sample of `steps` steps of `sampler` ("one-step": a single evaluation); a
    classifier-free-guided model evaluates twice per call (conditional and unconditional)."""
    from ..samplers import nfe as count

    return (2 if guided else 1) if sampler == "one-step" else count(sampler, steps, guided=guided)


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a clock read means what it says."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Tensor], device: str | torch.device = "cpu") -> tuple[Tensor, float]:
    """(fn(), wall seconds), synchronising CUDA before each reading of the clock."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def cpu(x: Tensor) -> Tensor:
    """The CPU copy metrics are computed on."""
    return x.detach().cpu()


def noise(shape: tuple[int, ...], seed: int, device: str | torch.device, scale: float = 1.0) -> Tensor:
    """scale * N(0, I) of `shape`, drawn on the CPU from torch.Generator().manual_seed(seed), moved to `device`."""
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(device)


def prior(process, shape: tuple[int, ...], seed: int, device: str | torch.device) -> Tensor:
    """x_1 of `process` drawn on the CPU (generator seeded with `seed`) and moved to `device`."""
    return process.prior(shape, torch.Generator().manual_seed(seed)).to(device)


def sweep_2d(model, process, dataset: str, model_name: str, sampler: str, ref: Tensor, nfes: Iterable[int],
             seed: int, metric: Callable[[Tensor, Tensor], float], device: str | torch.device) -> list[dict]:
    """Sample `model` (on `device`) at every NFE budget (same noise for all) and score each against `ref` (N, 2)."""
    from ..samplers import generate, steps_for_nfe

    rows, seen = [], set()
    for budget in nfes:
        steps = steps_for_nfe(sampler, budget)
        used = nfe(sampler, steps)
        if used in seen:
            continue
        seen.add(used)
        x, sec = timed(lambda: generate(model, process, tuple(ref.shape), sampler, steps, device=device,
                                        generator=torch.Generator().manual_seed(seed)), device)
        rows.append(row(dataset, model_name, "swd", metric(cpu(x), ref), sec, nfe=used, steps=steps, device=device,
                        sampler=sampler, n=len(ref)))
    return rows


def reference_2d(dataset: str, n: int, seed: int, metric: Callable[[Tensor, Tensor], float],
                 device: str | torch.device) -> tuple[Tensor, dict]:
    """n reference samples of a 2D dataset (CPU), and the "data" row: the metric against n independent ones."""
    from ..data2d import sample_2d

    ref, _ = sample_2d(dataset, n, torch.Generator().manual_seed(seed + 1))
    other, sec = timed(lambda: sample_2d(dataset, n, torch.Generator().manual_seed(seed + 2))[0])
    return ref, row(dataset, "data", "swd", metric(other, ref), sec, nfe=None, steps=None, device=device, n=n)


def conditional_reference(dataset: str, n: int, seed: int, device: str | torch.device):
    """For a class-conditional 2D mixture: balanced labels y (n,) (CPU), the SWD against exact samples of those
    classes, the Bayes class accuracy (both take samples on any device and score a CPU copy), and the two "data"
    rows (an independent exact batch scored by both). Returns (mixture, y, swd(x) -> float, acc(x) -> float, rows)."""
    from ..data2d import get_mixture, sample_conditional
    from ..metrics import gmm_class_accuracy, sliced_wasserstein

    mix = get_mixture(dataset)
    y = torch.arange(n) % mix.num_classes                                       # balanced labels
    ref = sample_conditional(mix, y, torch.Generator().manual_seed(seed + 1))
    swd = lambda a: sliced_wasserstein(cpu(a), ref, n_proj=256, seed=0)
    acc = lambda a: gmm_class_accuracy(cpu(a), y, mix)
    other, sec = timed(lambda: sample_conditional(mix, y, torch.Generator().manual_seed(seed + 2)))
    data = dict(nfe=None, steps=None, device=device, n=n)
    return mix, y, swd, acc, [row(dataset, "data", "swd", swd(other), sec, **data),
                              row(dataset, "data", "class_acc", acc(other), sec, **data)]


def digits_floor_row(device: str | torch.device) -> dict:
    """The digits "data" row: the held-out real half (898 digits) against the reference half, digits FD."""
    from ..classifier import digits_fd_floor, digits_halves

    return row("digits", "data", "digits_fd", digits_fd_floor(), 0.0, nfe=None, steps=None, device=device,
               n=len(digits_halves()[0]))


def digits_fd(x: Tensor) -> float:
    """The digits Fréchet distance of samples on any device (computed on a CPU copy)."""
    from ..classifier import digits_frechet_distance

    return digits_frechet_distance(cpu(x))


def digits_acc(x: Tensor, y: Tensor) -> float:
    """The digits classifier's accuracy on samples x for the requested labels y (computed on CPU copies)."""
    from ..classifier import class_accuracy

    return class_accuracy(cpu(x), cpu(y))


def train_fields(seconds: float, updates: int) -> dict:
    """The fields of a row whose model was trained in the benchmark."""
    return {"train_seconds": round(seconds, 1), "train_updates": int(updates)}


def side_by_side(rows: Iterable[dict], key: tuple[str, ...]) -> list[dict]:
    """One line per distinct `key` (field names) with each row's metric as a column: {**key fields, metric: value}."""
    lines: dict[tuple, dict] = {}
    for r in rows:
        k = tuple(r.get(f) for f in key)
        lines.setdefault(k, {f: r.get(f) for f in key})[r["metric"]] = r["value"]
    return list(lines.values())


class RoundClock:
    """A per-round `cfg` for progressive distillation (distill.pd.progressive_distillation calls cfg(N) as round N
    starts) that notes the time: seconds(N) is the training time up to the end of the N-step student's round."""

    def __init__(self, cfg):
        self.cfg, self.starts, self.end = cfg, {}, None
        self.t0 = time.perf_counter()

    def __call__(self, N: int):
        self.starts[N] = time.perf_counter()
        return self.cfg

    def stop(self) -> "RoundClock":
        self.end = time.perf_counter()
        return self

    def seconds(self, N: int) -> float:
        return self.starts.get(N // 2, self.end) - self.t0

    def updates(self, N: int) -> int:
        """Updates that made the N-step student: its round and every round before it."""
        return sum(self.cfg.steps for k in self.starts if k >= N)
