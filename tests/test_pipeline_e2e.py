"""End to end: `dvc repro` of tiny params in a temporary git copy of the repository, as a user runs it."""

from __future__ import annotations

import pytest

from tests.project import SAMPLING_SIDE, mlflow_runs, ran, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(fresh_repro):
    return fresh_repro.repo


def test_repro_makes_every_out_and_leaves_a_clean_status(project, fresh_repro):
    out = fresh_repro.output
    assert {"tokenize", "graph", "prior", "train@mask", "sample@mask", "evaluator_lm", "evaluate@mask", "reference",
            "report", "track", "train@semdlm_plus", "sample@semdlm_plus", "evaluate@semdlm_plus",
            "dispersion"} <= ran(out)
    for path in ("data/tokens/train/part-00000.parquet", "data/tokens/vocab.json", "data/graph/neighbours.parquet",
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
    assert "semdlm_plus" in report and "gen PPL protocol `windows`" in report and "packing `cls_sep`" in report
    assert "paper: LM1B" not in report and "No paper column" in report  # the tiny project is bbcnews, not LM1B


def test_track_again_does_not_duplicate_runs(project):
    sh("dvc", "repro", "track", cwd=project)
    parents, children = mlflow_runs(project)
    assert len(parents) == 1 and len(children) == 2


# sampler.lambda_sem=0.5 is covered by tests/test_reliability.py's queued experiments (same assertions)
@pytest.mark.parametrize("setting", ["sampler.steps=3"])
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
