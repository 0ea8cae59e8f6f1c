"""What every checker shares: `run_check` (compare a student's function with the reference on random cases and
explain the first difference), the verdicts (`accept`, `fall_back`), the translation of raw errors into advice
(`explain_exception`), the registry of checkers by exercise id, and the checkers' own random numbers. Checkers
with their own tests use `first_look` (what is plainly wrong with a first answer: raised, not a tensor, its shape,
an all-zeros placeholder; never the recipe), `close` / `dtype_tol` / `max_diff` (compare at the tolerance of the
answer's dtype) and `quiet` (run a sub-check silently, so that one verdict is printed).

After a fallback a checker returns the library's version marked `.is_library = True`, so later cells can say
so (`library_note(fn)`); checking that marked version again says to re-run the cell defining your function.

RNG hygiene: a checker never draws from or reseeds torch's global generator, so running a checker cell leaves
the notebook's later random draws unchanged. Its cases come from its own generator (`fresh_generator`: a seed
from the operating system's entropy unless a test passes one) and networks are initialised inside
`config.seeded` (which restores the global generator afterwards).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import re
import secrets
import traceback
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from ..config import seeded
from ..models import Denoiser, EDMPrecond, MLP2D
from ..processes import EDM, AffineProcess

FALLBACK = "Later cells use course_lib's reference implementation instead."
ACCEPTED = "Later cells use your function."
LIBRARY_NOTE = "(library's version in use)"
CHECKERS: dict[str, Callable] = {}   # exercise id ("1.3") -> its checker


# --- verdicts ---------------------------------------------------------------------------------------------------

def is_library(fn: Callable) -> bool:
    """True for the function a checker returned after a fallback (the library's version, not the student's)."""
    return bool(getattr(fn, "is_library", False))


def library_note(fn: Callable) -> str:
    """"(library's version in use)" after a fallback, else "": for later cells that report what they ran."""
    return LIBRARY_NOTE if is_library(fn) else ""


def library_version(reference: Callable) -> Callable:
    """`reference` as a new function marked `.is_library = True` (the library's function itself is not touched)."""
    @functools.wraps(reference)
    def library(*args, **kwargs):
        return reference(*args, **kwargs)

    library.is_library = True
    return library


def fall_back(exercise: str, reference: Callable, problem: str) -> Callable:
    """Print why the student's function is not used and return the library's version (marked is_library)."""
    print(f"Exercise {exercise}: {problem.strip()} {FALLBACK}".replace("  ", " "))
    return library_version(reference)


def accept(exercise: str, student: Callable, verdict: str) -> Callable:
    """Print the verdict on a right answer and return the student's function (unchanged)."""
    print(f"Exercise {exercise}: {verdict.strip()} {ACCEPTED}")
    return student


def checker(exercise: str):
    """Register the decorated function as the checker of exercise `exercise` (the id of its notebook's
    `# BEGIN SOLUTION <id>` marker). A function that is already the library's version (a checker cell run
    twice) is returned as it is, with a note, instead of being checked as if it were the student's."""
    def wrap(fn: Callable) -> Callable:
        if exercise in CHECKERS:
            raise ValueError(f"exercise {exercise} has two checkers: {CHECKERS[exercise].__name__} and {fn.__name__}")

        @functools.wraps(fn)
        def check(student: Callable, *args, **kwargs) -> Callable:
            if is_library(student):
                print(f"Exercise {exercise}: this is already the library's version (an earlier check fell back to "
                      "it). Run the cell that defines your function, then this cell again, to check yours.")
                return student
            return fn(student, *args, **kwargs)

        check.exercise = exercise
        CHECKERS[exercise] = check
        return check
    return wrap


# --- raw errors -> advice ---------------------------------------------------------------------------------------

ADVICE: list[tuple[re.Pattern, str]] = [
    (re.compile(r"empty parameter list|no parameter with requires_grad"),
     "The model's parameters are frozen (loaded teachers are, and so is a copy.deepcopy of one): call "
     ".requires_grad_(True) on your copy before training it."),
    (re.compile(r"does not require grad and does not have a grad_fn"),
     "The loss has no gradient: the model's parameters are frozen (loaded teachers are; call "
     ".requires_grad_(True) on your copy) or the student's prediction was computed under torch.no_grad()."),
    (re.compile(r"size of tensor a \(\d+\) must match the size of tensor b \(\d+\) at non-singleton dimension"
                r"|doesn't match the broadcast shape"),
     "A per-sample tensor of shape (B,) (a time t, alpha(t), sigma(t), a weight w) met a (B, D) tensor: use "
     "processes.bcast(t, x) (or t[:, None]) so it broadcasts over the data dimensions."),
]


def advice_for(e: BaseException) -> str:
    """Advice for a raw error a student's code commonly raises ("" when there is none)."""
    text = str(e)
    return " ".join(advice for pattern, advice in ADVICE if pattern.search(text))


def explain_exception(e: BaseException, where: str = "") -> str:
    """The problem to report when the student's function raised `e`: an unsolved stub, or the error, where it
    happened and what it usually means."""
    if isinstance(e, NotImplementedError):
        return "not solved yet (it raises NotImplementedError)."
    raised = traceback.format_exception_only(type(e), e)[-1].strip()
    where = f" {where}" if where else ""
    return f"your function raised {raised}{where}. {advice_for(e)}"


# --- random numbers ---------------------------------------------------------------------------------------------

def fresh_generator(seed: int | None) -> torch.Generator:
    """The generator a checker draws its cases from: `seed` when given (tests), else a fresh seed from the operating
    system's entropy (never from torch's global generator, whose state the notebook owns)."""
    return torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(31))


