import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def evaluator_dir(tmp_path_factory) -> Path:
    from tests.tiny import tiny_evaluator

    return tiny_evaluator(tmp_path_factory.mktemp("assets") / "tiny-lm")


@pytest.fixture(scope="session", autouse=True)
def started(request, tmp_path_factory) -> Iterator[dict]:
    """The session's long subprocesses, started at once in the background (niced: the tests in the foreground keep
    their pace) for the selected tests that use them, so that they run while other tests do: the first `dvc repro`
    of a fresh tiny project ("fresh", fixture fresh_repro), a second one with the same params, committed ("second",
    test_reliability.baseline), then its queued experiments ("queue", test_reliability.queued), and
    `benchmarks/gpu_check.sh --dry-run` ("gpu_check_dry_run")."""
    from tests.project import Background, Then, new_project, start_queue

    used = set().union(*(getattr(item, "fixturenames", ()) for item in request.session.items))
    jobs: dict = {}
    repro_commit = ["bash", "-c", "dvc repro && git add -A && git commit -qm results"]
    needs = {"fresh": {"fresh_repro"}, "second": {"baseline", "queued"}}  # the queue starts from the second repro
    for name, cmd in (("fresh", ["dvc", "repro"]), ("second", repro_commit)):
        if needs[name] & used:
            repo = new_project(tmp_path_factory.mktemp(name) / "repo", request.getfixturevalue("evaluator_dir"))
            jobs[name] = Background(*cmd, cwd=repo, logs=repo.parent / "logs")
    if "queued" in used:
        second, queue_dir = jobs["second"], tmp_path_factory.mktemp("queued")
        jobs["queue"] = Then(lambda: (second.output(), start_queue(second.cwd, queue_dir))[1])
    if "gpu_check_dry_run" in used:
        results = tmp_path_factory.mktemp("gpu_check")
        jobs["gpu_check_dry_run"] = Background("bash", str(REPO / "benchmarks/gpu_check.sh"), "--dry-run", "--results",
                                               str(results), cwd=REPO, logs=tmp_path_factory.mktemp("gpu_check_logs"))
        jobs["gpu_check_dry_run"].results = results
    yield jobs
    for job in jobs.values():
        if isinstance(job, Background):
            job.stop()


@dataclass
class Repro:
    repo: Path
    output: str  # what `dvc repro` printed
    metrics: dict  # tests.project.metrics_snapshot right after it


@pytest.fixture(scope="session")
def fresh_repro(started) -> Repro:
    """The first `dvc repro` of a fresh tiny project (later tests may change the project; the snapshot stays)."""
    from tests.project import metrics_snapshot

    job = started["fresh"]
    out = job.output()
    return Repro(job.cwd, out, metrics_snapshot(job.cwd))


@pytest.fixture(scope="session")
def gpu_check_dry_run(started):
    """(the finished `benchmarks/gpu_check.sh --dry-run --results DIR`, DIR)."""
    job = started["gpu_check_dry_run"]
    return job.result(timeout=1800), job.results
