"""Checkers of notebook 02 (guided distillation): the guided target, the stage-1 loss, stage 2's batches."""
from __future__ import annotations

from typing import Callable

import torch

from ..config import seeded
from ..processes import VPCosine
from .core import accept, checker, draw_seed, explain_exception, fall_back, fresh_generator, run_check


def _guided_cases(g: torch.Generator, with_student: bool = False):
    """Exact Gaussian-mixture teacher (overlapping classes) and, for the loss, a tiny guided MLP whose guidance
    embedding is randomised (a fresh student ignores w, which would hide a w passed wrongly)."""
    from ..data2d import exact_denoiser, get_mixture, sample_2d
    from ..models import Denoiser, MLP2D

    proc = VPCosine()
    teacher = exact_denoiser("gmm-overlap", proc)
    null = get_mixture("gmm-overlap").num_classes
    for B, w_hi in ((6, 0.0), (8, 1.0), (10, 4.0)):
        x0, y = sample_2d("gmm-overlap", B, g)
        x0 = x0.double()
        t = 0.02 + 0.96 * torch.rand(B, generator=g, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        w = w_hi * torch.rand(B, generator=g, dtype=torch.float64)
        where = f"for {B} samples with w in [0, {w_hi:g}]" if w_hi else f"for {B} samples with w = 0"
        if with_student:
            with seeded(draw_seed(g)):                 # initialisation; the notebook's global RNG is left alone
                student = Denoiser(MLP2D(hidden=16, depth=2, num_classes=null, guidance_range=(0.0, 4.0)), proc, "v")
                torch.nn.init.normal_(student.net.guidance_emb.mlp[2].weight, std=0.5)
            yield (student.double(), teacher, x0, y, t, eps, w, null, proc), where
        else:
            yield (teacher, proc.marginal(x0, t, eps), t, y, w, null), where


@checker("2.1")
def check_guided_target(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 2.1: student(teacher, z_t, t, y, w, null_label) -> x0_w (B, D), the guided teacher's x-prediction."""
    from ..distill.guided import guided_target

    g = fresh_generator(seed)
    return run_check("2.1", student, guided_target, _guided_cases(g), atol=1e-6, rtol=1e-5,
                     hint="The course's convention is x0_w = (1 + w) x0(z_t | y) - w x0(z_t | null), with w of shape "
                          "(B,) (reshape it to (B, 1) to broadcast); w = 0 is the plain conditional teacher. Imagen's "
                          "x0_u + w (x0_c - x0_u) is the same formula with w shifted by one.")


@checker("2.2")
def check_guided_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 2.2: student(student_model, teacher, x0, y, t, eps, w, null_label, process) -> stage-1 loss (B,)."""
    from ..distill.guided import guided_loss_at

    g = fresh_generator(seed)
    return run_check("2.2", student, guided_loss_at, _guided_cases(g, with_student=True), atol=1e-6, rtol=1e-5,
                     hint="Noise x0 to z_t, compute x0_w with guided_target, call the student with the same labels "
                          "AND the same w (student(z_t, t, y, w)), weight each sample by max(alpha^2/sigma^2, 1) and "
                          "average the squared error over dimensions.")


def _batch_problem(sample_batch: Callable, n: int, w_range: tuple[float, float], seed: int) -> str | None:
    """What is wrong with one batch sample_batch(n, Generator(seed)) (None when nothing is)."""
    out = sample_batch(n, torch.Generator().manual_seed(seed))
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        return "sample_batch must return a pair (x0, {'y': y, 'w': w})"
    x0, cond = out
    if set(cond) != {"y", "w"}:
        return f"the conditioning dict must have the keys 'y' and 'w' (the model's inputs); got {sorted(cond)}"
    w = torch.as_tensor(cond["w"])
    if x0.shape != (n, 2) or cond["y"].shape != (n,) or w.shape != (n,):
        return (f"for n = {n}: x0 must be ({n}, 2), y and w ({n},); got {tuple(x0.shape)}, "
                f"{tuple(cond['y'].shape)}, {tuple(w.shape)}. Draw one w per sample")
    lo, hi = w_range
    if w.min() < lo or w.max() > hi:
        return f"w must lie in [{lo:g}, {hi:g}]; got values from {float(w.min()):.3g} to {float(w.max()):.3g}"
    mean, spread = float(w.mean()), float(w.std())
    if abs(mean - (lo + hi) / 2) > 0.05 * (hi - lo) or abs(spread - (hi - lo) / 12**0.5) > 0.05 * (hi - lo):
        return (f"w should be uniform on [{lo:g}, {hi:g}] (mean {(lo + hi) / 2:g}, std {(hi - lo) / 12**0.5:.3g}); "
                f"got mean {mean:.3g}, std {spread:.3g}")
    return None


def _generator_problem(sample_batch: Callable, seed: int) -> str | None:
    """Batches must come from the generator g that sample_batch(n, g) receives (the training engine's, seeded for
    reproducible runs): the same seed twice gives the same batch, another seed another batch."""
    gen = lambda s: torch.Generator().manual_seed(s)
    (x_a, c_a), (x_b, c_b), (x_c, c_c) = (sample_batch(64, gen(s)) for s in (seed, seed, seed + 1))
    same = lambda a, b: torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    for name, a, b, c in (("w", c_a["w"], c_b["w"], c_c["w"]), ("x0", x_a, x_b, x_c), ("y", c_a["y"], c_b["y"], c_c["y"])):
        if not same(a, b):
            return (f"two calls with generators seeded alike gave different {name}: draw it with the generator "
                    "sample_batch receives (e.g. torch.rand(n, generator=g)), not torch's global one, so training "
                    "runs are reproducible")
        if same(a, c) and name != "y":
            return (f"generators seeded differently gave the same {name}: draw it with the generator g that "
                    "sample_batch(n, g) receives, not a fixed generator of your own")
    return None


@checker("2.3")
def check_guided_batches(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 2.3: student(sample_data, w_range) -> sample_batch(n, g) returning (x0, {"y": y, "w": w}), with
    one w ~ U[w_min, w_max] per sample drawn with g. Checked by its properties (any order of random draws is fine)."""
    from ..data2d import sample_2d
    from ..distill.guided import guided_batches

    g = fresh_generator(seed)
    sample_data = lambda n, gen: sample_2d("gmm-overlap", n, gen)
    try:
        with torch.random.fork_rng(devices=[]):   # a student drawing from the global RNG must not shift the notebook's
            for w_range in ((0.0, 4.0), (1.0, 2.0)):
                problem = _batch_problem(student(sample_data, w_range), 4000, w_range, draw_seed(g))
                if problem:
                    break
            else:
                problem = _generator_problem(student(sample_data, (0.0, 4.0)), draw_seed(g))
    except Exception as e:
        return fall_back("2.3", guided_batches, explain_exception(e))
    if problem:
        return fall_back("2.3", guided_batches, f"{problem}.")
    return accept("2.3", student, "correct (shapes, keys, a uniform w per sample in two ranges, drawn with the "
                                  "generator it is given).")
