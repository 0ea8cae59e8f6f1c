"""Execute the solution notebooks and write HTML for readers: `python -m course_lib.render`.

    python -m course_lib.render [--mode laptop] [--out html/] [--timeout 3600] [NAMES...]

Each solution notebook is executed top to bottom in a fresh kernel of this Python environment,
with COURSE_MODE set in the kernel's environment (HF_HUB_OFFLINE and every other variable are
passed through as they are) and the working directory set to solutions/, as nbval and JupyterLab
do. Cells tagged 'student-only' are left out. The executed notebook exists only in memory: the
HTML goes to --out (html/ by default, gitignored) and nothing is ever written to solutions/.
Wall time per notebook is printed; the exit status is 1 if any notebook failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Iterable

import ipykernel.kernelspec
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbconvert import HTMLExporter
from nbconvert.preprocessors import CellExecutionError, ExecutePreprocessor

from course_lib.exercises import DEFAULT_ROOT, NotebookBuildError, read_notebook, solution_paths, without_student_only

MODES = ("smoke", "laptop", "full")  # the same three as course_lib.config.MODES (which imports torch)
CURRENT_ENV_KERNEL = "course-current-env"


class _CurrentEnvSpecs(KernelSpecManager):
    """Resolves the kernel name CURRENT_ENV_KERNEL to ipykernel running in this very interpreter, so the notebooks
    run with the course's venv whatever kernels are registered on the machine."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name == CURRENT_ENV_KERNEL:
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                          **ipykernel.kernelspec.get_kernel_dict())
        return super().get_kernel_spec(kernel_name)


def render_notebook(source: Path, out_dir: Path, *, timeout: int) -> Path:
    """Execute the solution notebook `source` (cwd = its folder) and write `out_dir/<name>.html`. Raises
    CellExecutionError if a cell fails (cells tagged 'raises-exception' may fail)."""
    source = Path(source).resolve()
    nb = without_student_only(read_notebook(source))
    executor = ExecutePreprocessor(timeout=timeout, kernel_name=CURRENT_ENV_KERNEL)
    km = KernelManager(kernel_name=CURRENT_ENV_KERNEL, kernel_spec_manager=_CurrentEnvSpecs())
    try:
        executor.preprocess(nb, {"metadata": {"path": str(source.parent)}}, km=km)
    finally:  # a kernel manager we pass in is ours to shut down
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    body, _ = HTMLExporter().from_notebook_node(nb, resources={"metadata": {"name": source.stem}})
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{source.stem}.html"
    target.write_text(body, encoding="utf-8")
    return target


def _resolve_mode(mode: str | None) -> str:
    """--mode, else $COURSE_MODE, else the library's default (laptop without a GPU, full with one)."""
    if mode is None:
        from course_lib.config import course_mode  # imports torch: only when needed

        return course_mode()
    return mode


def main(argv: Iterable[str] | None = None) -> int:
    """Entry point; returns the exit status (0 all rendered, 1 a notebook failed, 2 bad arguments)."""
    parser = argparse.ArgumentParser(prog="python -m course_lib.render", description="Execute solution notebooks "
                                     "and write HTML for readers (never touches solutions/).")
    parser.add_argument("names", nargs="*", help="solution notebooks to render (default: all)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="COURSE_MODE for the kernels (default: $COURSE_MODE, else laptop/full by GPU)")
    parser.add_argument("--out", type=Path, default=None, help="HTML folder (default: <root>/html)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help="course repository holding solutions/ (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell (default: %(default)s)")
    args = parser.parse_args(None if argv is None else list(argv))

    solutions_dir = (args.root / "solutions").resolve()
    out_dir = (args.out if args.out is not None else args.root / "html").resolve()
    if out_dir == solutions_dir or solutions_dir in out_dir.parents:
        print(f"error: --out {out_dir} is inside solutions/; HTML must go elsewhere (e.g. html/)", file=sys.stderr)
        return 2
    try:
        sources = solution_paths(solutions_dir, args.names)
    except NotebookBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not sources:
        print(f"no solution notebooks in {solutions_dir}: nothing to render")
        return 0

    mode = _resolve_mode(args.mode)
    os.environ["COURSE_MODE"] = mode  # kernels inherit this process's environment
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    print(f"COURSE_MODE={mode}, HF_HUB_OFFLINE={'1' if offline else 'unset'}, writing HTML to {out_dir}")

    failures, timings = [], []
    for source in sources:
        start = time.perf_counter()
        try:
            target = render_notebook(source, out_dir, timeout=args.timeout)
            status = f"-> {target}"
        except (CellExecutionError, RuntimeError, TimeoutError) as exc:  # a failed cell, a dead kernel
            failures.append(source.name)
            status = f"FAILED\n{exc}"
        wall = time.perf_counter() - start
        timings.append((source.name, wall))
        print(f"{source.name}: {wall:.1f} s {status}", flush=True)

    width = max(len(name) for name, _ in timings)
    print(f"\n{'notebook':<{width}}  wall time (mode {mode})")
    for name, wall in timings:
        print(f"{name:<{width}}  {wall:8.1f} s{'  FAILED' if name in failures else ''}")
    print(f"{'total':<{width}}  {sum(w for _, w in timings):8.1f} s")
    if failures:
        print(f"{len(failures)} notebook(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
