"""Test-wide environment. Runs before any test module, so before torch is imported anywhere.

The nbval kernels inherit this environment too (they are started by the pytest workers).
"""
import os

os.environ["COURSE_MODE"] = "smoke"  # seconds per notebook; numbers are meaningless
os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network (and offline HF fails fast)
os.environ["MPLBACKEND"] = "Agg"  # no display
os.environ["OMP_NUM_THREADS"] = "1"  # two xdist workers on two cores: more threads slow both ~25x

# tests/fixtures/ holds sample notebooks read by the tests, not notebooks for nbval to run.
collect_ignore_glob = ["fixtures/*"]


# The longest test files first: pytest-xdist (--dist loadfile) hands files to its workers in collection order, so a
# long file collected late runs alone at the end of the suite while the other worker idles.
LONGEST_FIRST = ("test_widgets_browser.py", "test_scale_dmd2.py", "test_bench_flowmap.py", "test_scale_hypersd.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))     # stable: the rest keep their order


def pytest_report_header(config):
    """The versions this run tests, against constraints.txt (the versions the course was last tested with)."""
    from course_lib.versions import summary

    return f"course dependencies: {summary()}"


# --- the tests' tiny models, written once --------------------------------------------------------------------------
# Plain factories (test modules import them: `from conftest import mlp_denoiser`) and module-scoped fixtures. Each
# model is initialised from torch's global generator seeded to `seed`; keep_rng=True restores the caller's global RNG
# afterwards (config.seeded), keep_rng=False leaves it seeded as torch.manual_seed does, for the tests whose later
# draws from the global generator come after the model's.

import contextlib  # noqa: E402  (below the environment: torch must not be imported before it is set)
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _seeded(seed: int, keep_rng: bool):
    from course_lib.config import seeded

    if keep_rng:
        return seeded(seed)
    torch.manual_seed(seed)
    return contextlib.nullcontext()


def mlp_denoiser(proc=None, seed: int = 0, dtype: torch.dtype = torch.float64, *, hidden: int = 16, depth: int = 2,
                 num_classes: int | None = None, kind: str = "v", keep_rng: bool = False):
    """A 2D model: Denoiser(MLP2D(hidden, depth, num_classes), proc (VPCosine by default), kind), or EDMPrecond for
    kind="edm", cast to dtype."""
    from course_lib.models import Denoiser, EDMPrecond, MLP2D
    from course_lib.processes import VPCosine

    proc = proc or VPCosine()
    with _seeded(seed, keep_rng):
        net = MLP2D(hidden=hidden, depth=depth, num_classes=num_classes)
        model = EDMPrecond(net, proc) if kind == "edm" else Denoiser(net, proc, kind)
    return model.to(dtype)


def interrupt_on_call(monkeypatch, owner, name: str, n: int):
    """Replace owner.<name> by a wrapper that raises KeyboardInterrupt (a user's Ctrl-C) on its n-th call and calls
    the real function otherwise; returns the real function (restore it with monkeypatch.setattr(owner, name, real))."""
    real, calls = getattr(owner, name), {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupting)
    return real


def tiny_unet(seed: int = 0, channels: tuple[int, ...] = (16, 32), *, keep_rng: bool = False, **kw):
    """An 8 x 8 course UNet (models.UNet) with the given block channels; kw: in_channels, num_classes, attention,
    norm_num_groups."""
    from course_lib.models import UNet

    with _seeded(seed, keep_rng):
        return UNet(sample_size=8, block_out_channels=channels, **kw)


def save_tiny_sd(folder, seed: int = 0):
    """sd.tiny_sd_pipeline(seed) saved as a diffusers folder (safetensors); returns the folder."""
    from course_lib import sd

    sd.tiny_sd_pipeline(seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder


def save_nudged_mini_sd(folder):
    """Another base model for the adapters' base-model checks: the shipped mini SD with every UNet weight nudged by
    1e-3 N(0, 1) (seed 0), saved as a diffusers folder; returns the folder."""
    from diffusers import StableDiffusionPipeline

    from course_lib import minisd

    pipe = StableDiffusionPipeline.from_pretrained(minisd.MINI_SD, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def class_model():
    """A 3-class 2D eps model (hidden 32), seed 0, in eval mode."""
    from course_lib.processes import VPCosine

    return mlp_denoiser(VPCosine(), 0, torch.float32, hidden=32, num_classes=3, kind="eps").eval()


@pytest.fixture(scope="module")
def tiny_sd():
    """The course's pieces (sd.from_pipeline) of the tiny offline SD pipeline, seed 0."""
    from course_lib import sd

    return sd.from_pipeline(sd.tiny_sd_pipeline(seed=0))


@pytest.fixture(scope="module")
def tiny_sd_w_pipe():
    """The tiny SD pipeline, seed 0, whose UNet takes a guidance-weight embedding (time_cond_proj_dim =
    lcm.W_EMBED_DIM): the LCM and TCD students' architecture."""
    from course_lib import sd
    from course_lib.distill import lcm

    return sd.tiny_sd_pipeline(seed=0, time_cond_proj_dim=lcm.W_EMBED_DIM)


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    """The tiny SD pipeline, seed 0, saved as a diffusers folder (every loader reads it offline)."""
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


# --- the exercises' two sides, in the paired notebooks (course_lib.exercises.paired_version) ------------------------
# `make test` runs each notebook once, paired: every exercise cell preceded by its solution's cell (tagged
# 'solution-copy'). After nbval runs a cell, its printed verdicts are checked: the solution's cell must be ACCEPTED by
# the exercise's checker and the student's stub must fall back to the library's version (its verdict line names the
# exercise; the first verdict ending after it decides).

STUB_RE = re.compile(r'raise NotImplementedError\("Exercise ([^:"]+)')


def _verdict_problem(item) -> str | None:
    """Why nbval cell `item` printed the wrong verdict for its exercises (None when right, or not an exercise)."""
    from course_lib.checks.core import ACCEPTED, FALLBACK
    from course_lib.exercises import SOLUTION_COPY, replace_solution_regions

    cell = getattr(item, "cell", None)
    if cell is None or item.path.suffix != ".ipynb":
        return None
    if SOLUTION_COPY in cell.get("metadata", {}).get("tags", []):
        wanted, side = [e.number for e in replace_solution_regions(cell.source)[1]], "solution"
    else:
        wanted, side = STUB_RE.findall(cell.source), "student's stub"
    if not wanted:
        return None
    text = "".join(o.get("text", "") for o in item.test_outputs or [] if o.get("output_type") == "stream")
    expect, other = (ACCEPTED, FALLBACK) if side == "solution" else (FALLBACK, ACCEPTED)
    for number in wanted:
        said = text.find(f"Exercise {number}:")
        verdict = re.search(re.escape(expect) + "|" + re.escape(other), text[said:]) if said >= 0 else None
        if verdict is None or verdict.group(0) != expect:
            return (f"exercise {number}: the {side} should end with {expect!r}, but the cell printed:\n"
                    f"{text[-3000:] or '(nothing)'}")
    return None


class ExerciseVerdicts:
    """A plugin registered for the whole session: a conftest's own hooks reach only the items below its folder, and
    the paired notebooks lie outside tests/."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        result = yield
        problem = _verdict_problem(item)
        if problem:
            raise AssertionError(problem)
        return result


def pytest_configure(config):
    config.pluginmanager.register(ExerciseVerdicts(), "exercise-verdicts")