def draw_seed(g: torch.Generator) -> int:
    """A seed for one network's initialisation (used with config.seeded), drawn from the checker's generator."""
    return int(torch.randint(2**31, (1,), generator=g))


# --- the checkers' toy networks ------------------------------------------------------------------------------------

def tiny_model(process: AffineProcess, g: torch.Generator, parameterization: str = "v",
               init: Callable[[nn.Module], Any] | None = None, **net_kwargs: Any) -> Denoiser:
    """The checkers' toy course model (float64): Denoiser(MLP2D(hidden=16, depth=2, **net_kwargs), process,
    parameterization), or EDMPrecond under the edm process; initialised (and then `init(model)`, e.g. a randomised
    guidance embedding) inside config.seeded(draw_seed(g)), so the notebook's global generator is left alone."""
    with seeded(draw_seed(g)):
        net = MLP2D(hidden=16, depth=2, **net_kwargs)
        model = EDMPrecond(net, process) if isinstance(process, EDM) else Denoiser(net, process, parameterization)
        if init is not None:
            init(model)
    return model.double()


def tiny_discriminator(g: torch.Generator) -> nn.Module:
    """The checkers' toy 2D discriminator x (B, 2) -> (B, 1) (float64; SiLU, so R1 has a gradient), initialised
    inside config.seeded(draw_seed(g))."""
    with seeded(draw_seed(g)):
        return nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1)).double()


# --- comparing with the reference -------------------------------------------------------------------------------

