"""The folders are the architecture: imports flow one way between them, no module imports another in a cycle, a
name is imported from where it lives, and the math stays pure.

Read from the source with `ast` (nothing is imported), so a new module that breaks a rule fails here by name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_sweep"
SUBPACKAGES = ("data", "model", "sampling", "training", "compare", "job", "kohya")
# Modules anyone may import: small, cross-cutting, no diffusion in them.
SHARED = {"errors", "atomic", "config", "paths", "progress", "tracking"}
# The top level holds the package's entry points (the CLI, the sweep's Hydra callback) and the shared modules, and
# nothing else: every other topic is a folder named for it (a subpackage, or checks/ for the input checks).
ENTRY = {"__main__", "callbacks"}
# What each subpackage may import besides SHARED (and itself). `training` composes the rest; `data` encodes with
# the model's encoders; `sampling` draws with the model; `compare` reads MLflow, images and the image metrics;
# `job` runs one job: the checks, then training (recording its kohya export). Nothing below `job` imports it or
# checks/, nor the entry modules.
# `kohya` turns sd-scripts' and the GUI's settings into lora-sweep's and back, through the flag tables in checks/,
# the optimizer names of training/optim.py and the bucket sizes of data/buckets.py.
ALLOWED = {
    "model": set(),
    "data": {"model"},
    "sampling": {"model"},
    "training": {"data", "model", "sampling"},
    "compare": {"model", "sampling"},
    "job": {"checks", "data", "training", "kohya"},
    "kohya": {"checks", "data", "training"},
}
PURE_MATH = ("training/noise.py", "training/loss.py", "training/optim.py", "training/schedules.py",
             "training/precision.py")


def lora_sweep_imports(path: Path) -> set[str]:
    """Dotted names under lora_sweep that `path` imports (module level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lora_sweep":
            if node.module == "lora_sweep":
                found.update(f"lora_sweep.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "lora_sweep")
    return found


def room_of(dotted: str) -> str:
    """lora_sweep.data.cache -> "data"; lora_sweep.errors -> "errors" (a top-level module)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "lora_sweep"


def test_the_top_level_holds_the_entry_points_the_shared_modules_and_the_folders():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top <= ENTRY | SHARED, f"top-level modules outside the rules: {sorted(top - ENTRY - SHARED)}"
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders == {*SUBPACKAGES, "checks", "tracking"}, "a new folder needs its place in this file's rules"


@pytest.mark.parametrize("folder", [*SUBPACKAGES, "checks", "tracking"])
def test_a_folders_init_only_says_what_it_holds(folder):
    body = ast.parse((PACKAGE / folder / "__init__.py").read_text()).body
    assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), \
        f"{folder}/__init__.py: a docstring saying what the folder holds, and nothing else (no re-exports)"


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_imports_flow_one_way(sub):
    problems = []
    for path in sorted((PACKAGE / sub).glob("*.py")):
        for dotted in lora_sweep_imports(path):
            room = room_of(dotted)
            if room == sub or room in SHARED or room in ALLOWED[sub]:
                continue
            problems.append(f"{path.relative_to(ROOT)} imports {dotted}")
    assert not problems, "\n".join(problems)


def test_shared_modules_import_only_shared_ones():
    for name in SHARED:
        files = sorted((PACKAGE / name).glob("*.py")) if (PACKAGE / name).is_dir() else [PACKAGE / f"{name}.py"]
        assert files, name
        for path in files:
            for dotted in lora_sweep_imports(path):
                assert room_of(dotted) in SHARED, f"{path.relative_to(ROOT)} imports {dotted}"


@pytest.mark.parametrize("rel", PURE_MATH)
def test_the_math_knows_no_config_objects_and_no_mlflow(rel):
    source = (PACKAGE / rel).read_text()
    assert lora_sweep_imports(PACKAGE / rel) <= {"lora_sweep.errors"}, rel
    for heavy in ("mlflow", "hydra", "omegaconf"):
        assert f"import {heavy}" not in source and f"from {heavy}" not in source, f"{rel} imports {heavy}"


def test_the_queue_knows_nothing_of_diffusion():
    for path in (ROOT / "hydra_plugins").rglob("*.py"):
        assert not lora_sweep_imports(path), f"{path.relative_to(ROOT)} imports lora_sweep"
        tree = ast.parse(path.read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m.split(".")[0] for m in modules} & {"torch", "diffusers", "peft"}, path


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """The lora_sweep modules `path` imports, at any level: `from lora_sweep.data import cache` is data.cache,
    `from lora_sweep.data.cache import TensorCache` is data.cache."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lora_sweep":
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                         for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
    return found


def test_no_two_modules_import_each_other_even_inside_functions():
    graph = {name: imported_modules(path) - {name} for name, path in MODULES.items()}
    cycles, done = [], set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycles.append(" -> ".join([*trail[trail.index(name):], name]))
            return
        if name in done:
            return
        for target in sorted(graph.get(name, ())):
            visit(target, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert not cycles, "\n".join(cycles)


def test_no_module_re_exports_what_lives_elsewhere():
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]:
        assert "noqa: F401" not in path.read_text(), f"{path.relative_to(ROOT)} re-exports a name"


def defined_names(module: str) -> set[str]:
    """What `module` defines itself (functions, classes, assignments), not what it imports."""
    names = set()
    for node in ast.parse(MODULES[module].read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def test_names_are_imported_from_the_module_that_defines_them():
    problems = []
    for path in sorted([*PACKAGE.rglob("*.py"), ROOT / "sweep.py", *(ROOT / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module in MODULES):
                continue
            for alias in node.names:
                if f"{node.module}.{alias.name}" not in MODULES and alias.name not in defined_names(node.module):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {node.module}")
    assert not problems, "\n".join(problems)
