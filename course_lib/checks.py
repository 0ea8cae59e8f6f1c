"""Exercise checkers. Each tests a student's function on fresh random inputs against the library's reference
and explains a failure in plain words. Every checker returns the function later cells should use: the
student's when it is right, otherwise the library's (and it says so), so a notebook always runs to the end.

    ddim_step = checks.check_ddim_step(ddim_step)
"""
from __future__ import annotations

import traceback
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .predictions import Pred, to_pred
from .processes import RectifiedFlow, SDDiscrete, VPCosine, AffineProcess
from .samplers import ddim_step as _ref_ddim_step


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
    fallback = f"Later cells use course_lib's reference implementation instead."
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


def _fresh_generator(seed: int | None) -> torch.Generator:
    """The generator a checker draws its cases from: `seed` when given (tests), else fresh randomness each call."""
    return torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)


def _processes() -> list[AffineProcess]:
    return [VPCosine(), RectifiedFlow(), SDDiscrete()]


def check_v_to_pred(student: Callable[[Tensor, Tensor, Tensor, AffineProcess], Pred], seed: int | None = None
                    ) -> Callable:
    """Exercise 0.1: student(v, x, t, process) -> Pred(x0, eps) for a v-prediction network."""
    g = _fresh_generator(seed)

    def reference(v, x, t, process):
        return to_pred(v, x, t, process, "v")

    def cases():
        for process in _processes():
            for _ in range(3):
                B = 5
                t = 0.05 + 0.9 * torch.rand(B, generator=g, dtype=torch.float64)
                x = torch.randn(B, 2, generator=g, dtype=torch.float64)
                v = torch.randn(B, 2, generator=g, dtype=torch.float64)
                yield (v, x, t, process), f"for the {process.name} process at t = {t[0].item():.2f}"

    return run_check("0.1", student, reference, cases(), atol=1e-8, rtol=1e-6,
                     hint="Check: x = alpha x0 + sigma eps and v = alpha eps - sigma x0; solve these two for x0 and eps.")


def check_ddim_step(student: Callable[[Pred, Tensor, Tensor, AffineProcess], Tensor], seed: int | None = None
                    ) -> Callable:
    """Exercise 0.2: student(pred, t, s, process) -> x_s, one deterministic DDIM step from t to s < t."""
    g = _fresh_generator(seed)

    def cases():
        for process in _processes():
            for s_zero in (False, True):
                B = 6
                t = 0.2 + 0.8 * torch.rand(B, generator=g, dtype=torch.float64)
                s = torch.zeros(B, dtype=torch.float64) if s_zero else t * torch.rand(B, generator=g, dtype=torch.float64)
                pred = Pred(torch.randn(B, 2, generator=g, dtype=torch.float64),
                            torch.randn(B, 2, generator=g, dtype=torch.float64))
                yield (pred, t, s, process), (f"for the {process.name} process stepping from t = {t[0].item():.2f} "
                                              f"to s = {s[0].item():.2f}")

    return run_check("0.2", student, _ref_ddim_step, cases(), atol=1e-8, rtol=1e-6,
                     hint="DDIM re-noises the predicted x0 with the predicted eps at the new time: "
                          "x_s = alpha(s) x0 + sigma(s) eps. Mind the shapes: t and s are (B,), x0 is (B, D).")


def check_sliced_wasserstein(student: Callable[[Tensor, Tensor, Tensor], Tensor | float], seed: int | None = None
                             ) -> Callable:
    """Exercise 0.3: student(x, y, directions) -> SW_2 between point sets x, y (N, D) along unit directions (K, D)."""
    from .metrics import sliced_wasserstein

    g = _fresh_generator(seed)

    def reference(x, y, directions):
        return torch.tensor(sliced_wasserstein(x, y, directions=directions), dtype=torch.float64)

    def student_scalar(x, y, directions):
        out = student(x, y, directions)
        return torch.as_tensor(out, dtype=torch.float64).reshape(())

    def cases():
        for n, k, shift in ((50, 8, 0.0), (200, 32, 1.0), (500, 64, 2.5)):
            x = torch.randn(n, 2, generator=g, dtype=torch.float64)
            y = torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.7 + shift
            d = torch.randn(k, 2, generator=g, dtype=torch.float64)
            d = d / d.norm(dim=1, keepdim=True)
            yield (x, y, d), f"for {n} points and {k} directions (shift {shift})"

    use = run_check("0.3", student_scalar, reference, cases(), atol=1e-6, rtol=1e-5,
                    hint="Project both sets on each direction, sort each projection, average the squared "
                         "differences over points and directions, then take the square root.")
    return student if use is student_scalar else (lambda x, y, directions: float(reference(x, y, directions)))


