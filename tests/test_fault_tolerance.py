"""Building blocks of the reliability promises (docs/reliability.md): atomic outs, sqlite retry, safe loading."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common import TMP_SUFFIX, atomic
from pipeline.track import Retrying

REPO = Path(__file__).resolve().parents[1]


def test_exception_inside_atomic_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    out = tmp_path / "m.json"
    out.write_text("good")
    with pytest.raises(OSError), atomic(out) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert out.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_atomic_replaces_a_directory_out_as_a_whole(tmp_path):
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "old.parquet").write_text("old")
    with atomic(out) as tmp:
        tmp.mkdir()
        (tmp / "new.parquet").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.parquet"]


def test_temp_of_a_killed_writer_is_removed_by_the_next_write_and_a_live_one_is_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".out.json.{dead.stdout.strip()}.abc{TMP_SUFFIX}"
    live = tmp_path / f".out.json.{os.getppid()}.def{TMP_SUFFIX}"  # pytest's parent: alive while we run
    for d in (killed, live):
        d.mkdir()
        (d / "out.json").write_text("{")
    with atomic(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    assert not killed.exists() and live.exists()
    assert (tmp_path / "out.json").read_text() == "{}"


class FlakyClient:
    def __init__(self, failures: int, message: str = "(sqlite3.OperationalError) database is locked") -> None:
        self.failures, self.message, self.calls = failures, message, 0

    def create_run(self, exp_id: str) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(self.message)
        return f"run-of-{exp_id}"


def test_mlflow_calls_retry_while_sqlite_is_locked():
    client = FlakyClient(failures=3)
    assert Retrying(client, tries=5, base_s=0.001).create_run("7") == "run-of-7"
    assert client.calls == 4


def test_mlflow_retry_gives_up_after_its_tries_and_never_retries_other_errors():
    with pytest.raises(RuntimeError, match="locked"):
        Retrying(FlakyClient(failures=9), tries=3, base_s=0.001).create_run("7")
    other = FlakyClient(failures=1, message="no such experiment")
    with pytest.raises(RuntimeError, match="no such experiment"):
        Retrying(other, tries=5, base_s=0.001).create_run("7")
    assert other.calls == 1


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            yield f"{owner}.{node.func.attr}", kw, node.lineno


def unsafe_loads(source: str) -> list[str]:
    """Lines that could unpickle a file: torch.load without weights_only=True, pickle/dill/joblib, read_pickle,
    np.load(allow_pickle=True)."""
    tree, found = ast.parse(source), []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found += [f"line {node.lineno}: import {n}" for n in names if n.split(".")[0] in ("pickle", "dill", "joblib")]
    for name, kw, line in _calls(tree):
        weights_only = kw.get("weights_only")
        if name == "torch.load" and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"line {line}: torch.load without weights_only=True")
        if name.endswith(".read_pickle") or (name == "np.load" and "allow_pickle" in kw):
            found.append(f"line {line}: {name}")
    return found


def test_the_unsafe_load_scan_finds_what_it_looks_for():
    bad = "import pickle\nimport torch\ntorch.load('x')\ntorch.load('x', weights_only=False)\npd.read_pickle('y')\n"
    assert len(unsafe_loads(bad)) == 4
    assert unsafe_loads("import torch\ntorch.load('x', map_location='cpu', weights_only=True)\n") == []


def test_no_code_path_unpickles_a_file():
    offenders = {str(p.relative_to(REPO)): bad for d in ("pipeline", "semdlm", "benchmarks")
                 for p in sorted((REPO / d).rglob("*.py")) if (bad := unsafe_loads(p.read_text()))}
    assert offenders == {}


WRITE_CALLS = {"to_parquet", "to_csv", "to_json", "write_text", "write_bytes", "save", "savefig", "save_pretrained",
               "dump"}


class _DirectWrites(ast.NodeVisitor):
    """Write calls that are neither inside `with atomic(...)` nor writing to a path their function was given."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.atomic_depth = 0
        self.params: list[set[str]] = [set()]

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.params.append({a.arg for a in node.args.args + node.args.kwonlyargs})
        self.generic_visit(node)
        self.params.pop()

    def visit_With(self, node: ast.With) -> None:
        is_atomic = any(isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "atomic"
                        for i in node.items)
        self.atomic_depth += is_atomic
        self.generic_visit(node)
        self.atomic_depth -= is_atomic

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        mode = node.args[1] if name == "open" and len(node.args) > 1 else None
        writes = (name in WRITE_CALLS and (name != "save" or owner == "torch")) or (
            isinstance(mode, ast.Constant) and bool(set(str(mode.value)) & set("wax")))
        if writes and not self.atomic_depth and _root(_target(node, name)) not in self.params[-1]:
            self.found.append(f"line {node.lineno}: {name}")
        self.generic_visit(node)


def _target(call: ast.Call, name: str) -> ast.AST | None:
    """The path a write call writes to."""
    if name in ("write_text", "write_bytes"):
        return call.func.value  # type: ignore[attr-defined]
    args = call.args[1:] if name == "save" else call.args
    return args[0] if args else None


def _root(node: ast.AST | None) -> str:
    """`path` of `path`, `path / "x"` or `path.parent`."""
    while isinstance(node, (ast.BinOp, ast.Attribute)):
        node = node.left if isinstance(node, ast.BinOp) else node.value
    return getattr(node, "id", "")


def direct_writes(source: str) -> list[str]:
    v = _DirectWrites()
    v.visit(ast.parse(source))
    return v.found


def test_the_direct_write_scan_finds_what_it_looks_for():
    bad = ("def f(df, out):\n    df.to_parquet('x.parquet')\n    open('y', 'w')\n    torch.save(df, OUT)\n"
           "    (OUT / 'a').write_text('')\n")
    assert len(direct_writes(bad)) == 4
    ok = ("def f(df, path):\n    df.to_csv(path / 'x')\n    ckpt.save(df)\n    with atomic(OUT) as tmp:\n"
          "        torch.save(df, tmp)\n")
    assert direct_writes(ok) == []


def test_every_stage_writes_its_outs_through_atomic():
    offenders = {p.name: bad for p in sorted((REPO / "pipeline").glob("*.py")) if (bad := direct_writes(p.read_text()))}
    assert offenders == {}
