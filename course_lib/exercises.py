"""Student notebooks from solution notebooks: the instructor's build tool.

solutions/ is the only source. `python -m course_lib.exercises build` writes notebooks/ (same file
names) by replacing every marked solution region of a code cell with one line that raises:

    def ddim_step(pred, t, s, process):
        \"\"\"docstring kept\"\"\"
        # BEGIN SOLUTION 0.1: write one DDIM step
        ...solution lines...
        # END SOLUTION

becomes, in the student notebook,

    def ddim_step(pred, t, s, process):
        \"\"\"docstring kept\"\"\"
        raise NotImplementedError("Exercise 0.1: write one DDIM step")

Marker syntax (code cells only, one marker per line, case-sensitive):
    # BEGIN SOLUTION <number>[: <title>]     number like 3, 3.2 or 3.2b; the title names the exercise
    # END SOLUTION
A cell may hold several regions; regions may not nest. Anything else that mentions
BEGIN/END SOLUTION is an error, so that a typo can never leak a solution to students.

Cell tags:
    solution-only   the cell is dropped from the student notebook (answers, instructor notes)
    student-only    the cell exists only for students: it is kept in the student notebook and
                    left out of rendered HTML (`course_lib.render`); it must also work after the
                    solution's cells, which the test suite's paired notebooks run before it

Both versions are normalised so builds are byte-identical and diffs stay small: outputs and
execution counts stripped, notebook metadata reduced to `kernelspec` and `language_info`
(without the Python version), cell metadata reduced to `tags`, cell ids kept from the source
(derived from the notebook name and cell position where the source has none).

Commands (run from anywhere; paths default to the repository holding course_lib):
    python -m course_lib.exercises build [NAMES...]   write notebooks/ from solutions/
    python -m course_lib.exercises check              exit 1 if notebooks/ is stale or solutions/ has outputs
    python -m course_lib.exercises strip [NAMES...]   strip outputs from solutions/ in place
    python -m course_lib.exercises pair --out DIR     write the test suite's paired notebooks (below)

The test suite runs each notebook once, as a paired notebook (`paired_version`): the student notebook with every
exercise cell preceded by its solution cell, tagged 'solution-copy'. In one kernel the solution must be accepted by
the exercise's checker, the student's stub must fall back to the library's version, and the cells after it run on
that fallback, as a student's notebook does.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import nbformat
from nbformat import NotebookNode

SOLUTION_ONLY = "solution-only"
STUDENT_ONLY = "student-only"
SOLUTION_COPY = "solution-copy"   # paired notebooks: the solution's side of an exercise cell

BEGIN_RE = re.compile(
    r"^(?P<indent>[ \t]*)# BEGIN SOLUTION (?P<number>[0-9]+(?:\.[0-9]+)*[a-z]?)"
    r"(?:: *(?P<title>\S.*?))?\s*$"
)
END_RE = re.compile(r"^[ \t]*# END SOLUTION\s*$")
# Anything that looks like a marker; lines matching this but neither regex above are errors.
LOOSE_MARKER_RE = re.compile(r"(BEGIN|END)[ _\-]*SOLUTION", re.IGNORECASE)

NOTEBOOK_METADATA_KEYS = ("kernelspec", "language_info")
DROPPED_LANGUAGE_INFO_KEYS = ("version",)  # changes with whoever last saved the notebook
CELL_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # nbformat 4.5's rule
DEFAULT_ROOT = Path(__file__).resolve().parents[1]
BUILD_HINT = "python -m course_lib.exercises build"
STRIP_HINT = "python -m course_lib.exercises strip"


class NotebookBuildError(ValueError):
    """A solution notebook that cannot be turned into a student notebook (markers, tags, file)."""


@dataclass(frozen=True)
class Exercise:
    """One marked region: its number, its title ('' when none) and where it sits."""

    number: str
    title: str
    cell_index: int

    @property
    def message(self) -> str:
        """The text of the NotImplementedError that replaces the region."""
        return f"Exercise {self.number}: {self.title}" if self.title else f"Exercise {self.number}"


# ---------------------------------------------------------------------------------------------
# Cells and notebooks


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter messages)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _where(notebook: str, cell_index: int, line_no: int | None = None) -> str:
    loc = f"{notebook}: cell {cell_index} (0-based)"
    return loc if line_no is None else f"{loc}, line {line_no}"


def replace_solution_regions(source: str, *, notebook: str = "<notebook>", cell_index: int = 0
                             ) -> tuple[str, list[Exercise]]:
    """Replace each marked region of one code cell's source by a `raise NotImplementedError(...)`.

    Returns the new source and the exercises found, in order. Raises NotebookBuildError (naming
    the notebook, cell and line) on a malformed, unbalanced or nested marker.
    """
    out: list[str] = []
    exercises: list[Exercise] = []
    open_begin: tuple[int, str] | None = None  # (line number, line) of the region being skipped
    lines = source.split("\n")
    for line_no, line in enumerate(lines, start=1):
        begin, end = BEGIN_RE.match(line), END_RE.match(line)
        if begin is None and end is None and LOOSE_MARKER_RE.search(line):
            raise NotebookBuildError(f"{_where(notebook, cell_index, line_no)}: malformed solution marker "
                                     f"{line.strip()!r}; write '# BEGIN SOLUTION 3.2: title' and '# END SOLUTION' "
                                     "exactly")
        if begin is not None:
            if open_begin is not None:
                raise NotebookBuildError(f"{_where(notebook, cell_index, line_no)}: nested '# BEGIN SOLUTION' inside "
                                         f"the region opened on line {open_begin[0]} ({open_begin[1].strip()!r}); "
                                         "close it with '# END SOLUTION' first")
            open_begin = (line_no, line)
            exercise = Exercise(begin["number"], begin["title"] or "", cell_index)
            exercises.append(exercise)
            # a double-quoted Python string literal of the message (JSON's escapes are valid Python)
            stub = "raise NotImplementedError(" + json.dumps(exercise.message, ensure_ascii=False) + ")"
            out.append(begin["indent"] + stub)
        elif end is not None:
            if open_begin is None:
                raise NotebookBuildError(f"{_where(notebook, cell_index, line_no)}: '# END SOLUTION' without a "
                                         "matching '# BEGIN SOLUTION <number>: <title>'")
            open_begin = None
        elif open_begin is None:
            out.append(line)
    if open_begin is not None:
        raise NotebookBuildError(f"{_where(notebook, cell_index, open_begin[0])}: {open_begin[1].strip()!r} is "
                                 "never closed; add '# END SOLUTION' at the end of the region")
    return "\n".join(out), exercises


def _tags(cell: NotebookNode) -> list[str]:
    return [str(t) for t in cell.get("metadata", {}).get("tags", [])]


def _stable_id(notebook: str, index: int, used: set[str]) -> str:
    digest = hashlib.sha1(f"{notebook}\0{index}".encode()).hexdigest()
    candidate, salt = digest[:8], 0
    while candidate in used:
        salt += 1
        candidate = hashlib.sha1(f"{notebook}\0{index}\0{salt}".encode()).hexdigest()[:8]
    return candidate


def normalise(nb: NotebookNode, notebook: str) -> NotebookNode:
    """A copy of `nb` without outputs, execution counts or volatile metadata, with stable cell ids.

    `notebook` (the file name) seeds the ids of cells that have none, so the result depends only
    on the source notebook. The result is a valid nbformat 4.5 notebook.
    """
    metadata = {k: copy.deepcopy(nb.metadata[k]) for k in NOTEBOOK_METADATA_KEYS if k in nb.metadata}
    for key in DROPPED_LANGUAGE_INFO_KEYS:
        metadata.get("language_info", {}).pop(key, None)
    new = nbformat.v4.new_notebook(metadata=metadata)
    used: set[str] = set()
    for index, cell in enumerate(nb.cells):
        cell_id = cell.get("id")
        if not isinstance(cell_id, str) or not CELL_ID_RE.match(cell_id) or cell_id in used:
            cell_id = _stable_id(notebook, index, used)
        used.add(cell_id)
        cell_meta: dict = {}
        if _tags(cell):
            cell_meta["tags"] = _tags(cell)
        if cell.cell_type == "code":
            new_cell = nbformat.v4.new_code_cell(source=cell.source, metadata=cell_meta)
        elif cell.cell_type == "markdown":
            new_cell = nbformat.v4.new_markdown_cell(source=cell.source, metadata=cell_meta)
            if cell.get("attachments"):
                new_cell["attachments"] = copy.deepcopy(cell.attachments)
        elif cell.cell_type == "raw":
            if "raw_mimetype" in cell.get("metadata", {}):
                cell_meta["raw_mimetype"] = cell.metadata["raw_mimetype"]
            new_cell = nbformat.v4.new_raw_cell(source=cell.source, metadata=cell_meta)
        else:
            raise NotebookBuildError(f"{_where(notebook, index)}: unknown cell type {cell.cell_type!r}")
        new_cell["id"] = cell_id
        new.cells.append(new_cell)
    nbformat.validate(new)
    return new


def student_version(nb: NotebookNode, notebook: str) -> tuple[NotebookNode, list[Exercise]]:
    """The student notebook of solution notebook `nb` (named `notebook`), and its exercises.

    Solution regions become `raise NotImplementedError("Exercise N: title")`, cells tagged
    'solution-only' are dropped, everything is normalised (see `normalise`).
    """
    clean = normalise(nb, notebook)
    kept = []
    exercises: list[Exercise] = []
    for index, cell in enumerate(clean.cells):
        tags = _tags(cell)
        if SOLUTION_ONLY in tags and STUDENT_ONLY in tags:
            raise NotebookBuildError(f"{_where(notebook, index)}: tagged both {SOLUTION_ONLY!r} and "
                                     f"{STUDENT_ONLY!r}; keep one")
        if cell.cell_type == "code":
            cell.source, found = replace_solution_regions(cell.source, notebook=notebook, cell_index=index)
            exercises.extend(found)
        elif LOOSE_MARKER_RE.search(cell.source):
            raise NotebookBuildError(f"{_where(notebook, index)}: solution markers only work in code cells; to "
                                     f"hide a {cell.cell_type} cell from students, tag it {SOLUTION_ONLY!r}")
        if SOLUTION_ONLY not in tags:
            kept.append(cell)
    clean.cells = kept
    return clean, exercises


def paired_version(nb: NotebookNode, notebook: str) -> NotebookNode:
    """The student notebook of `nb` with each exercise cell preceded by the solution's cell (tagged 'solution-copy',
    its id the student cell's with "-sol"), and the solution-only cells in their places: what the test suite runs so
    that one kernel checks both sides of every exercise (module docstring)."""
    student, _ = student_version(nb, notebook)                         # marker errors first
    by_id = {cell.id: cell for cell in student.cells}
    cells = []
    for cell in normalise(nb, notebook).cells:
        mine = by_id.get(cell.id)
        if mine is not None and mine.source != cell.source:
            cell["id"] = f"{cell.id[:60]}-sol"
            cell.metadata["tags"] = _tags(cell) + [SOLUTION_COPY]
        if mine is None or mine.source != cell.source:                 # solution-only, or an exercise's solution
            cells.append(cell)
        if mine is not None:
            cells.append(mine)
    student.cells = cells
    nbformat.validate(student)
    return student


def without_student_only(nb: NotebookNode) -> NotebookNode:
    """A copy of `nb` without cells tagged 'student-only' (what readers of the solutions see)."""
    new = copy.deepcopy(nb)
    new.cells = [c for c in new.cells if STUDENT_ONLY not in _tags(c)]
    return new


def notebook_text(nb: NotebookNode) -> str:
    """The exact text written to disk: nbformat's JSON (sorted keys, indent 1) plus a newline."""
    text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def read_notebook(path: Path) -> NotebookNode:
    """Read a notebook as nbformat 4, with a clear error for files that are not notebooks."""
    try:
        return nbformat.read(path, as_version=4)
    except Exception as exc:  # nbformat raises several unrelated types for bad JSON
        raise NotebookBuildError(f"{path}: cannot be read as a Jupyter notebook ({exc})") from exc


