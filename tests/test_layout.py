"""The folders are the architecture: imports flow one way between them, and the math stays pure.

Read from the source with `ast` (nothing is imported), so a new module that breaks a rule fails here by name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_sweep"
SUBPACKAGES = ("data", "model", "sampling", "training", "compare")
# Top-level modules anyone may import: small, cross-cutting, no diffusion in them.
SHARED = {"errors", "atomic", "config", "paths", "tracking"}
# What each subpackage may import besides SHARED (and itself). `training` composes the rest; `data` encodes with
# the model's encoders; `compare` reads MLflow and images. Nothing below the top imports the entry modules
# (checks/, run, callbacks, __main__, ...).
ALLOWED = {
    "model": set(),
    "data": {"model"},
    "sampling": {"model"},
    "compare": {"model", "sampling"},
    "training": {"data", "model", "sampling"},
}
PURE_MATH = ("training/noise.py", "training/loss.py", "training/optim.py", "training/precision.py")


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


def test_top_level_holds_few_modules_and_the_subpackages():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(top) <= 11, top
    for name in (*SUBPACKAGES, "checks"):
        assert (PACKAGE / name / "__init__.py").read_text().strip(), f"{name}/__init__.py says what the folder holds"


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
