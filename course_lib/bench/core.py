"""What every benchmark shares, written once: rows (schema 3), evaluation over seeds (`Evaluation`), timing, the
2D references and data floors, the class-conditional reference, every 2D and digits metric (`score_2d`,
`score_fidelity`, `score_digits`), the exact mixture teacher, NFE sweeps and the tables that put rows side by side.

Devices: models run on the benchmark's device; every noise tensor is drawn on the CPU from an explicit generator
and then moved (the same numbers on every device); metrics are computed on CPU copies of the samples."""
from __future__ import annotations

import functools
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ..classifier import balanced_labels, class_accuracy, digits_scores, load_digits_classifier
from ..conditioning import Cond, labels
from ..config import pick
from ..data2d import exact_denoiser, get_mixture, sample_2d, sample_conditional
from ..grids import default_grid
from ..images import load_digits
from ..metrics import (EVAL_SEEDS, eval_seeds, flow_map_error, gmm_class_accuracy, in_squares, precision_recall, spread,
                       swd)
from ..plotting import pm as plus_minus
from ..samplers import dpm_solver_pp_2m, generate, nfe as count, steps_for_nfe

SCHEMA = 3
NFES = (1, 2, 4, 8, 16, 32, 64, 128)


def row(dataset: str, model: str, metric: str, value: float, seconds: float, *, nfe: int | None,
        steps: int | None, device: str | torch.device, **extra) -> dict:
    """One result row. nfe: network evaluations per sample (a classifier-free-guided evaluation counts 2, Heun
    with n steps 2n - 1); steps: solver steps (both None for "data" rows); seconds: wall time of producing the
    samples (not the metric); device: where the model ran. Extra fields (sampler, n, w, train_seconds,
    train_updates, ...) follow."""
    return {"schema": SCHEMA, "dataset": dataset, "model": model, "nfe": nfe, "steps": steps, "metric": metric,
            "value": float(value), "seconds": round(float(seconds), 4), "device": str(device), **extra}


def spread_row(dataset: str, model: str, metric: str, values: Sequence[float], seconds: float, *, nfe: int | None,
               steps: int | None, device: str | torch.device, **extra) -> dict:
    """A row of one measurement repeated over evaluation seeds: value = the mean, `std` the sample standard deviation,
    `n_seeds` and the per-seed `values` beside it (every other field as in `row`)."""
    mean, std = spread(values)
    return row(dataset, model, metric, mean, seconds, nfe=nfe, steps=steps, device=device, std=std,
               n_seeds=len(values), values=[float(v) for v in values], **extra)


def pm(mean: float, std: float | None) -> str:
    """"mean ± std" for benchmark tables (plotting.pm with 4 significant digits)."""
    return plus_minus(mean, std, digits=4)


def nfe(sampler: str, steps: int, guided: bool = False) -> int:
    """Network evaluations per sample of `steps` steps of `sampler` ("one-step": a single evaluation); a
    classifier-free-guided model evaluates twice per call (conditional and unconditional)."""
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


MIXTURES = ("gmm", "gmm-overlap")  # the 2D data that are Gaussian mixtures (exact teacher, precision/recall)
PR_N = 2000         # points per precision/recall evaluation (and per exact flow-map reference): "a few thousand"
EXACT_STEPS = 128   # DPM-Solver++(2M) steps of the exact mixture teacher (RMS change to 1024 steps: ~1e-3)


class Evaluation:
    """Rows measured over evaluation seeds, collected in one place: a benchmark loops over `self.seeds` (fresh noise
    and fresh reference samples each), calls `add` once per seed for each measured number, and `rows()` turns the
    per-seed values into one spread_row per measurement (value = mean, std, n_seeds, values; seconds = the mean).
    A measurement is identified by (dataset, model, metric, nfe, steps) and its extra fields; `se` (a per-seed
    standard error, e.g. KID's) is averaged over seeds, not part of the identity."""

    def __init__(self, seed: int, device: str | torch.device, n: int = EVAL_SEEDS):
        self.seeds, self.device = eval_seeds(seed, n), device
        self._acc: dict[tuple, dict] = {}

    def add(self, dataset: str, model: str, metric: str, value: float, seconds: float = 0.0, *, nfe: int | None,
            steps: int | None, se: float | None = None, **extra) -> None:
        key = (dataset, model, metric, nfe, steps, tuple(extra.items()))
        m = self._acc.setdefault(key, {"values": [], "seconds": [], "se": []})
        m["values"].append(float(value))
        m["seconds"].append(float(seconds))
        if se is not None:
            m["se"].append(float(se))

    def rows(self) -> list[dict]:
        out = []
        for (dataset, model, metric, nfe, steps, extra), m in self._acc.items():
            se = {"se": sum(m["se"]) / len(m["se"])} if m["se"] else {}
            out.append(spread_row(dataset, model, metric, m["values"], sum(m["seconds"]) / len(m["seconds"]),
                                  nfe=nfe, steps=steps, device=self.device, **se, **dict(extra)))
        return out


