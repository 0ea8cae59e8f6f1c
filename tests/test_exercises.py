"""The student-notebook build (course_lib.exercises) on a fixture notebook and on small cases."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import nbformat
import pytest

from course_lib import exercises
from course_lib.exercises import NotebookBuildError, replace_solution_regions, student_version

FIXTURE = Path(__file__).parent / "fixtures" / "exercise_sample.ipynb"
NAME = FIXTURE.name


@pytest.fixture()
def source() -> nbformat.NotebookNode:
    return exercises.read_notebook(FIXTURE)


@pytest.fixture()
def student(source) -> nbformat.NotebookNode:
    return student_version(source, NAME)[0]


def _cell(nb: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
    matches = [c for c in nb.cells if c.id == cell_id]
    assert len(matches) == 1, f"expected one cell with id {cell_id!r}, found {len(matches)}"
    return matches[0]


def _notebook(*sources: str, cell_type: str = "code") -> nbformat.NotebookNode:
    new = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell}[cell_type]
    return nbformat.v4.new_notebook(cells=[new(s) for s in sources])


# --- markers ------------------------------------------------------------------------------------


def test_region_replaced_by_stub_at_marker_indentation(student):
    lines = _cell(student, "add-noise").source.split("\n")
    assert lines == [
        "def add_noise(x0, eps, t):",
        '    """Return x_t = (1 - t) x0 + t eps: the straight path, t = 0 is data."""',
        '    raise NotImplementedError("Exercise 0.1: add noise to data")',
    ]


def test_several_regions_per_cell_keep_surrounding_code(student):
    lines = _cell(student, "sampler").source.split("\n")
    assert lines == [
        "class Sampler:",
        "    def step(self, x, dt):",
        '        raise NotImplementedError("Exercise 0.2")',
        "",
        "    def run(self, x, n):",
        "        for _ in range(n):",
        '            raise NotImplementedError("Exercise 0.3: loop the \\"step\\" method")',
        "        return x",
    ]


def test_student_code_compiles_and_raises_with_exercise_title(student):
    namespace: dict = {}
    for cell_id in ("add-noise", "sampler"):
        exec(compile(_cell(student, cell_id).source, cell_id, "exec"), namespace)
    with pytest.raises(NotImplementedError, match=r"^Exercise 0\.1: add noise to data$"):
        namespace["add_noise"](1.0, 3.0, 0.5)
    with pytest.raises(NotImplementedError, match=r"^Exercise 0\.2$"):
        namespace["Sampler"]().step(0.0, 0.1)
    with pytest.raises(NotImplementedError, match=r'^Exercise 0\.3: loop the "step" method$'):
        namespace["Sampler"]().run(0.0, 3)


def test_exercises_listed_in_order(source):
    _, found = student_version(source, NAME)
    assert [(e.number, e.title) for e in found] == [
        ("0.1", "add noise to data"), ("0.2", ""), ("0.3", 'loop the "step" method')
    ]


def test_no_solution_text_reaches_students(student):
    text = exercises.notebook_text(student)
    solution_lines = ("(1 - t) * x0 + t * eps", "return x + dt", "self.step(x, 1.0 / n)", "solution-only answer")
    for leaked in ("SOLUTION", *solution_lines):
        assert leaked not in text, f"{leaked!r} leaked into the student notebook"


def test_solution_only_dropped_student_only_kept(source, student):
    assert [c.id for c in student.cells] == [
        "intro-md", "imports", "add-noise", "sampler", "student-hint", "checker"
    ]
    assert "student-hint" not in [c.id for c in exercises.without_student_only(source).cells]


def test_paired_notebook_puts_each_solution_cell_before_its_stub(source, student):
    paired = exercises.paired_version(source, NAME)
    assert [c.id for c in paired.cells] == [
        "intro-md", "imports", "add-noise-sol", "add-noise", "sampler-sol", "sampler", "answer", "student-hint",
        "checker"]
    for cell_id in ("add-noise", "sampler"):
        sol, stub = _cell(paired, f"{cell_id}-sol"), _cell(paired, cell_id)
        assert sol.source == _cell(source, cell_id).source and "# BEGIN SOLUTION" in sol.source
        assert exercises.SOLUTION_COPY in sol.metadata["tags"] and stub.source == _cell(student, cell_id).source
        assert exercises.SOLUTION_COPY not in stub.metadata.get("tags", [])
    nbformat.validate(paired)


def test_pair_command_writes_one_paired_notebook_per_solution(tmp_path: Path, capsys):
    (tmp_path / "solutions").mkdir()
    shutil.copy(FIXTURE, tmp_path / "solutions" / NAME)
    out = tmp_path / "paired"
    out.mkdir()
    (out / "gone.ipynb").write_text("{}")                     # a notebook whose source is gone: removed
    assert exercises.main(["--root", str(tmp_path), "pair", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [NAME]
    assert exercises.read_notebook(out / NAME) == exercises.paired_version(exercises.read_notebook(FIXTURE), NAME)


def _ran(source: str, printed: str, tags: tuple[str, ...] = ()):
    """A stand-in for an nbval cell item after its run: its cell, its path and the stream it printed."""
    from types import SimpleNamespace

    cell = nbformat.v4.new_code_cell(source, metadata={"tags": list(tags)} if tags else {})
    return SimpleNamespace(cell=cell, path=Path("build/paired/x.ipynb"),
                           test_outputs=[{"output_type": "stream", "name": "stdout", "text": printed}])


def test_the_paired_run_fails_a_rejected_solution_and_an_accepted_stub():
    from course_lib.checks.core import ACCEPTED, FALLBACK
    from conftest import _verdict_problem

    solution = "def f(x):\n    # BEGIN SOLUTION 3.2: f\n    return x\n    # END SOLUTION\nf = checks.check_f(f)"
    stub = replace_solution_regions(solution)[0]
    tag = (exercises.SOLUTION_COPY,)
    assert _verdict_problem(_ran(solution, f"Exercise 3.2: correct. {ACCEPTED}\n", tag)) is None
    assert "should end with" in _verdict_problem(_ran(solution, f"Exercise 3.2: wrong sign. {FALLBACK}\n", tag))
    assert "should end with" in _verdict_problem(_ran(solution, "no verdict at all\n", tag))
    assert _verdict_problem(_ran(stub, f"Exercise 3.2: not solved yet. {FALLBACK}\n")) is None
    assert "stub" in _verdict_problem(_ran(stub, f"Exercise 3.2: correct. {ACCEPTED}\n"))
    # another exercise's verdict does not count for this one; a cell without an exercise is not checked
    assert _verdict_problem(_ran(solution, f"Exercise 3.1: correct. {ACCEPTED}\n", tag)) is not None
    assert _verdict_problem(_ran("x = 1", f"{FALLBACK}\n")) is None


# --- normalisation and determinism ---------------------------------------------------------------


def test_outputs_and_metadata_stripped(student):
    for cell in student.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
        assert set(cell.metadata) <= {"tags"}
    assert _cell(student, "imports").metadata == {"tags": ["parameters"]}
    assert set(student.metadata) == {"kernelspec", "language_info"}
    assert "version" not in student.metadata.language_info
    assert (student.nbformat, student.nbformat_minor) == (4, 5)
    nbformat.validate(student)


def test_build_is_deterministic_and_ignores_outputs(source):
    first = exercises.student_text(FIXTURE)
    assert exercises.student_text(FIXTURE) == first
    stripped = exercises.normalise(source, NAME)  # same source without outputs or metadata
    assert exercises.notebook_text(student_version(stripped, NAME)[0]) == first
    assert first.endswith("}\n") and "\r" not in first


def test_cell_ids_kept_or_derived_stably(source):
    no_ids = copy.deepcopy(source)
    for cell in no_ids.cells:
        del cell["id"]
    no_ids.nbformat_minor = 4
    one, _ = student_version(no_ids, NAME)
    two, _ = student_version(copy.deepcopy(no_ids), NAME)
    assert [c.id for c in one.cells] == [c.id for c in two.cells]
    assert len({c.id for c in one.cells}) == len(one.cells)
    dup = copy.deepcopy(source)
    dup.cells[1]["id"] = dup.cells[0]["id"]
    ids = [c.id for c in exercises.normalise(dup, NAME).cells]
    assert len(set(ids)) == len(ids) and ids[0] == "intro-md"


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("x = 1\n# BEGIN SOLUTION 1.1: a\nx = 2", r"line 2: '# BEGIN SOLUTION 1.1: a' is never closed"),
        ("x = 1\n# END SOLUTION", r"line 2: '# END SOLUTION' without a matching"),
        ("# BEGIN SOLUTION 1.1: a\n    # BEGIN SOLUTION 1.2: b\n# END SOLUTION\n# END SOLUTION", r"line 2: nested"),
        ("# BEGIN SOLUTION\nx = 1\n# END SOLUTION", r"line 1: malformed solution marker"),
        ("#BEGIN SOLUTION 1.1: a\nx = 1\n# END SOLUTION", r"malformed"),
        ("# BEGIN SOLUTIONS 1.1: a\nx = 1\n# END SOLUTION", r"malformed"),
        ("# BEGIN SOLUTION 1.1 no colon\nx = 1\n# END SOLUTION", r"malformed"),
        ("# BEGIN SOLUTION 1.1:\nx = 1\n# END SOLUTION", r"malformed"),
        ("# begin solution 1.1: a\nx = 1\n# end solution", r"malformed"),
    ],
)
def test_bad_markers_name_notebook_cell_and_line(source, message):
    nb = _notebook("x = 0", source)
    with pytest.raises(NotebookBuildError, match=message) as info:
        student_version(nb, "07_bad.ipynb")
    assert str(info.value).startswith("07_bad.ipynb: cell 1 (0-based)")


def test_markers_outside_code_cells_and_conflicting_tags_are_errors():
    with pytest.raises(NotebookBuildError, match=r"only work in code cells"):
        student_version(_notebook("# BEGIN SOLUTION 1.1: a\n# END SOLUTION", cell_type="markdown"), "x.ipynb")
    nb = _notebook("x = 1")
    nb.cells[0].metadata["tags"] = ["solution-only", "student-only"]
    with pytest.raises(NotebookBuildError, match=r"x.ipynb: cell 0 .*tagged both"):
        student_version(nb, "x.ipynb")


def test_windows_line_endings_and_empty_region():
    new, found = replace_solution_regions("def f():\r\n    # BEGIN SOLUTION 2: f\r\n    # END SOLUTION\r\n")
    assert new == 'def f():\r\n    raise NotImplementedError("Exercise 2: f")\n'
    assert [e.message for e in found] == ["Exercise 2: f"]


# --- folders and command line --------------------------------------------------------------------


@pytest.fixture()
def course(tmp_path: Path) -> Path:
    (tmp_path / "solutions").mkdir()
    shutil.copy(FIXTURE, tmp_path / "solutions" / "01_sample.ipynb")
    return tmp_path


def test_build_then_check_then_stale(course: Path, capsys):
    solutions, notebooks = course / "solutions", course / "notebooks"
    assert exercises.main(["--root", str(course), "build"]) == 0
    target = notebooks / "01_sample.ipynb"
    assert target.read_text(encoding="utf-8") == exercises.student_text(solutions / "01_sample.ipynb")
    mtime = target.stat().st_mtime_ns
    assert exercises.build(solutions, notebooks) == []  # rebuild: nothing to write
    assert target.stat().st_mtime_ns == mtime

    problems = exercises.stale(solutions, notebooks)
    assert len(problems) == 1 and "holds outputs in cells [1, 2, 4]" in problems[0]
    assert exercises.strip_outputs(solutions / "01_sample.ipynb") is True
    assert exercises.strip_outputs(solutions / "01_sample.ipynb") is False
    assert exercises.stale(solutions, notebooks) == []
    assert exercises.main(["--root", str(course), "check"]) == 0

    target.write_text(target.read_text(encoding="utf-8").replace("Exercise 0.1", "Exercise 9.9"), encoding="utf-8")
    (notebooks / "99_orphan.ipynb").write_text("{}", encoding="utf-8")
    (notebooks / "02_missing.ipynb").unlink(missing_ok=True)
    shutil.copy(solutions / "01_sample.ipynb", solutions / "02_missing.ipynb")
    capsys.readouterr()
    assert exercises.main(["--root", str(course), "check"]) == 1
    report = capsys.readouterr().out
    assert "01_sample.ipynb: differs" in report and "02_missing.ipynb: missing" in report
    assert "99_orphan.ipynb: has no source" in report and "python -m course_lib.exercises build" in report

    assert exercises.main(["--root", str(course), "build"]) == 0
    assert not (notebooks / "99_orphan.ipynb").exists()
    assert exercises.stale(solutions, notebooks) == []


def test_strip_keeps_markers_and_tags(course: Path):
    path = course / "solutions" / "01_sample.ipynb"
    exercises.main(["--root", str(course), "strip"])
    nb = exercises.read_notebook(path)
    assert exercises.output_cells(nb) == []
    assert "# BEGIN SOLUTION 0.1: add noise to data" in _cell(nb, "add-noise").source
    assert _cell(nb, "answer").metadata == {"tags": ["solution-only"]}
    assert json.loads(path.read_text(encoding="utf-8"))["metadata"].keys() == {"kernelspec", "language_info"}


def test_cli_errors_exit_2(course: Path, capsys):
    assert exercises.main(["--root", str(course), "build", "nope"]) == 2
    assert "no solution notebook 'nope'" in capsys.readouterr().err
    nb = _notebook("# BEGIN SOLUTION 1: x")
    nbformat.write(nb, course / "solutions" / "03_bad.ipynb")
    assert exercises.main(["--root", str(course), "build"]) == 2
    assert "03_bad.ipynb: cell 0 (0-based), line 1" in capsys.readouterr().err
    assert not (course / "notebooks").exists(), "a failed build must write nothing"


def test_empty_or_missing_solutions_folder(tmp_path: Path):
    assert exercises.stale(tmp_path / "solutions", tmp_path / "notebooks") == []
    assert exercises.build(tmp_path / "solutions", tmp_path / "notebooks") == []
    assert exercises.main(["--root", str(tmp_path), "check"]) == 0
