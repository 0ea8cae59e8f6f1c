"""What every checker shares: `run_check` (compare a student's function with the reference on random cases and
explain the first difference), the registry of checkers by exercise id, and the checkers' own random numbers.

RNG hygiene: a checker never draws from or reseeds torch's global generator, so running a checker cell leaves
the notebook's later random draws unchanged. Its cases come from its own generator (`fresh_generator`: a seed
from the operating system's entropy unless a test passes one) and networks are initialised inside
`config.seeded` (which restores the global generator afterwards).
"""
from __future__ import annotations

import secrets
import traceback
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

FALLBACK = "Later cells use course_lib's reference implementation instead."
CHECKERS: dict[str, Callable] = {}   # exercise id ("1.3") -> its checker


def checker(exercise: str):
    """Register the decorated function as the checker of exercise `exercise` (the id of its notebook's
    `# BEGIN SOLUTION <id>` marker)."""
    def wrap(fn: Callable) -> Callable:
        if exercise in CHECKERS:
            raise ValueError(f"exercise {exercise} has two checkers: {CHECKERS[exercise].__name__} and {fn.__name__}")
        CHECKERS[exercise] = fn
        fn.exercise = exercise
        return fn
    return wrap


def fresh_generator(seed: int | None) -> torch.Generator:
    """The generator a checker draws its cases from: `seed` when given (tests), else a fresh seed from the operating
    system's entropy (never from torch's global generator, whose state the notebook owns)."""
    return torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(31))


def draw_seed(g: torch.Generator) -> int:
    """A seed for one network's initialisation (used with config.seeded), drawn from the checker's generator."""
    return int(torch.randint(2**31, (1,), generator=g))


def _as_tensor_tuple(out: Any) -> tuple[Tensor, ...]:
    if isinstance(out, Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and all(isinstance(o, Tensor) for o in out):
        return tuple(out)
    if isinstance(out, (float, int)):
        return (torch.tensor(float(out)),)
    raise TypeError(f"expected a tensor (or a tuple of tensors), got {type(out).__name__}")


def run_check(exercise: str, student: Callable, reference: Callable, cases: Iterable[tuple[tuple, str]],
              atol: float = 1e-5, rtol: float = 1e-4, hint: str = "") -> Callable:
    """Compare student(*args) with reference(*args) on each (args, description) case.

    Prints one line of verdict (and, on failure, what differed where) and returns the function to use next.
    """
    fallback = FALLBACK
    n = 0
    for args, where in cases:
        n += 1
        try:
            got = student(*args)
        except NotImplementedError:
            print(f"Exercise {exercise}: not solved yet (it raises NotImplementedError). {fallback}")
            return reference
        except Exception as e:  # the student's code crashed: show where, keep the notebook running
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            print(f"Exercise {exercise}: your function raised {tb} {where}. {fallback}")
            return reference
        want = reference(*args)
        try:
            got_t, want_t = _as_tensor_tuple(got), _as_tensor_tuple(want)
        except TypeError as e:
            print(f"Exercise {exercise}: {e} {where}. {fallback}")
            return reference
        if len(got_t) != len(want_t):
            print(f"Exercise {exercise}: returned {len(got_t)} values, expected {len(want_t)} {where}. {fallback}")
            return reference
        for k, (g, w) in enumerate(zip(got_t, want_t)):
            what = f"output {k}" if len(want_t) > 1 else "the output"
            if tuple(g.shape) != tuple(w.shape):
                print(f"Exercise {exercise}: {what} has shape {tuple(g.shape)}, expected {tuple(w.shape)} {where}. "
                      f"{fallback}")
                return reference
            g = g.detach().to(w.dtype)
            if not torch.isfinite(g).all():
                print(f"Exercise {exercise}: {what} contains inf or nan {where}. {hint} {fallback}".replace("  ", " "))
                return reference
            if not torch.allclose(g, w, atol=atol, rtol=rtol):
                err = (g - w).abs().max().item()
                print(f"Exercise {exercise}: {what} differs from the reference by up to {err:.3g} {where}. "
                      f"{hint} {fallback}".replace("  ", " "))
                return reference
    print(f"Exercise {exercise}: correct on {n} random cases. Later cells use your function.")
    return student
