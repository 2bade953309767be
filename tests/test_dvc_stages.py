"""dvc.yaml against the code: each stage's code dependencies are the modules its command imports (directly or through
other medi modules, at module level or inside functions), so that a change of any of them re-runs the stage and
none is listed that the stage does not use. `cli.py` (argument parsing) and `allocator.py` (which malloc the process
runs on: the same bits either way, tests/test_allocator.py) are left out of every stage."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SRC = REPO / "src/medi"


def medi_imports(tree: ast.AST) -> set[str]:
    """Modules of the medi package imported anywhere in `tree` (`from medi import x`, `from medi.x import y`,
    `import medi.x`)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "medi":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medi."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("medi.")}
    return {m for m in out if (SRC / f"{m}.py").exists()}


NOT_DEPS = {"cli", "__init__", "allocator"}      # what no stage's outputs depend on (module docstring)


def command_closure(command: str) -> set[str]:
    """Every medi module `medi <command>` can run: the imports of cli.cmd_<command>, then theirs, transitively."""
    cli = ast.parse((SRC / "cli.py").read_text())
    body = next(n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name == f"cmd_{command}")
    seen: set[str] = set()
    todo = list(medi_imports(body))
    while todo:
        module = todo.pop()
        if module not in seen and module not in NOT_DEPS:
            seen.add(module)
            todo += medi_imports(ast.parse((SRC / f"{module}.py").read_text()))
    return seen


def stages() -> list[tuple[str, str, list[str]]]:
    """(stage, medi command, its src/medi deps) of dvc.yaml; foreach / matrix stages once each."""
    out = []
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        command = body["cmd"].split()[1]
        deps = [d for d in body.get("deps", []) if isinstance(d, str) and d.startswith("src/medi/")]
        out.append((name, command, deps))
    return out


STAGES = stages()


@pytest.mark.parametrize("stage, command, deps", STAGES, ids=[s[0] for s in STAGES])
def test_a_stage_depends_on_exactly_the_modules_its_command_imports(stage, command, deps):
    declared = {Path(d).stem for d in deps}
    assert all(d.endswith(".py") for d in deps), deps
    imported = command_closure(command)
    assert declared == imported, (f"dvc.yaml stage {stage}: missing {sorted(imported - declared)}, "
                                  f"not imported {sorted(declared - imported)}")


def test_the_import_scan_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    from medi import probe\n    import medi.sample\n\nfrom medi.io import write_json\n")
    assert medi_imports(tree) == {"probe", "sample", "io"}
    assert {"model", "sample", "tracking"} <= command_closure("sample")     # sample -> model, through run_stage