def student_text(solution_path: Path) -> str:
    """The text `build` writes for the solution notebook at `solution_path`."""
    solution_path = Path(solution_path)
    nb, _ = student_version(read_notebook(solution_path), solution_path.name)
    return notebook_text(nb)


def output_cells(nb: NotebookNode) -> list[int]:
    """Indices of code cells that hold outputs or an execution count."""
    return [i for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]


# ---------------------------------------------------------------------------------------------
# Folders


def solution_paths(solutions_dir: Path, names: Sequence[str] = ()) -> list[Path]:
    """The solution notebooks to work on: all of `solutions_dir/*.ipynb` (sorted), or `names`.

    A name may be given as `00_why`, `00_why.ipynb` or `solutions/00_why.ipynb`. A missing
    folder counts as empty (git does not keep empty folders).
    """
    solutions_dir = Path(solutions_dir)
    available = sorted(solutions_dir.glob("*.ipynb")) if solutions_dir.is_dir() else []
    if not names:
        return available
    by_stem = {p.stem: p for p in available}
    chosen = []
    for name in names:
        stem = Path(name).name.removesuffix(".ipynb")
        if stem not in by_stem:
            known = ", ".join(sorted(by_stem)) or "none"
            raise NotebookBuildError(f"no solution notebook {name!r} in {solutions_dir} (available: {known})")
        chosen.append(by_stem[stem])
    return chosen


