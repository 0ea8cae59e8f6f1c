"""bench flowmap and recipes.flowmap: the benchmark's rows and verdicts, its error grid in common units across
processes, each student's sampler at its step counts, an interrupted sCM run, and the shipped 2D students.

Truth: the exact flow map of the mixture (a flow map's jumps compose: 1, 2 or 4 of them land where one long solve
does; DDIM of the exact denoiser is the same map in vp-cosine and rf at the same log-SNR), the benchmark's own untrained
starts, the students' recorded quality re-measured.
"""
from __future__ import annotations

import json

import pytest
import torch

from bench_scores import beats, swd, untrained_swd
from conftest import interrupt_on_call
from course_lib import bench
from course_lib.bench import flowmap as bf
from course_lib.bench.core import prior
from course_lib.data2d import exact_denoiser
from course_lib.distill import flowmap as fm
from course_lib.grids import uniform
from course_lib.processes import RectifiedFlow, VPCosine
from course_lib.recipes import flowmap as recipes
from course_lib.samplers import flow_map

RF, VP = RectifiedFlow(), VPCosine()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("flowmap") / "flowmap.json"
    res = bench.main(["flowmap", "--mode", "smoke", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["schema"] == 3
    return res


def test_flowmap_benchmark_rows(result, capsys):
    rows = result["rows"]
    b = recipes.budget("smoke")
    assert all(r["schema"] == 3 and r["n_seeds"] >= 3 and r["std"] >= 0 for r in rows)
    for ds, extra, metrics in (("gmm", {"cd", "pd"}, {"swd", "precision", "recall"}),
                               ("checkerboard", set(), {"swd", "in_squares"})):
        mine = [r for r in rows if r["dataset"] == ds]
        assert {r["model"] for r in mine} == {"data", "teacher", *recipes.METHODS} | extra
        for m in recipes.METHODS:
            got = [r for r in mine if r["model"] == m and r["metric"] != bf.GRID_METRIC]
            assert {r["steps"] for r in got} == set(recipes.STEPS) and all(r["nfe"] == r["steps"] for r in got)
            assert {r["metric"] for r in got} == metrics
            # training cost: updates (sCD's with its re-embedding), seconds, teacher evaluations (a batch of 256 per
            # update for the distillations)
            updates = b["steps"] + (b["reembed"] if m == "scd" else 0)
            assert all(r["train_updates"] == updates and r["train_seconds"] > 0 for r in got)
            evals = updates * 256 if m in ("meanflow-distill", "scd") else 0
            assert all(r["teacher_evals"] == evals for r in got), m
    # the gmm error grid: every student, CD and PD, K x K cells over rf times 1 ... 0, finite exactly where s < t;
    # the row's value per seed is the mean over those cells
    grid = {r["model"]: r for r in rows if r["metric"] == bf.GRID_METRIC}
    assert set(grid) == {*recipes.METHODS, "cd", "pd"} and all(r["dataset"] == "gmm" for r in grid.values())
    k = b["grid_k"]
    for m, r in grid.items():
        cells = torch.tensor([[float("nan") if v is None else v for v in line] for line in r["grid"]])
        assert r["grid_ts"] == [1.0, 0.5, 0.0] and cells.shape == (k, k)
        assert torch.equal(~torch.isnan(cells), torch.triu(torch.ones(k, k, dtype=torch.bool), 1))
        assert (cells[~torch.isnan(cells)] > 0).all()
        assert abs(r["value"] - float(cells.nan_to_num(0).sum() / (k * (k - 1) / 2))) < 1e-3 + 2 * r["std"]
        assert r["err_s_min"] == pytest.approx(float(cells[:-1, -1].mean()), abs=1e-4)
    # trained students beat their untrained starts (the same noise, the benchmark's scoring). Smoke (40 updates, no
    # EMA), measured at most: meanflow-distill gmm 1 step 0.72 and 4 steps 0.71, scd gmm 2 steps 0.40, sct gmm 1 step
    # 0.74, sct checkerboard 1 step 0.54 of the start (shortcut models, and MeanFlow from scratch with its (t, r) of
    # recipes.MF_TIME_2D, need more than 40 updates)
    for ds, m, k_, ratio in (("gmm", "meanflow-distill", 1, 0.8), ("gmm", "meanflow-distill", 4, 0.8),
                             ("gmm", "scd", 2, 0.6), ("gmm", "sct", 1, 0.85), ("checkerboard", "sct", 1, 0.7)):
        st = recipes.start(m, ds, 0)
        n = next(r["n"] for r in rows if r["dataset"] == ds and r["model"] == m)
        start = untrained_swd(ds, n, lambda s: recipes.sample(st, m, prior(st.process, (n, 2), s + 3, "cpu"), k_,
                                                              s + 4))
        beats(swd(rows, ds, m, k_), start, ratio, f"{m} {ds} {k_} steps")
    # the printed summary gives each target a verdict with its numbers
    text = bf.summary(rows)
    verdicts = [line for line in text.splitlines() if line.startswith(("holds:", "does NOT hold:"))]
    assert len(verdicts) == 6 + len(recipes.METHODS)
    assert any("meanflow 1 step SWD <= 1.3x" in v for v in verdicts)
    assert any("scd 2 step SWD <= 1.1x" in v for v in verdicts)


def test_the_error_grid_compares_processes_at_the_same_noise_level_and_in_the_same_units():
    """DDIM of the exact denoiser is one map read in any affine process at the same log-SNR (a change of
    coordinates): bench flowmap's grid error of it in vp-cosine (at the matching vp times, in rf units) equals its
    error in rf. The exact flow map itself has no error in either."""
    ts = bf.grid_times(4)
    assert torch.allclose(bf.vp_times(ts, VP)[[0, -1]], torch.tensor([1.0, 0.0], dtype=torch.float64))
    rf = bf.grid_error(exact_denoiser("gmm", RF), "gmm", ts, 200, 0, 32)
    vp = bf.grid_error(exact_denoiser("gmm", VP), "gmm", ts, 200, 0, 32)
    later = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
    assert (rf[later] > 1e-2).all()
    torch.testing.assert_close(vp[later], rf[later], rtol=2e-3, atol=1e-4)
    exact = bf.grid_error(fm.ExactFlowMap("gmm", VP, n=32), "gmm", ts, 50, 0, 32)
    assert (exact[later] < 1e-6).all()


@pytest.mark.parametrize("method", recipes.METHODS)
def test_each_student_samples_with_one_network_call_per_step(method):
    """recipes.sample at 1, 2 and 4 steps calls the student once a step (nfe = steps) and returns finite samples."""
    student = recipes.start(method, "gmm", 0)
    calls = []
    student.register_forward_hook(lambda *_: calls.append(1))
    x1 = prior(student.process, (64, 2), 0, "cpu")
    for k in recipes.STEPS:
        calls.clear()
        x = recipes.sample(student, method, x1, k, 1)
        assert len(calls) == k and x.shape == (64, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize("process", [RF, VP], ids=["rf", "vp-cosine"])
def test_the_flow_map_sampler_lands_on_the_exact_ode_solution_at_every_step_count(process):
    """The exact flow map's jumps compose: 1, 2 and 4 steps of samplers.flow_map from the same noise all land on one
    exact ODE solve from t = 1 to 0."""
    x1 = process.prior((32, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    target = fm.exact_flow_map("gmm", process, x1, 1.0, 0.0, n=256)
    model = fm.ExactFlowMap("gmm", process, n=256)
    for k in recipes.STEPS:
        torch.testing.assert_close(flow_map(model, x1, uniform(k).double(), process), target, rtol=0, atol=2e-3)


def test_an_interrupted_scd_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """Ctrl-C in the middle of an sCD run (teacher, tangent warm-up that follows the update count, EMA) saves a
    checkpoint; rerunning the same call finishes with exactly the weights of an uninterrupted run."""
    import copy

    from course_lib import data2d
    from course_lib.config import seeded
    from course_lib.models import Denoiser, MLP2D
    from course_lib.train import TrainConfig

    with seeded(3):
        teacher = Denoiser(MLP2D(hidden=16, depth=2, time_scale=0.01), VP, "v")

    def run(folder):
        tc = TrainConfig(steps=12, batch_size=32, seed=0, ckpt_every=4)
        cfg = fm.SCMConfig(lr=1e-3, ema_decay=0.9, tangent_warmup=8, time_mean=fm.SCD_TIME[0],
                           time_std=fm.SCD_TIME[1])
        return fm.train_scm(copy.deepcopy(teacher), data2d.batches("gmm"), cfg, run=tc, teacher=teacher,
                            ckpt_dir=folder, progress=False)

    ref, _ = run(tmp_path / "ref")
    real = interrupt_on_call(monkeypatch, fm, "scm_loss", 7)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "int")
    monkeypatch.setattr(fm, "scm_loss", real)
    student, done = run(tmp_path / "int")
    assert done.updates["student"] == 12
    for (k, p), q in zip(ref.state_dict().items(), student.state_dict().values()):
        assert torch.equal(p, q), k


@pytest.mark.parametrize("dataset", recipes.DATASETS)
@pytest.mark.parametrize("method", recipes.METHODS)
def test_the_shipped_students_load_sample_and_score_what_their_json_says(dataset, method):
    """data/flowmap/<dataset>-<method>: the student loads (eval, no grad, its process and flow-map flag), records its
    quality at 1, 2 and 4 steps, and re-measured at one step with the benchmark's seeds scores exactly that."""
    from course_lib.models import is_flow_map

    student, info = recipes.load_shipped(dataset, method)
    assert info["dataset"] == dataset and info["method"] == method and info["updates"] > 0
    assert not any(p.requires_grad for p in student.parameters()) and not student.training
    assert is_flow_map(student) == (method not in ("scd", "sct"))
    assert isinstance(student.process, VPCosine if method in ("scd", "sct") else RectifiedFlow)
    assert set(info["quality"]) == {f"{k} steps" for k in recipes.STEPS}
    got = recipes.evaluate(student, method, dataset, steps=(1,))
    for m, (mean, std) in info["quality"]["1 steps"].items():
        assert got["1 steps"][m] == pytest.approx([mean, std], abs=2e-4), m


def test_flowmap_benchmark_digits_rows(result):
    """bench flowmap's digits rows (bench.flowmap_digits.digits_rows) in smoke mode: schema-3 rows of every flow-map student at 1 and 2 steps
    (kid_heldout with se, class_acc, training cost), the 16-step teacher's, and CD's and PD's students beside them
    (PD's smoke run distils 2 -> 1 step only)."""
    from course_lib.bench.flowmap_digits import verdict
    from course_lib.recipes.flowmap_digits import MODELS

    rows, meta = [r for r in result["rows"] if r["dataset"] == "digits"], result["meta"]["digits"]
    kid = {(r["model"], r["steps"]): r for r in rows if r["metric"] == "kid_heldout"}
    for name in MODELS:
        for k in (1, 2):
            r = kid[(name, k)]
            assert r["schema"] == 3 and r["n_seeds"] == 3 and r["se"] > 0 and r["nfe"] == k
            assert r["train_updates"] == meta["flowmap_digits_budget"]["steps"] and "train_seconds" in r
            assert r["teacher_evals"] == (r["train_updates"] * meta["flowmap_digits_budget"]["batch"]
                                          if name in ("meanflow-distill", "scd") else 0)
        assert any(r["model"] == name and r["metric"] == "class_acc" for r in rows)
    for key in (("teacher", 16), ("cd", 1), ("cd", 2), ("pd", 1), ("data", None)):    # smoke PD: 2 -> 1 step
        assert key in kid, key
    assert not any(r["model"] in ("cd", "pd") and r["steps"] not in (1, 2) for r in rows)
    assert "spread" in verdict(rows)


def test_flowmap_benchmark_mini_sd_rows(result):
    """The mini-SD rows (bench.flowmap_minisd; smoke: a few recipe updates on the tiny SD): the guided teacher, the
    data floor and the MeanFlow flow-map LoRA at 1, 2, 4 steps with one UNet call per step, on the mini SD's metrics."""
    from course_lib.bench import flowmap_minisd as bsd

    rows = [r for r in result["rows"] if r["dataset"] == "mini-sd"]
    assert {r["model"] for r in rows} == {"teacher", "data", bsd.MODEL}
    mine = [r for r in rows if r["model"] == bsd.MODEL]
    assert {r["steps"] for r in mine} == set(bsd.STEPS) and all(r["nfe"] == r["steps"] for r in mine)
    assert {"adherence", "colour_adherence", "kid_heldout"} <= {r["metric"] for r in mine}
    assert all(r["nfe"] == 50 for r in rows if r["model"] == "teacher")
    assert result["meta"]["minisd"]["sd_student"].startswith("tiny random SD")


def test_scd_starts_from_the_teacher_re_embedded_in_10t():
    """recipes.reembed: a fresh network whose time input is 10 t (not the teacher's 1000 t), regressed onto the
    teacher's TrigFlow velocity, ends close to it on fresh points where the fresh network was far; the teacher is
    untouched. Measured (100 updates): the mean squared gap falls to 0.16 of its start."""
    from course_lib.data2d import batches, sample_2d
    from course_lib.teachers import load_teacher

    teacher = load_teacher("gmm-vp")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = recipes.start("scd", "gmm", 0)
    assert student.net.time_scale == recipes.TIME_SCALE and student.process.name == teacher.process.name
    g = torch.Generator().manual_seed(11)
    x0, t = sample_2d("gmm", 2000, g)[0], torch.rand(2000, generator=g).clamp_min(1e-3)
    x_t = teacher.process.marginal(x0, t, torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        F_teacher = fm.trigflow_velocity(teacher, x_t, t)
    gap = lambda m: float((fm.trigflow_velocity(m, x_t, t).detach() - F_teacher).pow(2).mean())
    start = gap(student)
    end = gap(recipes.reembed(student, teacher, batches("gmm"), 100, seed=0))
    assert end < 0.3 * start, (start, end)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