def per_seed(a: dict, b: dict, op: Callable[[float, float], float] = lambda u, v: u / v) -> tuple[float, float]:
    """(mean, std) over seeds of op(a's value, b's value) for two rows measured on the same evaluation seeds (same
    noise and reference): e.g. a student's SWD over its teacher's, seed by seed."""
    if len(a["values"]) != len(b["values"]):
        raise ValueError(f"rows measured on different seeds: {len(a['values'])} and {len(b['values'])} values")
    return spread([op(u, v) for u, v in zip(a["values"], b["values"])])


def score_2d(ev: Evaluation, dataset: str, model: str, x: Tensor, ref: Tensor, seconds: float, *, nfe: int | None,
             steps: int | None, compare: bool = False, exact: Tensor | None = None, **extra) -> None:
    """Every 2D sample metric of samples x against exact data samples ref, added to `ev` for this seed: "swd";
    "in_squares" on the checkerboard; on the mixtures, where `compare` (rows a reader compares: 1-4 steps and
    each model's best), "precision" and "recall" (PR_N points); "flow_map_err_exact", the RMS distance of the
    first len(exact) samples to `exact`, the exact mixture teacher's ODE solution from the same noise."""
    x = cpu(x)
    common = dict(nfe=nfe, steps=steps, **extra)
    ev.add(dataset, model, "swd", swd(x, ref), seconds, **common)
    if dataset == "checkerboard":
        ev.add(dataset, model, "in_squares", in_squares(x), seconds, **common)
    if compare and dataset in MIXTURES:
        p, r = precision_recall(x[:PR_N], ref[:PR_N])
        ev.add(dataset, model, "precision", p, seconds, **common)
        ev.add(dataset, model, "recall", r, seconds, **common)
    if exact is not None:
        ev.add(dataset, model, "flow_map_err_exact", flow_map_error(x[:len(exact)], exact), seconds, **common)


def exact_map(dataset: str, process, x1: Tensor) -> Tensor:
    """The exact Gaussian-mixture teacher's ODE solution from noise x1 (N, 2) in `process` (the student's:
    vp-cosine for diffusion students, rf for flows): DPM-Solver++(2M), EXACT_STEPS steps, on the CPU."""
    return dpm_solver_pp_2m(exact_denoiser(dataset, process), cpu(x1), default_grid(EXACT_STEPS, process), process)


def sweep_2d(ev: Evaluation, model, process, dataset: str, model_name: str, sampler: str, ref: Tensor,
             nfes: Sequence[int], seed: int, device: str | torch.device, exact: Tensor | None = None) -> None:
    """Sample `model` (on `device`) at every NFE budget (same noise for all, drawn from `seed`) and score each
    against `ref` (N, 2) with score_2d; precision/recall at 1-4 NFE and at the largest budget (the model's best,
    or near it); flow-map error to `exact` (the exact teacher from the same noise) where given."""
    seen = set()
    for budget in nfes:
        steps = steps_for_nfe(sampler, budget)
        used = nfe(sampler, steps)
        if used in seen:
            continue
        seen.add(used)
        x, sec = timed(lambda: generate(model, process, tuple(ref.shape), sampler, steps, device=device,
                                        generator=torch.Generator().manual_seed(seed)), device)
        score_2d(ev, dataset, model_name, x, ref, sec, nfe=used, steps=steps, exact=exact,
                 compare=used <= 4 or budget == max(nfes), sampler=sampler, n=len(ref))


def reference_2d(ev: Evaluation, dataset: str, n: int, seed: int) -> Tensor:
    """n reference samples of a 2D dataset (CPU) for evaluation seed `seed`, and the "data" rows (the floor) added
    to `ev`: every score_2d metric of n independent exact samples against them."""
    ref, _ = sample_2d(dataset, n, torch.Generator().manual_seed(seed + 1))
    other, sec = timed(lambda: sample_2d(dataset, n, torch.Generator().manual_seed(seed + 2))[0])
    score_2d(ev, dataset, "data", other, ref, sec, nfe=None, steps=None, compare=True, n=n)
    return ref