def build(solutions_dir: Path, notebooks_dir: Path, names: Sequence[str] = ()) -> list[Path]:
    """Write the student version of each solution notebook; return the files that changed.

    Files whose content is already right are not touched. With no `names`, student notebooks
    that have no source in `solutions_dir` any more are deleted (notebooks/ is generated only).
    """
    notebooks_dir = Path(notebooks_dir)
    changed = []
    sources = solution_paths(solutions_dir, names)
    texts = {source.name: student_text(source) for source in sources}  # any marker error before any write
    for name, text in texts.items():
        target = notebooks_dir / name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            notebooks_dir.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8", newline="\n")
            changed.append(target)
    if not names:
        for orphan in _orphans(notebooks_dir, sources):
            orphan.unlink()
            changed.append(orphan)
    return changed


def _orphans(notebooks_dir: Path, sources: Sequence[Path]) -> list[Path]:
    """The student notebooks in `notebooks_dir` that none of `sources` builds."""
    wanted = {s.name for s in sources}
    return [p for p in sorted(notebooks_dir.glob("*.ipynb")) if p.name not in wanted] if notebooks_dir.is_dir() else []


def stale(solutions_dir: Path, notebooks_dir: Path) -> list[str]:
    """Problems `check` reports, one line each; empty when notebooks/ is exactly what build writes."""
    notebooks_dir = Path(notebooks_dir)
    problems = []
    sources = solution_paths(solutions_dir)
    for source in sources:
        target = notebooks_dir / source.name
        cells = output_cells(read_notebook(source))
        if cells:
            problems.append(f"{_shown(source)}: holds outputs in cells {cells}; run `{STRIP_HINT}`")
        if not target.exists():
            problems.append(f"{_shown(target)}: missing; run `{BUILD_HINT}`")
        elif target.read_text(encoding="utf-8") != student_text(source):
            problems.append(f"{_shown(target)}: differs from what {_shown(source)} builds; run `{BUILD_HINT}`")
    problems += [f"{_shown(orphan)}: has no source in {_shown(solutions_dir)}; run `{BUILD_HINT}` to delete it"
                 for orphan in _orphans(notebooks_dir, sources)]
    return problems


