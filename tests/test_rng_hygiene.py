"""Library code never reseeds a global random generator (torch's, NumPy's legacy one, Python's `random`): a
checker or benchmark that did would change every later random draw of the notebook that called it. Initialisation
uses `course_lib.config.seeded(seed)` (forks the global RNG, seeds it for the block, restores it) and draws use an
explicit torch.Generator. The only calls allowed are inside config.seeded and config.seed_everything (the user's
own explicit call).

A static scan (ast) of every .py file under course_lib/: imports are followed, so `import torch as th;
th.manual_seed(0)` and `from torch import manual_seed` are caught, while `torch.Generator().manual_seed(0)` and
`generator.manual_seed(0)` (a generator of one's own) are fine.
"""
from __future__ import annotations

import ast
from pathlib import Path

import torch

from course_lib.config import seeded

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "course_lib"
RESEEDS = {
    "torch.manual_seed", "torch.seed", "torch.random.manual_seed", "torch.random.seed",
    "torch.cuda.manual_seed", "torch.cuda.manual_seed_all", "torch.cuda.seed", "torch.cuda.seed_all",
    "torch.mps.manual_seed", "numpy.random.seed", "random.seed",
}
ALLOWED = {("course_lib/config.py", "seeded"), ("course_lib/config.py", "seed_everything")}   # (file, function)


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the module or object it stands for: `import numpy as np` gives {'np': 'numpy'}."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` -> ['a', 'b', 'c']; None for anything that is not a plain name path (calls, subscripts, ...)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def reseeds(source: str, filename: str = "<string>") -> list[tuple[int, str, str | None]]:
    """(line, the global-RNG call as written, the enclosing function) for every call in `source` that reseeds a
    global random generator."""
    tree = ast.parse(source, filename)
    names = _aliases(tree)
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call):
            path = _dotted(node.func)
            if path is not None and path[0] in names:
                resolved = ".".join([names[path[0]], *path[1:]])
                if resolved in RESEEDS:
                    found.append((node.lineno, ast.get_source_segment(source, node.func) or resolved, function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def test_library_code_never_reseeds_a_global_generator():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, call, function in reseeds(path.read_text(encoding="utf-8"), rel):
            if (rel, function) not in ALLOWED:
                violations.append(f"{rel}:{line}: {call}(...) in {function or 'module level'}")
    assert not violations, (
        "library code reseeds a global random generator, which changes the random draws of the notebook around it:\n"
        + "\n".join(f"  {v}" for v in violations)
        + "\nInitialise under `with course_lib.config.seeded(seed):` and draw from an explicit torch.Generator.")


def test_the_scan_sees_through_imports_and_allows_own_generators():
    source = """
import random
import numpy as np
import torch as th
from torch import manual_seed as ms
from torch import random as trandom
import torch.cuda

def f(generator):
    th.manual_seed(0)
    ms(1)
    trandom.seed()
    np.random.seed(2)
    random.seed(3)
    torch.cuda.manual_seed_all(4)
    th.Generator().manual_seed(5)
    generator.manual_seed(6)
    np.random.default_rng(7)
    rng = random.Random(8)
    rng.seed(9)
"""
    found = reseeds(source)
    assert [call for _, call, _ in found] == ["th.manual_seed", "ms", "trandom.seed", "np.random.seed", "random.seed",
                                             "torch.cuda.manual_seed_all"]
    assert {function for _, _, function in found} == {"f"}


def test_seeded_initialises_like_manual_seed_and_restores_the_callers_state():
    with torch.random.fork_rng(devices=[]):   # this test reseeds; the other tests' draws stay as they were
        torch.manual_seed(0)
        reference = torch.nn.Linear(4, 3).weight.detach().clone()
        torch.manual_seed(123)
        state = torch.get_rng_state()
        with seeded(0):
            weight = torch.nn.Linear(4, 3).weight.detach()
        assert torch.equal(weight, reference)
        assert torch.equal(torch.get_rng_state(), state)


def test_initialising_library_functions_leave_the_global_rng_alone():
    """teachers.fit, the classifier's training and recipes.instaflow.fresh_student initialise under `seeded`: the caller's
    global RNG state is unchanged, and the weights are those of torch.manual_seed(seed) as before (so the shipped
    models retrain to the same weights)."""
    import dataclasses

    from course_lib import classifier, teachers
    from course_lib.models import build_denoiser
    from course_lib.recipes import instaflow
    from course_lib.train import TrainConfig

    like = teachers.load_teacher("gmm-overlap-vp")
    recipe = teachers.get_recipe("gmm-vp")
    recipe = dataclasses.replace(recipe, cfg=dataclasses.replace(recipe.cfg, steps=2, batch_size=64, ckpt_every=10**6))
    calls = {
        "teachers.fit": lambda: teachers.fit(recipe, progress=False),
        "classifier": lambda: classifier.train_digits_classifier(TrainConfig(steps=1, batch_size=8), out_dir=None,
                                                                 progress=False),
        "instaflow.fresh_student": lambda: instaflow.fresh_student(like, 8, seed=3),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        for name, call in calls.items():
            state = torch.get_rng_state()
            call()
            assert torch.equal(torch.get_rng_state(), state), f"{name} changed the global RNG state"
        student = instaflow.fresh_student(like, 8, seed=3)
        torch.manual_seed(3)
        before = build_denoiser(student.config())   # what fresh_student did: reseed, then build
    for (key, a), b in zip(student.state_dict().items(), before.state_dict().values()):
        assert torch.equal(a, b), f"fresh_student's {key} differs from the reseeded initialisation"
