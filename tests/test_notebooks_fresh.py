"""notebooks/ must be exactly what `python -m course_lib.exercises build` writes from solutions/,
and solutions/ must hold no outputs. With no solution notebooks yet, there is nothing to check."""
from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from course_lib import exercises

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS, NOTEBOOKS = ROOT / "solutions", ROOT / "notebooks"
SOURCES = exercises.solution_paths(SOLUTIONS)
FIX = f"notebooks/ is generated from solutions/: run `{exercises.BUILD_HINT}` and commit the result"


def _diff(expected: str, actual: str, name: str, limit: int = 40) -> str:
    lines = list(difflib.unified_diff(
        actual.splitlines(), expected.splitlines(),
        f"notebooks/{name} (on disk)", f"notebooks/{name} (built)", lineterm="",
    ))
    more = f"\n... {len(lines) - limit} more diff lines" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_student_notebook_is_fresh(source: Path):
    target = NOTEBOOKS / source.name
    assert target.exists(), f"notebooks/{source.name} is missing. {FIX}"
    expected, actual = exercises.student_text(source), target.read_text(encoding="utf-8")
    assert actual == expected, f"notebooks/{source.name} is stale. {FIX}\n{_diff(expected, actual, source.name)}"


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_solution_has_no_outputs(source: Path):
    cells = exercises.output_cells(exercises.read_notebook(source))
    assert not cells, (
        f"solutions/{source.name} holds outputs or execution counts in cells {cells} (0-based). "
        f"Run `{exercises.STRIP_HINT}`, then `{exercises.BUILD_HINT}`"
    )


def test_no_student_notebook_without_source():
    wanted = {s.name for s in SOURCES}
    on_disk = sorted(NOTEBOOKS.glob("*.ipynb")) if NOTEBOOKS.is_dir() else []
    orphans = [p.name for p in on_disk if p.name not in wanted]
    assert not orphans, f"notebooks/ holds {orphans} with no source in solutions/. {FIX} (build deletes them)"