def seed_inputs(ev: Evaluation, dataset: str, process, n: int, seed: int,
                device: str | torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """One evaluation seed's inputs of a 2D benchmark: the reference samples (with the "data" rows, reference_2d),
    the noise x1 (n, 2) of `process` (seed + 3) and, on gmm, the exact mixture's ODE solution from its first PR_N
    points (exact_map; None on other datasets)."""
    ref = reference_2d(ev, dataset, n, seed)
    x1 = prior(process, (n, 2), seed + 3, device)
    return ref, x1, (exact_map(dataset, process, x1[:PR_N]) if dataset == "gmm" else None)

def conditional_reference(ev: Evaluation, dataset: str, n: int, seed: int):
    """For a class-conditional 2D mixture and evaluation seed `seed`: balanced labels y (n,) (CPU), the SWD against
    exact samples of those classes and the Bayes class accuracy (both take samples on any device and score a CPU
    copy), with the "data" rows ("swd_data", "class_acc" of an independent exact batch) added to `ev`.
    Returns (mixture, y, swd_data(x) -> float, acc(x) -> float)."""
    mix = get_mixture(dataset)
    y = torch.arange(n) % mix.num_classes                                       # balanced labels
    ref = sample_conditional(mix, y, torch.Generator().manual_seed(seed + 1))
    swd_data = lambda a: swd(a, ref)
    acc = lambda a: gmm_class_accuracy(cpu(a), y, mix)
    other, sec = timed(lambda: sample_conditional(mix, y, torch.Generator().manual_seed(seed + 2)))
    for metric, fn in (("swd_data", swd_data), ("class_acc", acc)):
        ev.add(dataset, "data", metric, fn(other), sec, nfe=None, steps=None, n=n)
    return mix, y, swd_data, acc


def score_fidelity(ev: Evaluation, dataset: str, model: str, x: Tensor, teacher_same: Tensor | None,
                   teacher_fresh: Tensor, seconds: float, *, nfe: int, steps: int, **extra) -> None:
    """A guided student's fidelity to the guided teacher it distils (same w): "swd_teacher", the SWD against the
    teacher's samples from fresh noise (independent of x's; for the teacher itself: the metric's floor), and
    "flow_map_err_teacher", the RMS distance to the teacher's output from the same noise (teacher_same; None for
    the teacher itself)."""
    x = cpu(x)
    ev.add(dataset, model, "swd_teacher", swd(x, teacher_fresh), seconds, nfe=nfe, steps=steps, **extra)
    if teacher_same is not None:
        ev.add(dataset, model, "flow_map_err_teacher", flow_map_error(x, cpu(teacher_same)), seconds, nfe=nfe,
               steps=steps, **extra)


def fresh(samples: list, i: int):
    """The samples of the next evaluation seed (cyclically): independent of seed i's noise, so a teacher's samples
    from "fresh noise" cost no extra generation."""
    return samples[(i + 1) % len(samples)]


def digits_n(mode: str, cheap: bool) -> int:
    """Generated digits per evaluation seed: thousands for cheap rows (1-4 step students), a few hundred for
    many-step teacher rows (KID is unbiased at any n; its standard error says how precise)."""
    return pick(mode, smoke=40, laptop=2000 if cheap else 300, full=5000 if cheap else 1000)


@functools.cache
def _classifier():
    """The shipped digits classifier, loaded once per process."""
    return load_digits_classifier()


def score_digits(ev: Evaluation, model: str, x: Tensor, seconds: float, *, nfe: int | None, steps: int | None,
                 y: Tensor | None = None, **extra) -> None:
    """The digits metrics of images x (classifier.digits_scores) added to `ev`: "kid_heldout" and "kid_train"
    (unbiased KID against the 297 held-out and the 1500 training digits, each with its standard error `se`) and
    "fd_heldout" (Frechet distance against the held-out digits); "class_acc" when the requested labels y are given."""
    x = cpu(x)
    d = digits_scores(x, _classifier())
    common = dict(nfe=nfe, steps=steps, n=len(x), **extra)
    ev.add("digits", model, "kid_heldout", d["kid_heldout"], seconds, se=d["kid_heldout_se"], **common)
    ev.add("digits", model, "kid_train", d["kid_train"], seconds, se=d["kid_train_se"], **common)
    ev.add("digits", model, "fd_heldout", d["fd_heldout"], seconds, **common)
    if y is not None:
        ev.add("digits", model, "class_acc", class_accuracy(x, cpu(y), _classifier()), seconds, **common)


DIGITS_FLOOR_N = 500   # training digits per floor evaluation (a third of them: disjoint-ish subsets over seeds)


def digits_floor(ev: Evaluation, seed: int) -> None:
    """The digits "data" rows for evaluation seed `seed`: DIGITS_FLOOR_N real training digits (a random subset,
    different per seed) scored like a model: their kid_heldout is what a perfect generator of the training
    distribution scores; their kid_train (they are in the training set) what pure memorisation scores."""
    train, _ = load_digits(16, "train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:DIGITS_FLOOR_N]
    score_digits(ev, "data", train[idx], 0.0, nfe=None, steps=None)


def digits_teacher(ev: Evaluation, teacher, seed: int, n: int, steps: int, device: str | torch.device,
                   with_labels: bool = False) -> None:
    """The digits "teacher" row for evaluation seed `seed`: n class-balanced samples of the class-conditional teacher
    with DPM-Solver++(2M) at `steps` steps (noise seeded seed + 6), timed and scored (class accuracy too with_labels)."""
    y = balanced_labels(n).to(device)
    x, sec = timed(lambda: generate(teacher, teacher.process, (n, 1, 16, 16), "dpmpp2m", steps, device=device,
                                    generator=torch.Generator().manual_seed(seed + 6),
                                    cond=labels(y, teacher.net.num_classes)), device)
    score_digits(ev, "teacher", x, sec, nfe=nfe("dpmpp2m", steps), steps=steps, sampler="dpmpp2m",
                 **({"y": y} if with_labels else {}))


def digit_labels(n: int, device: str | torch.device, num_classes: int = 10) -> Cond:
    """n class-balanced digit labels (classifier.balanced_labels) as a model's conditioning, on `device`."""
    return labels(balanced_labels(n).to(device), num_classes)


def train_fields(seconds: float, updates: int) -> dict:
    """The fields of a row whose model was trained in the benchmark."""
    return {"train_seconds": round(seconds, 1), "train_updates": int(updates)}


def side_by_side(rows: Iterable[dict], key: tuple[str, ...]) -> list[dict]:
    """One line per distinct `key` (field names) with each row's metric as a column, "mean ± std":
    {**key fields, metric: "mean ± std", "rows": {metric: row}} (the rows, for per-seed ratios)."""
    lines: dict[tuple, dict] = {}
    for r in rows:
        k = tuple(r.get(f) for f in key)
        line = lines.setdefault(k, {**{f: r.get(f) for f in key}, "rows": {}})
        line[r["metric"]] = pm(r["value"], r.get("std"))
        line["rows"][r["metric"]] = r
    return list(lines.values())


def teacher_best(rows: Iterable[dict], teacher: Callable[[str], bool] = lambda m: m == "teacher") -> dict | None:
    """Among one dataset's rows: the teacher's "swd" row of lowest mean (None without one), the reference of
    "swd / teacher best"."""
    return min((r for r in rows if teacher(r["model"]) and r["metric"] == "swd"), key=lambda r: r["value"],
               default=None)


def over_best(lines: list[dict], best: dict | None, skip: tuple[str, ...] = ("data",)) -> list[dict]:
    """side_by_side `lines`, each one with an SWD (but the models in `skip`) given "swd / teacher best": its SWD over
    best's, seed by seed (per_seed), as mean ± std."""
    for d in lines:
        if "swd" in d["rows"] and best and d["model"] not in skip:
            d["swd / teacher best"] = pm(*per_seed(d["rows"]["swd"], best))
    return lines


def lines_over_best(rows: Iterable[dict], datasets: Iterable[str], keep: Callable[[dict, dict | None], bool],
                    key: tuple[str, ...] = ("dataset", "model", "nfe"), skip: tuple[str, ...] = ("data",),
                    teacher: Callable[[str], bool] = lambda m: m == "teacher") -> list[dict]:
    """Per dataset of `datasets`: its rows r with keep(r, best) side by side by `key`, each line with its SWD over
    `best`, the dataset's teacher_best row (over_best; not for the models in `skip`)."""
    rows, out = list(rows), []
    for ds in datasets:
        mine = [r for r in rows if r["dataset"] == ds]
        best = teacher_best(mine, teacher)
        out += over_best(side_by_side([r for r in mine if keep(r, best)], key), best, skip)
    return out


def fidelity_to_teacher(line: dict, teacher: dict) -> None:
    """Add to a guided student's side_by_side `line` its fidelity to the teacher's rows `teacher` (same seeds):
    "swd_teacher / teacher's" (over the teacher's own swd_teacher, the metric's floor) and "acc - teacher (points)",
    each per seed (per_seed), as mean ± std, where both sides have the metric."""
    mine = line["rows"]
    if "swd_teacher" in mine and "swd_teacher" in teacher:
        line["swd_teacher / teacher's"] = pm(*per_seed(mine["swd_teacher"], teacher["swd_teacher"]))
    if "class_acc" in mine and "class_acc" in teacher:
        line["acc - teacher (points)"] = pm(*per_seed(mine["class_acc"], teacher["class_acc"],
                                                      lambda u, v: 100 * (u - v)))


class RoundClock:
    """A per-round `cfg` for progressive distillation (distill.pd.distill_pd calls run(N) as round N
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
