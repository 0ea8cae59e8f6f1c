"""The leaderboard (bench leaderboard): rows read from the methods' saved results with ratios to the right teacher,
shipped students scored here, and the README's table generated from the saved board, never typed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from course_lib.bench import leaderboard as lb
from course_lib.recipes import leaderboard as board_def
from course_lib.bench.core import per_seed

ROOT = Path(__file__).resolve().parents[1]
SAVED = ROOT / "docs" / "results" / "leaderboard_laptop.json"


def _find(rows, method, dataset, nfe, metric):
    hits = [r for r in rows if (r["method"], r["dataset"], r["nfe"], r["metric"]) == (method, dataset, nfe, metric)]
    assert len(hits) == 1, (method, dataset, nfe, metric, len(hits))
    return hits[0]


def test_loaded_rows_carry_their_source_and_the_ratio_to_their_own_files_teacher():
    rows, missing = lb.loaded_rows()
    assert not missing
    cd = _find(rows, "consistency distillation", "gmm", 1, "swd")
    saved = json.loads((ROOT / cd["source"]).read_text())["rows"]
    best = min((r for r in saved if r["dataset"] == "gmm" and r["model"] == "teacher" and r["metric"] == "swd"),
               key=lambda r: r["value"])
    assert cd["origin"] == "loaded" and cd["source"] == "docs/results/bench_cd_laptop.json"
    assert (cd["x_teacher"], cd["x_teacher_std"]) == pytest.approx(per_seed(cd, best), abs=1e-4)
    assert cd["ms_per_sample"] == pytest.approx(1000 * cd["seconds"] / cd["n"], abs=1e-4)
    # a swept setting is pinned to the method's default: TCD's gamma, one row per key
    assert _find(rows, "TCD", "gmm", 4, "swd")["gamma"] == lb.tcd.GAMMA
    # bench reflow has no diffusion-teacher rows: its flows are compared with bench teacher's best (same references)
    assert "x_teacher" in _find(rows, "2-rectified flow", "gmm", 1, "swd")


def test_a_swept_setting_without_a_default_is_refused():
    with pytest.raises(ValueError, match="where"):
        lb.loaded_rows([lb.Entry("consistency", "TCD", "tcd", "tcd")])


def test_a_missing_result_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(lb, "RESULTS", tmp_path)
    rows, missing = lb.loaded_rows()
    assert rows == [] and "docs/results/bench_cd_laptop.json" in missing


def test_the_shipped_students_are_scored_here():
    rows = lb.shipped_rows("smoke", 0, "cpu")
    methods = {r["method"] for r in rows}
    assert methods == {"DMD2 (shipped)", "GDD-I (shipped)"}     # the 2D flow maps are bench flowmap's: loaded
    assert all(r["origin"] == "shipped, evaluated here" and math.isfinite(r["value"]) for r in rows)
    assert {r["nfe"] for r in rows} == {1}
    assert all(r["train_updates"] > 0 for r in rows)


def test_the_flow_maps_are_loaded_from_their_benchmark_on_every_dataset():
    rows, _ = lb.loaded_rows()
    mine = [r for r in rows if r["family"] == "flow map"]
    assert {r["dataset"] for r in mine} == {"gmm", "checkerboard", "digits", "mini-sd"}
    assert {r["method"] for r in mine} == set(board_def.FLOWMAP_NAMES.values())
    assert {r["nfe"] for r in mine if r["method"] == "MeanFlow" and r["dataset"] == "gmm"} == {1, 2, 4}
    # a flow map's jumps: four steps land closer to the data than one, on every evaluation seed
    one, four = (_find(rows, "MeanFlow", "gmm", k, "swd") for k in (1, 4))
    assert all(b < a for a, b in zip(one["values"], four["values"]))


def test_the_readme_table_is_generated_from_the_saved_board():
    """`make tables` writes the README's block from docs/results/leaderboard_laptop.json: a stale table fails."""
    readme = (ROOT / "README.md").read_text()
    block = lb.readme_block(json.loads(SAVED.read_text()))
    assert block in readme
    assert (ROOT / "docs" / "figures" / "leaderboard.png").is_file()


def test_the_short_table_has_a_cell_per_dataset_and_step_count():
    board = json.loads(SAVED.read_text())
    lines = lb.short_table(board["rows"])
    assert list(lines[0]) == ["method", "family"] + [f"{d} @{k}" for d in lb.DATASETS for k in (1, 4)]
    pd = next(l for l in lines if l["method"] == "progressive distillation")
    row = _find(board["rows"], "progressive distillation", "gmm", 1, "swd")
    assert pd["gmm @1"] == f"{row['x_teacher']:.2f} ± {row['x_teacher_std']:.2f}"
    families = [l["family"] for l in lines]
    assert families == sorted(families, key=board_def.FAMILIES.index)
