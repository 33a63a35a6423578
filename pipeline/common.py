"""Shared stage plumbing: one-line errors with exit code 2, atomic writes, safe reads of upstream outs."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from semdlm.config import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_BAD_INPUT = 2


class StageError(RuntimeError):
    """A stage cannot run on its inputs; the message says what is wrong and how to fix it."""


def stage(fn: F) -> F:
    """Run a stage body; turn known failures into one line on stderr and exit code 2 (nothing written)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, StageError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


def require(path: str | Path, stage_name: str) -> Path:
    """An upstream file that must exist; else say which stage makes it."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"missing upstream file {path}; run `dvc repro {stage_name}` first")
    return path


def read_parquet(path: str | Path, stage_name: str) -> pd.DataFrame:
    path = require(path, stage_name)
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise StageError(
            f"{path} is unreadable ({e.__class__.__name__}); delete it and run `dvc repro {stage_name}`"
        ) from None


def read_json(path: str | Path, stage_name: str) -> Any:
    path = require(path, stage_name)
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        raise StageError(f"{path} is not valid JSON; delete it and run `dvc repro {stage_name}`") from None


TMP_SUFFIX = ".partial"  # temp siblings of outs; ignored by DVC and git (.dvcignore, .gitignore)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(path: Path) -> None:
    """Remove temp siblings of ``path`` left by writers that were killed (their pid is gone)."""
    for old in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        pid = old.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``path``, on failure remove it.

    A reader (or DVC) never sees a half-written file or directory at ``path``; a writer killed by SIGKILL
    leaves only ``.<name>.<pid>.*.partial/``, which DVC ignores and the next write of ``path`` removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp_dir) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(path: str | Path, df: pd.DataFrame) -> None:
    with atomic(path) as tmp:
        df.to_parquet(tmp, index=False)