def strip_outputs(path: Path) -> bool:
    """Strip outputs and volatile metadata from the notebook at `path` in place; True if it changed.

    Markers and tags are left alone: this is for solution notebooks, the source of truth.
    """
    path = Path(path)
    text = notebook_text(normalise(read_notebook(path), path.name))
    if path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8", newline="\n")
    return True


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_lib.exercises",
                                     description="Build student notebooks (notebooks/) from solution notebooks "
                                                 "(solutions/).")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help="course repository holding solutions/ and notebooks/ (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="write notebooks/ from solutions/")
    p.add_argument("names", nargs="*", help="solution notebooks to build (default: all)")
    sub.add_parser("check", help="exit 1 if notebooks/ is stale or solutions/ holds outputs")
    p = sub.add_parser("strip", help="strip outputs from solutions/ in place")
    p.add_argument("names", nargs="*", help="solution notebooks to strip (default: all)")
    p = sub.add_parser("pair", help="write the test suite's paired notebooks (solution and student side of every "
                                    "exercise in one notebook) to --out")
    p.add_argument("--out", type=Path, required=True, help="folder to write them to (emptied of *.ipynb first)")
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 stale, 2 bad markers or names)."""
    args = _parser().parse_args(None if argv is None else list(argv))
    solutions_dir, notebooks_dir = args.root / "solutions", args.root / "notebooks"
    try:
        if args.command == "build":
            sources = solution_paths(solutions_dir, args.names)
            changed = build(solutions_dir, notebooks_dir, args.names)
            for path in changed:
                print(f"{'wrote' if path.exists() else 'deleted'} {_shown(path)}")
            print(f"{len(sources)} solution notebook(s), {len(changed)} student file(s) changed")
        elif args.command == "check":
            problems = stale(solutions_dir, notebooks_dir)
            for line in problems:
                print(line)
            if problems:
                print(f"{len(problems)} problem(s): notebooks/ is generated from solutions/ only")
                return 1
            print(f"notebooks/ is up to date ({len(solution_paths(solutions_dir))} notebook(s))")
        elif args.command == "strip":
            sources = solution_paths(solutions_dir, args.names)
            for source in sources:
                if strip_outputs(source):
                    print(f"stripped {_shown(source)}")
            print(f"{len(sources)} solution notebook(s) checked")
        elif args.command == "pair":
            args.out.mkdir(parents=True, exist_ok=True)
            for old in args.out.glob("*.ipynb"):
                old.unlink()
            sources = solution_paths(solutions_dir)
            for source in sources:
                text = notebook_text(paired_version(read_notebook(source), source.name))
                (args.out / source.name).write_text(text, encoding="utf-8", newline="\n")
            print(f"{len(sources)} paired notebook(s) in {_shown(args.out)}")
    except NotebookBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
