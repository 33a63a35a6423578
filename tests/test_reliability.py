"""Reliability of the DVC pipeline as a user runs it: SIGKILL and resume, atomic outs, queued experiments in
parallel, determinism of fresh runs. Each test drives a temporary git + DVC project (tests/project.py)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.project import (
    REPO,
    SAMPLING_SIDE,
    commit,
    copy_of,
    env,
    metrics_snapshot,
    mlflow_runs,
    ran,
    sh,
    stop_queue,
    wait_for_queue,
)

pytestmark = pytest.mark.slow
FAULTS = REPO / "tests" / "faults.py"


@pytest.fixture(scope="module")
def baseline(started) -> Path:
    """A second fresh project with the same params as the session's first one, reproduced and committed (in the
    background from the session's start, tests/conftest.py)."""
    job = started["second"]
    job.output()
    return job.cwd


def set_param(repo: Path, section: str, key: str, value: object) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def start_slowed(repo: Path, *args: str, **slow: str) -> subprocess.Popen:
    """`python -m pipeline <args>` in the project, slowed by tests/faults.py (SEMDLM_SLOW_TICK / _WRITE)."""
    return subprocess.Popen([sys.executable, str(FAULTS), *args], cwd=repo, env={**env(repo), **slow},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(repo: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := sorted(repo.glob(pattern)):
            return found[0]
        assert proc.poll() is None, f"the stage exited ({proc.returncode}) before {pattern} appeared"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{pattern} did not appear within {timeout} s")


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def forget_cached_out(repo: Path, out: str) -> None:
    """Remove ``out`` and DVC's cached copy of it (as if the stage making it had never finished)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    md5 = next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == out)
    (repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).unlink()
    shutil.rmtree(repo / ".dvc/cache/runs", ignore_errors=True)
    (repo / out).unlink()


def status_lines(repo: Path) -> list[str]:
    return [ln.strip() for ln in sh("dvc", "status", cwd=repo).splitlines() if ln.strip()]


def test_two_fresh_repros_write_identical_metrics_files(fresh_repro, baseline):
    """Determinism: every metrics file of two fresh projects with the same params + seed is equal, wall-time keys
    (tests.project.WALL_TIME_KEYS) excluded."""
    ours = metrics_snapshot(baseline)
    assert set(ours) == set(fresh_repro.metrics)
    assert len(ours) >= 9  # prior, reference, and train/val logs + train/sample/eval of both kernels
    for path, content in ours.items():
        assert content == fresh_repro.metrics[path], path


def test_train_killed_after_a_checkpoint_resumes_under_dvc_repro_to_the_uninterrupted_result(baseline, tmp_path):
    repo = copy_of(baseline, tmp_path)
    full = torch.load(repo / "models/mask/model.pt", weights_only=True)["state_dict"]
    expected = metrics_snapshot(repo)
    shutil.rmtree(repo / "checkpoints/mask")
    forget_cached_out(repo, "models/mask/model.pt")  # this training never finished: DVC has no model to restore
    proc = start_slowed(repo, "train", "--kernel", "mask", SEMDLM_SLOW_TICK="0.25")
    wait_for(repo, "checkpoints/mask/state.pt", proc)
    delay = random.uniform(0.0, 1.5)  # a random later step: 0.25 s per step, the run has 9 more steps to go
    time.sleep(delay)
    sigkill(proc)
    step = torch.load(repo / "checkpoints/mask/state.pt", weights_only=True)["step"]
    assert 3 <= step < 12 and not (repo / "models/mask/model.pt").exists(), (step, delay)

    out = sh("dvc", "repro", cwd=repo)
    assert f"resuming mask from step {step}" in out, out
    # the resumed model.pt has the hash in dvc.lock of the uninterrupted run: DVC does not re-run its consumers
    assert "train@mask" in ran(out) and "sample@mask" not in ran(out), (delay, ran(out))
    resumed = torch.load(repo / "models/mask/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[k], full[k]) for k in full), delay
    assert metrics_snapshot(repo) == expected, delay  # final loss, logs and validation bound: bitwise equal
    assert status_lines(repo) == ["track:", "always changed"]


@pytest.mark.parametrize(("stage", "out", "section", "key", "value"), [
    ("sample", "samples/mask/samples.parquet", "sampler", "steps", 3),
    ("evaluate", "metrics/mask/eval.json", "eval", "batch_size", 3),
])
def test_stage_killed_while_writing_its_out_leaves_the_previous_out(baseline, tmp_path, stage, out, section, key,
                                                                      value):
    repo = copy_of(baseline, tmp_path)
    before = (repo / out).read_bytes()
    set_param(repo, section, key, value)
    proc = start_slowed(repo, stage, "--kernel", "mask", SEMDLM_SLOW_WRITE="300")
    name = Path(out).name
    wait_for(repo, f"{Path(out).parent}/.{name}.*.partial/{name}", proc)  # the new out is complete, not renamed
    sigkill(proc)
    assert (repo / out).read_bytes() == before
    assert f"{stage}@mask:" in status_lines(repo)  # the params changed and the stage did not finish: not up to date
    sh("git", "checkout", "params.yaml", cwd=repo)
    # with the old params the previous out is the good one; the killed writer's temp is invisible to DVC
    assert status_lines(repo) == ["track:", "always changed"]


@pytest.mark.parametrize("where", ["while writing samples.parquet", "between samples.parquet and sample.json"])
def test_exception_mid_stage_leaves_whole_outs_and_dvc_status_says_changed(baseline, tmp_path, monkeypatch, where):
    from typer.testing import CliRunner

    import pipeline.sample
    from pipeline.__main__ import app

    repo = copy_of(baseline, tmp_path)
    samples, sample_json = repo / "samples/mask/samples.parquet", repo / "metrics/mask/sample.json"
    before = samples.read_bytes(), sample_json.read_bytes()
    set_param(repo, "sampler", "steps", 3)
    if where.startswith("while"):
        def half_then_fail(self, path, *args, **kwargs):  # noqa: ANN001, ANN202
            Path(path).write_bytes(before[0][: len(before[0]) // 2])
            raise OSError("No space left on device")

        monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_fail)
    else:
        def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise OSError("No space left on device")

        monkeypatch.setattr(pipeline.sample, "write_json", fail)
    monkeypatch.chdir(repo)
    assert CliRunner().invoke(app, ["sample", "--kernel", "mask"]).exit_code != 0
    monkeypatch.undo()
    if where.startswith("while"):
        assert samples.read_bytes() == before[0]
    else:
        assert len(pd.read_parquet(samples)) == 4 and samples.read_bytes() != before[0]  # whole, and new
    assert sample_json.read_bytes() == before[1]
    assert not list(repo.rglob("*.partial"))  # an exception (unlike SIGKILL) cleans its temp up
    assert "sample@mask:" in status_lines(repo)


def experiments(repo: Path) -> dict[str, dict]:
    """{experiment name: {"params": params.yaml, "metrics": {path: data}}} of `dvc exp show --json` (no baseline)."""
    found: dict[str, dict] = {}
    for baseline_rev in json.loads(sh("dvc", "exp", "show", "--json", cwd=repo)):
        for exp in baseline_rev.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                found[rev["name"]] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": {p: m.get("data", {}) for p, m in (data.get("metrics") or {}).items()},
                }
    return found


@pytest.fixture(scope="module")
def queued(started) -> Path:
    """A copy of the baseline whose two queued experiments (tests.project.start_queue, started in the background as
    soon as the baseline was committed) are done."""
    repo = started["queue"].result()
    status = wait_for_queue(repo)
    stop_queue(repo)
    assert status.count("Success") == 2, status
    return repo


def test_two_queued_experiments_run_in_parallel_and_land_apart_in_mlflow(queued):
    repo = queued
    exps = experiments(repo)
    by_lambda = {e["params"]["sampler"]["lambda_sem"]: (name, e) for name, e in exps.items()}
    assert len(exps) == 2 and set(by_lambda) == {0.0, 0.5}, exps
    parents, children = mlflow_runs(repo)
    new = {p.data.tags["dvc_exp"]: p for p in parents}
    assert len(parents) == 2 and len(new) == 2
    for lam, (name, e) in by_lambda.items():
        # the trained models are reused; lambda_sem=0.0 is the baseline's value, so only `track` (always changed) runs
        assert ran(sh("dvc", "queue", "logs", name, cwd=repo)) == (SAMPLING_SIDE if lam else {"track"})
        parent = new[name]
        assert parent.info.status == "FINISHED" and parent.data.params["sampler.lambda_sem"] == str(lam)
        kids = {c.data.tags["kernel"]: c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id}
        assert set(kids) == {"mask", "semdlm_plus"}
        summary = e["metrics"]["results/summary.json"]
        for k, child in kids.items():  # each child holds its own experiment's numbers, complete
            assert child.info.status == "FINISHED"
            assert child.data.params["sampler.lambda_sem"] == str(lam)
            assert child.data.metrics["gen_ppl"] == child.data.metrics["gen_ppl_4steps"] == summary[k]["gen_ppl_4steps"]
            assert child.data.metrics["val_ppl"] == summary[k]["val_ppl"]
            assert "curve.loss" in child.data.metrics


def test_exp_show_only_changed_and_exp_diff_fit_one_screen(queued):
    """Two experiments that differ only in sampler.lambda_sem: the changed param and, per kernel, gen PPL and
    entropy at each step count (+ the validation PPL with --keep), no wall time, no string."""
    repo = queued
    summaries = [e["metrics"]["results/summary.json"] for e in experiments(repo).values()]
    per_kernel = [f"{k}.{m}_4steps" for k in ("mask", "semdlm_plus") for m in ("gen_ppl", "entropy")
                  if summaries[0][k][f"{m}_4steps"] != summaries[1][k][f"{m}_4steps"]]  # --only-changed drops equal
    assert len(per_kernel) >= 2, summaries
    header = sh("dvc", "exp", "show", "--only-changed", "--csv", cwd=repo).splitlines()[0].split(",")
    assert len(header) <= 40 and "sampler.lambda_sem" in header and set(per_kernel) <= set(header), header
    kept = sh("dvc", "exp", "show", "--only-changed", "--keep", ".*val_ppl", "--csv", cwd=repo).splitlines()[0]
    assert len(kept.split(",")) <= 40 and {"mask.val_ppl", "semdlm_plus.val_ppl"} <= set(kept.split(",")), kept
    assert not [c for c in header if c.endswith(("_s", "seconds", "tokens_per_s", "kernel", "bound"))], header
    name = next(n for n, e in experiments(repo).items() if e["params"]["sampler"]["lambda_sem"] == 0.5)
    diff = sh("dvc", "exp", "diff", "HEAD", name, cwd=repo).strip().splitlines()
    assert len(diff) <= 15, diff
    for key in [*per_kernel, "sampler.lambda_sem"]:
        assert any(key in line.split() for line in diff), (key, diff)


def test_exp_diff_at_the_default_params_prints_a_row_per_kernel_step_count_and_metric(tmp_path):
    """docs/experiments.md: with the embedded default (4 kernels, sampler.steps [16, 48]) a lambda_sem experiment
    changes gen PPL, entropy, semantic repetition and revisions of every kernel at every step count (mask's
    revisions stay 0), and `dvc exp diff` (no target or key filter in DVC 3) prints a row per changed leaf:
    (4 x 4 - 1) x 2 + 4 = 34 lines. The repository's dvc.yaml and params.yaml, the summary layout of
    pipeline.summary, made-up numbers: no stage runs."""
    from pipeline.summary import SUMMARY, summary

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    kernels, steps = list(params["kernels"]), params["sampler"]["steps"]
    assert (len(kernels), len(steps)) == (4, 2), (kernels, steps)  # the default the docs measure

    def results(lam: float) -> None:
        df = pd.DataFrame([{"kernel": k, "steps": s, "val_ppl": 600.0 + i, "val_denoising_ppl": 300.0 + i,
                            "gen_ppl": 1500.0 + 100 * lam + s + i, "entropy": 3.8 + lam / 10 + i / 100,
                            "revisions": 0.0 if k == "mask" else 2.0 + lam + i, "semantic_repetition": 0.3 + lam / 10}
                           for i, k in enumerate(kernels) for s in steps])
        (repo / SUMMARY).parent.mkdir(exist_ok=True)
        (repo / SUMMARY).write_text(json.dumps(summary(df)))

    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    results(0.0)
    commit(repo, "baseline")
    set_param(repo, "sampler", "lambda_sem", 0.5)
    results(0.5)
    commit(repo, "lambda_sem 0.5")
    diff = sh("dvc", "exp", "diff", "HEAD~1", "HEAD", cwd=repo).strip().splitlines()
    changed = [f"{k}.{m}_{s}steps" for k in kernels for s in steps
               for m in ("gen_ppl", "entropy", "semantic_repetition", "revisions") if (k, m) != ("mask", "revisions")]
    rows = [line.split()[1] for line in diff if line.startswith(str(SUMMARY))]
    assert sorted(rows) == sorted(changed), diff
    assert [line.split()[:2] for line in diff if line.startswith("params.yaml")] == [["params.yaml",
                                                                                       "sampler.lambda_sem"]], diff
    assert len(diff) == len(changed) + 4 == 34, diff  # + 2 headers, a blank line, the param


def test_a_typo_in_a_dash_s_key_stops_dvc_exp_run_naming_the_key(baseline, tmp_path):
    """DVC refuses to override a key that params.yaml lacks; forced in with `+key`, our parser names the fix."""
    repo = copy_of(baseline, tmp_path)
    samples = repo / "samples/mask/samples.parquet"
    before = samples.read_bytes()
    out = sh("dvc", "exp", "run", "-S", "sampler.lamda_sem=0.5", cwd=repo, ok=False)
    assert "sampler.lamda_sem" in out, out
    out = sh("dvc", "exp", "run", "-S", "+sampler.lamda_sem=0.5", cwd=repo, ok=False)
    assert "error: unknown key sampler.lamda_sem in params.yaml; did you mean sampler.lambda_sem?" in out, out
    assert not samples.exists() or samples.read_bytes() == before  # DVC may remove an out before running its stage
