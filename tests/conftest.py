import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def evaluator_dir(tmp_path_factory) -> Path:
    from tests.tiny import tiny_evaluator

    return tiny_evaluator(tmp_path_factory.mktemp("assets") / "tiny-lm")


@dataclass
class Repro:
    repo: Path
    output: str  # what `dvc repro` printed
    metrics: dict  # tests.project.metrics_snapshot right after it


@pytest.fixture(scope="session")
def fresh_repro(tmp_path_factory, evaluator_dir) -> Repro:
    """The first `dvc repro` of a fresh tiny project (later tests may change the project; the snapshot stays)."""
    from tests.project import metrics_snapshot, new_project, sh

    repo = new_project(tmp_path_factory.mktemp("e2e") / "repo", evaluator_dir)
    out = sh("dvc", "repro", cwd=repo)
    return Repro(repo, out, metrics_snapshot(repo))
