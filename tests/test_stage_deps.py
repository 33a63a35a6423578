"""Every project file on a stage's code path is among the stage's deps in dvc.yaml (the file or a folder above it),
so that `dvc repro` re-runs a stage whose code changed; and no stage lists a Python file it does not run.

A stage's code path, derived from the source: its command `python -m pipeline <name>` runs pipeline/__main__.py
(its module-level imports) and the body of the command function <name>; from there every import of a project module
counts, transitively, imports inside functions included (those under `if TYPE_CHECKING:` never run and do not)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "semdlm")


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imported(nodes: list[ast.stmt], skip: set[int] = frozenset()) -> set[Path]:
    """Project files the statements import, directly (their parent packages' __init__.py included)."""
    out: set[Path] = set()
    for node in (n for stmt in nodes for n in ast.walk(stmt) if id(n) not in skip):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import module`
        for name in names:
            parts = name.split(".")
            out |= {f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i]))) is not None}
    return out


def code_path(command: str) -> set[Path]:
    """The project files that `python -m pipeline <command>` runs."""
    main = REPO / "pipeline" / "__main__.py"
    tree = ast.parse(main.read_text())
    funcs = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and ast.unparse(deco.func) == "app.command":
                    funcs[deco.args[0].value if deco.args else node.name.replace("_", "-")] = node
    assert command in funcs, f"pipeline/__main__.py has no command {command!r} (commands: {sorted(funcs)})"
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    todo = imported(top) | imported(funcs[command].body) | {REPO / "pipeline" / "__init__.py"}
    seen = {main}  # read above: its other commands' bodies are not on this command's path
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        mod = ast.parse(path.read_text())
        todo |= imported(mod.body, _type_checking_blocks(mod)) - seen
    return seen


def stages() -> dict[str, tuple[str, list[str]]]:
    """stage name -> (pipeline command, deps) from dvc.yaml; a foreach stage is checked at its first key."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    kernels = list(yaml.safe_load((REPO / "params.yaml").read_text())["kernels"])
    out = {}
    for name, st in spec.items():
        if "foreach" in st:
            st = yaml.safe_load(yaml.safe_dump(st["do"]).replace("${key}", kernels[0]))
        words = st["cmd"].split()
        assert words[:3] == ["python", "-m", "pipeline"], f"stage {name}: unexpected command {st['cmd']!r}"
        out[name] = (words[3], [d if isinstance(d, str) else next(iter(d)) for d in st.get("deps", [])])
    return out


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


STAGES = stages()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_file_on_a_stages_code_path_is_one_of_its_deps(stage):
    command, deps = STAGES[stage]
    missing = sorted(p.relative_to(REPO).as_posix() for p in code_path(command) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} runs {missing} but does not depend on them: add them to its deps"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_depends_on_project_code_it_does_not_run(stage):
    command, deps = STAGES[stage]
    used = {p.relative_to(REPO).as_posix() for p in code_path(command)}
    extra = sorted(d for d in deps if d.endswith(".py") and d not in used)
    assert not extra, f"dvc.yaml stage {stage} depends on {extra}, which `python -m pipeline {command}` never imports"


def test_the_code_path_follows_imports_inside_functions(tmp_path):
    """The derivation can fail: the sample stage reaches semdlm/penalties.py only through pipeline/sample.py, and
    the evaluator_lm stage, whose command imports pipeline/evaluator_lm.py inside the function, does not reach it."""
    assert REPO / "semdlm" / "penalties.py" in code_path("sample")
    assert REPO / "semdlm" / "penalties.py" not in code_path("evaluator-lm")
    assert REPO / "pipeline" / "evaluator_lm.py" in code_path("evaluator-lm")