def clone_tensors(obj: Any) -> Any:
    """A copy of obj in which every tensor (also inside tuples, lists, dicts, Pred, a conditioning Cond) is cloned;
    other objects (models, processes, numbers) are shared."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, Cond):
        return dataclasses.replace(obj, **{f.name: clone_tensors(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if isinstance(getattr(obj, f.name), Tensor)})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):          # a NamedTuple such as Pred
        return type(obj)(*(clone_tensors(o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(clone_tensors(o) for o in obj)
    if isinstance(obj, dict):
        return {k: clone_tensors(v) for k, v in obj.items()}
    return obj


def param_grads(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    """d(loss.sum()) / d(each parameter), zeros where the loss does not reach it: where gradients flow (a checker's
    test for a stop-gradient, or for a network that must not be trained)."""
    grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]


def same_grads(got: list[Tensor], want: list[Tensor]) -> bool:
    """Two lists of parameter gradients (param_grads) agree, parameter by parameter (atol 1e-8, rtol 1e-5)."""
    return all(torch.allclose(a, b, atol=1e-8, rtol=1e-5) for a, b in zip(got, want))

def dtype_tol(*tensors: Tensor) -> dict:
    """allclose tolerances fitting the least precise dtype among `tensors`: float64 atol 1e-8, rtol 1e-6; float32 (or
    lower) atol 1e-5, rtol 1e-4, since float32 rounds at ~6e-8 relative per operation and a correct float32 answer can
    differ from the float64 reference by ~1e-6, while the mistakes the checkers name differ by 1e-3 or more."""
    wide = all(x.dtype == torch.float64 for x in tensors)
    return dict(atol=1e-8, rtol=1e-6) if wide else dict(atol=1e-5, rtol=1e-4)


def close(got: Any, want: Tensor, **tol: float) -> bool:
    """The student's `got` (any float dtype) equals the reference `want`: a floating tensor of want's shape, within
    `tol` (atol, rtol) or else the tolerances of the less precise of the two dtypes (dtype_tol)."""
    if not (isinstance(got, Tensor) and got.is_floating_point() and got.shape == want.shape):
        return False
    return torch.allclose(got.detach().to(want.dtype), want.detach(), **(tol or dtype_tol(got, want)))


def named_slip(got: Any, slips: Iterable[tuple[Any, str]], same: Callable[[Any, Any], bool] = close) -> str | None:
    """The explanation of the first plausible mistake that `got` reproduces (same(got, alternative)), else None.
    slips: (alternative, why) pairs; an alternative is a value or a function of no argument computing it (only
    called when reached)."""
    for alt, why in slips:
        if same(got, alt() if callable(alt) else alt):
            return why
    return None


def max_diff(got: Tensor, want: Tensor) -> float:
    """The largest absolute difference between the student's `got` (cast to want's dtype) and the reference."""
    return float((got.detach().to(want.dtype) - want.detach()).abs().max())


def _same_tensors(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Cond):
        return all(_same_tensors(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (tuple, list)):
        return all(_same_tensors(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return all(_same_tensors(a[k], b[k]) for k in a)
    return True


def changed_inputs(student: Callable, args: tuple, before: tuple) -> list[str]:
    """Names of the arguments whose tensors the student's call changed in place (compared with `before`)."""
    try:
        names = list(inspect.signature(student).parameters)
    except (TypeError, ValueError):
        names = []
    names += [f"number {k + 1}" for k in range(len(names), len(args))]
    return [names[k] for k, (a, b) in enumerate(zip(args, before)) if not _same_tensors(a, b)]


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

    The reference runs first, on cloned tensors, so a student function that changes its inputs in place cannot
    corrupt it (and is told that it did). Prints one line of verdict (and, on failure, what differed where) and
    returns the function to use next: the student's, or the library's version marked `.is_library = True`.
    """
    n = 0
    for args, where in cases:
        n += 1
        want = reference(*clone_tensors(args))
        before = clone_tensors(args)
        try:
            got = student(*args)
        except Exception as e:  # unsolved, or the student's code crashed: say why, keep the notebook running
            return fall_back(exercise, reference, explain_exception(e, where))
        changed = changed_inputs(student, args, before)
        if changed:
            return fall_back(exercise, reference,
                             f"your function changed its input {', '.join(changed)} in place {where}; the caller "
                             "still needs it. Work on a copy (x.clone()) or out of place (x = x + ... rather than "
                             "x += ... or x[...] = ...).")
        try:
            got_t, want_t = _as_tensor_tuple(got), _as_tensor_tuple(want)
        except TypeError as e:
            return fall_back(exercise, reference, f"{e} {where}.")
        if len(got_t) != len(want_t):
            return fall_back(exercise, reference, f"returned {len(got_t)} values, expected {len(want_t)} {where}.")
        for k, (g, w) in enumerate(zip(got_t, want_t)):
            what = f"output {k}" if len(want_t) > 1 else "the output"
            if tuple(g.shape) != tuple(w.shape):
                return fall_back(exercise, reference,
                                 f"{what} has shape {tuple(g.shape)}, expected {tuple(w.shape)} {where}.")
            g = g.detach().to(w.dtype)
            if not torch.isfinite(g).all():
                return fall_back(exercise, reference, f"{what} contains inf or nan {where}. {hint}")
            if not torch.allclose(g, w, atol=atol, rtol=rtol):
                err = (g - w).abs().max().item()
                return fall_back(exercise, reference,
                                 f"{what} differs from the reference by up to {err:.3g} {where}. {hint}")
    return accept(exercise, student, f"correct on {n} random cases.")


def first_look(student: Callable, args: tuple, want: Tensor | tuple[Tensor, ...], where: str,
               zeros: str = "") -> str | None:
    """What is plainly wrong with the student's first answer, before any value is compared (None: nothing): it
    raised, it is not a tensor (or not the tuple of tensors `want` is), its shape, an unfilled placeholder (all
    zeros; `zeros` says why zeros cannot be the answer, e.g. "a squared distance is positive here"). The recipe comes
    only with a wrong value."""
    try:
        got = student(*args)
    except Exception as e:  # noqa: BLE001
        return explain_exception(e, where)
    wants = want if isinstance(want, tuple) else (want,)
    gots = tuple(got) if isinstance(want, tuple) and isinstance(got, (tuple, list)) else (got,)
    if len(gots) != len(wants) or not all(isinstance(g, Tensor) for g in gots):
        what = "a tensor" if len(wants) == 1 else f"a tuple of {len(wants)} tensors"
        return f"expected {what}, got {type(got).__name__} {where}."
    shapes, want_shapes = [tuple(g.shape) for g in gots], [tuple(w.shape) for w in wants]
    if shapes != want_shapes:
        if len(wants) == 1:
            return f"the output has shape {shapes[0]}, expected {want_shapes[0]} {where}."
        return f"the outputs have shapes {shapes}, expected {want_shapes} {where}."
    if not any(bool(g.detach().abs().gt(0).any()) for g in gots):
        scale = float(torch.cat([w.detach().double().abs().flatten() for w in wants]).mean())
        return (f"your function returns all zeros {where}: is it still the placeholder? "
                + (zeros.strip() or f"The answer has the shape above and values of order {scale:.2g}."))
    return None


def quiet(fn: Callable, *args, **kwargs):
    """fn's result and what it printed, without printing it: a checker runs every test before its one verdict."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = fn(*args, **kwargs)
    return out, buf.getvalue()
