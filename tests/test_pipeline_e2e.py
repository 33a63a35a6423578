"""End to end: `dvc repro` of tiny params in a temporary git copy of the repository, as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.tiny import tiny_evaluator, write_params

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sh(*cmd: str, cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(cwd),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    evaluator = tiny_evaluator(root / "tiny-lm")
    repo = root / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "pipeline", "semdlm", ".dvcignore", "pyproject.toml"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    for cache in repo.rglob("__pycache__"):
        shutil.rmtree(cache)
    write_params(repo / "params.yaml", evaluator, kernels={"mask": {}, "semdlm_plus": {"k_max": 4}})
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "config", "core.analytics", "false", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "init", cwd=repo)
    return repo


def mlflow_runs(repo: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("semdlm")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_repro_makes_every_out_and_leaves_a_clean_status(project):
    out = sh("dvc", "repro", cwd=project)
    assert {"tokenize", "graph", "prior", "train@mask", "sample@mask", "evaluator", "evaluate@mask", "reference",
            "report", "track", "train@semdlm_plus", "sample@semdlm_plus", "evaluate@semdlm_plus",
            "dispersion"} <= ran(out)
    for path in ("data/tokens/train.parquet", "data/tokens/vocab.json", "data/graph/neighbours.parquet",
                 "data/prior/unigram.parquet", "models/mask/model.pt", "checkpoints/mask/state.pt",
                 "metrics/mask/train.json", "metrics/mask/train_log.tsv", "samples/mask/samples.parquet",
                 "metrics/mask/eval.json", "metrics/reference.json", "reports/report.md", "reports/results.csv",
                 "reports/figures/training.png", "reports/figures/genppl_entropy.png",
                 "reports/figures/genppl_steps.png", "reports/figures/dispersion.png", "metrics/dispersion.json"):
        assert (project / path).exists(), path
    status = sh("dvc", "status", cwd=project)
    assert [ln.strip() for ln in status.splitlines() if ln.strip()] == ["track:", "always changed"], status
    parents, children = mlflow_runs(project)
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["kernel"] for c in children} == {"mask", "semdlm_plus"}
    for child in children:
        for key in ("val_nelbo", "gen_ppl", "entropy", "tokens_per_s", "nfe", "dispersion"):
            assert key in child.data.metrics
        assert child.data.params["sampler.steps"] == "4"
    report = (project / "reports/report.md").read_text()
    assert "semdlm_plus" in report and "paper: LM1B test PPL" in report


def test_track_again_does_not_duplicate_runs(project):
    sh("dvc", "repro", "track", cwd=project)
    parents, children = mlflow_runs(project)
    assert len(parents) == 1 and len(children) == 2


SAMPLING_SIDE = {"sample@mask", "evaluate@mask", "sample@semdlm_plus", "evaluate@semdlm_plus", "report", "track"}


@pytest.mark.parametrize("setting", ["sampler.steps=3", "sampler.lambda_sem=0.5"])
def test_changing_a_sampler_param_reruns_only_the_sampling_side(project, setting):
    before = len(mlflow_runs(project)[0])
    out = sh("dvc", "exp", "run", "-S", setting, cwd=project)
    assert ran(out) == SAMPLING_SIDE, out
    parents, children = mlflow_runs(project)
    assert len(parents) == before + 1 and len(children) == 2 * (before + 1)
    key, value = setting.split("=")
    newest = max(parents, key=lambda r: r.info.start_time)
    assert newest.data.params[key] == value
    sh("git", "checkout", "params.yaml", cwd=project)