def _pd_cases(g: torch.Generator, with_student: bool = False):
    from .data2d import exact_denoiser, sample_2d
    from .models import Denoiser, MLP2D

    proc = VPCosine()
    teacher = exact_denoiser("gmm", proc)
    for N in (1, 2, 4, 8):
        B = 4 * N
        i = torch.arange(N).repeat(4)                         # every grid position, the last step (i = 0) included
        t = ((i + 1) / N).double()
        x0 = sample_2d("gmm", B, g)[0].double()
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        if with_student:
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
            student = Denoiser(MLP2D(hidden=16, depth=2), proc, "v").double()
            yield (student, teacher, x0, t, eps, N, proc), f"for N = {N} student steps"
        else:
            yield (teacher, proc.marginal(x0, t, eps), t, N, proc), f"for N = {N} student steps"


def check_pd_target(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 1.1: student(teacher, z_t, t, N, process) -> x_tilde (B, D), the progressive-distillation target."""
    from .distill.pd import pd_target

    g = _fresh_generator(seed)
    return run_check("1.1", student, pd_target, _pd_cases(g), atol=1e-6, rtol=1e-5,
                     hint="Take two teacher DDIM steps t -> t - 1/(2N) -> t - 1/N, then solve the one-step DDIM "
                          "equation for the x-prediction that lands on the same point; where t - 1/N = 0 the target "
                          "is the teacher's x-prediction at t - 1/(2N).")


def check_pd_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 1.2: student(student_model, teacher, x0, t, eps, N, process) -> per-sample loss (B,)."""
    from .distill.pd import pd_loss_at

    g = _fresh_generator(seed)
    return run_check("1.2", student, pd_loss_at, _pd_cases(g, with_student=True), atol=1e-6, rtol=1e-5,
                     hint="Noise x0 to z_t, compute the target with pd_target, compare with the student's x0 "
                          "prediction, weight each sample by max(alpha^2/sigma^2, 1) and average over dimensions.")


def check_pd_round(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 1.3: student(teacher, N, sample_data, cfg) -> a trained N-step student (one PD round).

    A round cannot be compared output by output (training is random), so this checks what a round must do, on
    the shipped Gaussian-mixture teacher with a short budget: the teacher is left untouched, the student is a
    new model, and the student's N-step DDIM lands closer to the teacher's 2N-step DDIM (from the same noise)
    than the teacher's own N-step DDIM does, by at least a factor 2 (a correct round gets about 10x here).
    """
    import copy

    from .data2d import sample_2d
    from .distill.pd import distill_round
    from .grids import uniform
    from .metrics import flow_map_error
    from .samplers import ddim
    from .teachers import load_teacher
    from .train import TrainConfig

    def reference(teacher, N, sample_data, cfg):
        return distill_round(teacher, N, sample_data, cfg, progress=False).best.eval().requires_grad_(False)

    fallback = "Later cells use course_lib's reference implementation instead."
    g = _fresh_generator(seed)
    teacher = load_teacher("gmm-vp")
    before = copy.deepcopy(teacher.state_dict())
    N, cfg = 2, TrainConfig(steps=150, batch_size=256, lr=2e-4, lr_schedule="linear", ema_decay=0.0,
                            seed=int(torch.randint(2**31, (1,), generator=g)), desc="check 1.3")
    try:
        out = student(teacher, N, lambda n, gen: sample_2d("gmm", n, gen)[0], cfg)
    except NotImplementedError:
        print(f"Exercise 1.3: not solved yet (it raises NotImplementedError). {fallback}")
        return reference
    except Exception as e:
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        print(f"Exercise 1.3: your function raised {tb}. {fallback}")
        return reference
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        print(f"Exercise 1.3: the round changed the teacher's weights ({changed[0]}, ...): train a copy "
              f"(copy.deepcopy) and keep the teacher frozen. {fallback}")
        teacher.load_state_dict(before)
        return reference
    if out is teacher or not callable(out):
        print(f"Exercise 1.3: return the trained student, a new model (got {type(out).__name__}). {fallback}")
        return reference
    x1 = teacher.process.prior((2000, 2), generator=g)
    with torch.no_grad():
        target = ddim(teacher, x1, uniform(2 * N), teacher.process)
        err_teacher = flow_map_error(ddim(teacher, x1, uniform(N), teacher.process), target)
        err_student = flow_map_error(ddim(out, x1, uniform(N), teacher.process), target)
    if not err_student < 0.5 * err_teacher:
        print(f"Exercise 1.3: after the round, the student's {N}-step DDIM is {err_student:.3f} (RMS) from the "
              f"teacher's {2 * N}-step DDIM; the teacher's own {N} steps are {err_teacher:.3f} away, so the student "
              "did not learn to replace two teacher steps by one. Check that the loss draws t = (i + 1)/N with "
              "i ~ U{0..N-1}, uses the frozen teacher for the target and trains the copy. " + fallback)
        return reference
    print(f"Exercise 1.3: correct: the student's {N} steps land {err_teacher / err_student:.0f}x closer to the "
          f"teacher's {2 * N} steps than the teacher's own {N} steps do. Later cells use your function.")
    return student


def _guided_cases(g: torch.Generator, with_student: bool = False):
    """Exact Gaussian-mixture teacher (overlapping classes) and, for the loss, a tiny guided MLP whose guidance
    embedding is randomised (a fresh student ignores w, which would hide a w passed wrongly)."""
    from .data2d import exact_denoiser, get_mixture, sample_2d
    from .models import Denoiser, MLP2D

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
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
            student = Denoiser(MLP2D(hidden=16, depth=2, num_classes=null, guidance_range=(0.0, 4.0)), proc, "v")
            torch.nn.init.normal_(student.net.guidance_emb.mlp[2].weight, std=0.5)
            yield (student.double(), teacher, x0, y, t, eps, w, null, proc), where
        else:
            yield (teacher, proc.marginal(x0, t, eps), t, y, w, null), where


def check_guided_target(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 2.1: student(teacher, z_t, t, y, w, null_label) -> x0_w (B, D), the guided teacher's x-prediction."""
    from .distill.guided import guided_target

    g = _fresh_generator(seed)
    return run_check("2.1", student, guided_target, _guided_cases(g), atol=1e-6, rtol=1e-5,
                     hint="The course's convention is x0_w = (1 + w) x0(z_t | y) - w x0(z_t | null), with w of shape "
                          "(B,) (reshape it to (B, 1) to broadcast); w = 0 is the plain conditional teacher. Imagen's "
                          "x0_u + w (x0_c - x0_u) is the same formula with w shifted by one.")


def check_guided_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 2.2: student(student_model, teacher, x0, y, t, eps, w, null_label, process) -> stage-1 loss (B,)."""
    from .distill.guided import guided_loss_at

    g = _fresh_generator(seed)
    return run_check("2.2", student, guided_loss_at, _guided_cases(g, with_student=True), atol=1e-6, rtol=1e-5,
                     hint="Noise x0 to z_t, compute x0_w with guided_target, call the student with the same labels "
                          "AND the same w (student(z_t, t, y, w)), weight each sample by max(alpha^2/sigma^2, 1) and "
                          "average the squared error over dimensions.")


def check_guided_batches(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 2.3: student(sample_data, w_range) -> sample_batch(n, g) returning (x0, {"y": y, "w": w}), with
    one w ~ U[w_min, w_max] per sample. Checked by its properties (any order of random draws is fine)."""
    from .data2d import sample_2d
    from .distill.guided import guided_batches

    g = _fresh_generator(seed)
    sample_data = lambda n, gen: sample_2d("gmm-overlap", n, gen)
    fallback = "Later cells use course_lib's reference implementation instead."
    problem = None
    try:
        for w_range in ((0.0, 4.0), (1.0, 2.0)):
            n = 4000
            out = student(sample_data, w_range)(n, torch.Generator().manual_seed(int(torch.randint(2**31, (1,),
                                                                                                   generator=g))))
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
                problem = "sample_batch must return a pair (x0, {'y': y, 'w': w})"
                break
            x0, cond = out
            if set(cond) != {"y", "w"}:
                problem = f"the conditioning dict must have the keys 'y' and 'w' (the model's inputs); got {sorted(cond)}"
                break
            w = torch.as_tensor(cond["w"])
            if x0.shape != (n, 2) or cond["y"].shape != (n,) or w.shape != (n,):
                problem = (f"for n = {n}: x0 must be ({n}, 2), y and w ({n},); got {tuple(x0.shape)}, "
                           f"{tuple(cond['y'].shape)}, {tuple(w.shape)}. Draw one w per sample.")
                break
            lo, hi = w_range
            if w.min() < lo or w.max() > hi:
                problem = f"w must lie in [{lo:g}, {hi:g}]; got values from {float(w.min()):.3g} to {float(w.max()):.3g}"
                break
            mean, spread = float(w.mean()), float(w.std())
            if abs(mean - (lo + hi) / 2) > 0.05 * (hi - lo) or abs(spread - (hi - lo) / 12**0.5) > 0.05 * (hi - lo):
                problem = (f"w should be uniform on [{lo:g}, {hi:g}] (mean {(lo + hi) / 2:g}, std "
                           f"{(hi - lo) / 12**0.5:.3g}); got mean {mean:.3g}, std {spread:.3g}")
                break
    except NotImplementedError:
        print(f"Exercise 2.3: not solved yet (it raises NotImplementedError). {fallback}")
        return guided_batches
    except Exception as e:
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        print(f"Exercise 2.3: your function raised {tb}. {fallback}")
        return guided_batches
    if problem:
        print(f"Exercise 2.3: {problem}. {fallback}")
        return guided_batches
    print("Exercise 2.3: correct (shapes, keys and a uniform w per sample in two ranges). Later cells use your function.")
    return student


def _rf_models(g: torch.Generator):
    """Flows to check reflow exercises on: two tiny random velocity MLPs and the exact Gaussian-mixture flow."""
    from .data2d import exact_denoiser
    from .models import Denoiser, MLP2D

    for k in range(2):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
        yield Denoiser(MLP2D(hidden=16, depth=2), RectifiedFlow(), "velocity").double(), f"a random velocity MLP ({k + 1})"
    yield exact_denoiser("gmm", RectifiedFlow()), "the exact Gaussian-mixture flow"


def check_rf_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 3.1: student(model, x0, eps, t) -> per-sample rectified-flow loss (B,)."""
    from .distill.reflow import rf_loss_at

    g = _fresh_generator(seed)

    def cases():
        for model, name in _rf_models(g):
            B = 7
            x0 = 2 * torch.randn(B, 2, generator=g, dtype=torch.float64)
            eps = torch.randn(B, 2, generator=g, dtype=torch.float64)
            t = 0.02 + 0.96 * torch.rand(B, generator=g, dtype=torch.float64)
            yield (model, x0, eps, t), f"for {name}"

    return run_check("3.1", student, lambda m, x0, eps, t: rf_loss_at(m, x0, eps, t), cases(), atol=1e-8, rtol=1e-6,
                     hint="x_t = (1 - t) x0 + t eps (reshape t to (B, 1)); the target velocity is eps - x0; the "
                          "model's velocity is pred.eps - pred.x0 (or predictions.velocity(pred, t, process)); "
                          "average the squared error over the data dimensions, one value per sample.")


def check_make_pairs(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 3.2: student(flow, eps, steps) -> (eps, x0), x0 the Euler solution from t = 1 to 0 in `steps`
    equal steps."""
    from .distill.reflow import generate_pairs

    g = _fresh_generator(seed)

    def cases():
        for (model, name), steps in zip(_rf_models(g), (1, 3, 8)):
            eps = torch.randn(9, 2, generator=g, dtype=torch.float64)
            yield (model, eps, steps), f"for {name} with {steps} Euler step{'s' * (steps > 1)}"

    return run_check("3.2", student, lambda m, eps, steps: generate_pairs(m, eps, steps, "euler", RectifiedFlow()),
                     cases(), atol=1e-7, rtol=1e-6,
                     hint="Start at x = eps, t = 1; for each of the steps: x <- x + (s - t) u(x, t) with s = t - 1/steps "
                          "and u = pred.eps - pred.x0; return the pair (eps, x) with eps unchanged.")


def check_straightness(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 3.3: student(path, ts) -> S(Z) (a float) of trajectories path (n+1, B, D) at decreasing times ts."""
    from .metrics import straightness

    g = _fresh_generator(seed)

    def reference(path, ts):
        return torch.tensor(straightness(path, ts), dtype=torch.float64)

    def student_scalar(path, ts):
        return torch.as_tensor(student(path, ts), dtype=torch.float64).reshape(())

    def cases():
        for n, B, uneven in ((1, 5, False), (4, 20, False), (16, 50, True)):
            ts = torch.linspace(1, 0, n + 1, dtype=torch.float64)
            if uneven:
                ts = ts**2
            path = torch.randn(n + 1, B, 2, generator=g, dtype=torch.float64).cumsum(0)
            yield (path, ts), f"for {B} paths of {n} segment{'s' * (n > 1)}{' on an uneven time grid' if uneven else ''}"

    use = run_check("3.3", student_scalar, reference, cases(), atol=1e-8, rtol=1e-6,
                    hint="Per segment the velocity is (Z_{i+1} - Z_i) / (t_{i+1} - t_i); the straight-line velocity is "
                         "(Z_n - Z_0) / (t_n - t_0). Sum the squared difference over dimensions, average over paths, "
                         "weight each segment by its duration |t_{i+1} - t_i| (the grid may be uneven), divide by the "
                         "total duration.")
    return student if use is student_scalar else (lambda path, ts: float(reference(path, ts)))


def _cond_flows(g: torch.Generator):
    """Conditional velocity MLPs (3 classes + the null label) to check InstaFlow exercises on."""
    from .models import Denoiser, MLP2D

    for k in range(2):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
        yield (Denoiser(MLP2D(hidden=16, depth=2, num_classes=3), RectifiedFlow(), "velocity").double(),
               f"a random conditional velocity MLP ({k + 1})")


def check_guided_velocity(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 4.1: student(flow, x, t, y, w, null_label) -> (B, D) the guided velocity
    (1 + w) u(x, t | y) - w u(x, t | null)."""
    from .distill.instaflow import guided

    g = _fresh_generator(seed)

    def reference(flow, x, t, y, w, null_label):
        pred = guided(flow, w)(x, t, y)
        return pred.eps - pred.x0

    def cases():
        for (flow, name), w in zip(_cond_flows(g), (0.0, 1.5)):
            x = torch.randn(6, 2, generator=g, dtype=torch.float64)
            t = torch.rand(6, generator=g, dtype=torch.float64)
            y = torch.randint(3, (6,), generator=g)
            yield (flow, x, t, y, w, 3), f"for {name} at w = {w}"

    return run_check("4.1", student, reference, cases(), atol=1e-8, rtol=1e-6,
                     hint="Evaluate the flow twice, with the labels y and with the null label everywhere "
                          "(torch.full_like(y, null_label)); each velocity is pred.eps - pred.x0; mix them as "
                          "(1 + w) u_cond - w u_uncond (w = 0 is the plain conditional velocity).")


def check_onestep_loss(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 4.2: student(model, eps, x0, y) -> per-sample L2 one-step distillation loss (B,)."""
    from .distill.instaflow import onestep_loss

    g = _fresh_generator(seed)

    def cases():
        for flow, name in _cond_flows(g):
            eps = torch.randn(7, 2, generator=g, dtype=torch.float64)
            x0 = 2 * torch.randn(7, 2, generator=g, dtype=torch.float64)
            y = torch.randint(3, (7,), generator=g)
            yield (flow, eps, x0, y), f"for {name}"

    return run_check("4.2", student, lambda m, eps, x0, y: onestep_loss(m, eps, x0, y), cases(), atol=1e-8, rtol=1e-6,
                     hint="One Euler step from t = 1 to 0: x0_hat = eps - u(eps, 1 | y), with t a (B,) tensor of ones "
                          "and u = pred.eps - pred.x0; return the mean over data dimensions of (x0_hat - x0)^2, one "
                          "value per sample.")


def check_lap1(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 4.3: student(a, b, levels) -> (B,) Laplacian-pyramid L1 distance of image batches (B, C, H, W)."""
    from .distill.instaflow import laplacian_pyramid_l1

    g = _fresh_generator(seed)

    def cases():
        for (B, H), levels in zip(((3, 16), (2, 8), (4, 16)), (3, 2, 1)):
            a = torch.randn(B, 1, H, H, generator=g, dtype=torch.float64)
            b = a + 0.3 * torch.randn(B, 1, H, H, generator=g, dtype=torch.float64)
            yield (a, b, levels), f"for {B} images of {H}x{H} with {levels} level{'s' * (levels > 1)}"

    return run_check("4.3", student, laplacian_pyramid_l1, cases(), atol=1e-8, rtol=1e-6,
                     hint="Per level j = 0..levels-1: low = F.avg_pool2d(x, 2); band = x - F.interpolate(low, "
                          "size=x.shape[-2:], mode='nearest'); add 2**-j * mean |band_a - band_b| per sample; go on "
                          "with x = low. After the loop add 2**-levels * mean |a_low - b_low|.")
