"""A tiny semdlm project as a user has it (a temporary git + DVC copy of the repository) and helpers to drive it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from tests.tiny import write_params

REPO = Path(__file__).resolve().parents[1]
COPIED = ("dvc.yaml", "pipeline", "semdlm", ".dvcignore", ".gitignore", "pyproject.toml", "constraints.txt")
# Train settings of the test project: checkpoints that fall inside a log window, so a resume must restore it.
TRAIN = {"steps": 12, "ckpt_every": 3, "log_every": 2, "eval_every": 4}
KERNELS = {"mask": {}, "semdlm_plus": {"k_max": 4}}
# What a sampler-only experiment re-runs (everything upstream is reused).
SAMPLING_SIDE = {"sample@mask", "evaluate@mask", "sample@semdlm_plus", "evaluate@semdlm_plus", "summary", "report",
                 "track"}
# Keys (JSON) and columns (TSV) of the metrics files that are wall-clock measurements of the machine, not results
# of the experiment: excluded when two runs are compared (docs/reliability.md).
WALL_TIME_KEYS = frozenset({"train_s", "tokens_per_s", "sample_s", "samples_per_s", "evaluate_s", "dispersion_s"})


def env(cwd: Path) -> dict[str, str]:
    e = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(cwd),
         "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def sh(*cmd: str, cwd: Path, ok: bool = True) -> str:
    """Run ``cmd`` in the project; assert it succeeded (or, with ok=False, that it failed); stdout + stderr."""
    res = subprocess.run(cmd, cwd=cwd, env=env(cwd), capture_output=True, text=True)
    tail = f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert (res.returncode == 0) == ok, f"{' '.join(cmd)} -> {res.returncode}:\n{tail}"
    return res.stdout + res.stderr


NICE = 10  # of the background commands: the tests in the foreground keep their pace, those use the idle core time


class Background:
    """A command started now (in the project ``cwd``, with its env, niced) and collected later: the session's long
    subprocesses run while other tests do (tests/conftest.py). stdout and stderr go to the files in ``logs``."""

    def __init__(self, *cmd: str, cwd: Path, logs: Path) -> None:
        self.cmd, self.cwd = cmd, cwd
        logs.mkdir(parents=True, exist_ok=True)
        self._out, self._err = logs / "stdout.log", logs / "stderr.log"
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self.proc = subprocess.Popen(["nice", "-n", str(NICE), *cmd], cwd=cwd, env=env(cwd), stdout=out, stderr=err,
                                         start_new_session=True)

    def result(self, timeout: float = 1800) -> subprocess.CompletedProcess:
        """The finished command (whatever its exit code); a command still running after timeout s is killed."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{' '.join(self.cmd)} ran longer than {timeout} s") from None
        return subprocess.CompletedProcess(self.cmd, rc, self._out.read_text(), self._err.read_text())

    def output(self, timeout: float = 1800) -> str:
        """stdout + stderr of the finished command, as ``sh`` returns them; asserts it succeeded."""
        res = self.result(timeout)
        assert res.returncode == 0, f"{' '.join(self.cmd)} -> {res.returncode}:\n{res.stdout[-3000:]}\n" \
                                    f"{res.stderr[-3000:]}"
        return res.stdout + res.stderr

    def stop(self) -> None:
        """Kill the command and its children (a session that ends before collecting it)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Then(threading.Thread):
    """fn() in a thread from now on (a follow-up of a Background command); result() waits and re-raises."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._fn, self._value, self._error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in result)
            self._error = e

    def result(self, timeout: float = 1800) -> object:
        self.join(timeout)
        assert not self.is_alive(), f"a background follow-up ran longer than {timeout} s"
        if self._error is not None:
            raise self._error
        return self._value


def copy_of(repo: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(repo, dst, symlinks=True)
    return dst


def start_queue(baseline: Path, dst: Path) -> Path:
    """A copy of the baseline with no MLflow store yet, and two experiments, lambda_sem = 0.0 and 0.5, queued and
    started by `dvc queue start -j 2` (both `track` stages create the store at once); they run in the background."""
    repo = copy_of(baseline, dst)
    (repo / "mlflow.db").unlink()
    shutil.rmtree(repo / "mlartifacts")
    for value in ("0.0", "0.5"):
        sh("nice", "-n", str(NICE), "dvc", "exp", "run", "--queue", "-S", f"sampler.lambda_sem={value}", cwd=repo)
    # the workers are daemons that keep the stdio they inherit: with pipes, waiting for `queue start` would wait for
    # a worker that idles on after the queue is done; a log file does not hold anything up
    with open(dst / "queue-start.log", "w") as log:
        rc = subprocess.run(["nice", "-n", str(NICE), "dvc", "queue", "start", "-j", "2"], cwd=repo, env=env(repo),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    assert rc == 0, (dst / "queue-start.log").read_text()
    return repo


def stop_queue(repo: Path) -> None:
    """Stop the queue's idle workers (every task is done): no daemon outlives the test session."""
    subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env(repo), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def wait_for_queue(repo: Path, timeout: float = 480) -> str:
    """`dvc queue status` once nothing is queued or running."""
    deadline = time.monotonic() + timeout
    while any(w in (status := sh("dvc", "queue", "status", cwd=repo)) for w in ("Queued", "Running")):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    return status


def ran(output: str) -> set[str]:
    """Stages that `dvc repro` / `dvc exp run` ran (not those restored or skipped)."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def new_project(repo: Path, evaluator: Path) -> Path:
    """A git + DVC repository holding the pipeline code and tiny params (nothing run yet)."""
    repo.mkdir(parents=True)
    for name in COPIED:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    for cache in repo.rglob("__pycache__"):
        shutil.rmtree(cache)
    write_params(repo / "params.yaml", evaluator, kernels=KERNELS, train=TRAIN)
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "config", "core.analytics", "false", cwd=repo)
    shutil.copytree(REPO / ".dvc/plots", repo / ".dvc/plots")  # the plot templates dvc.yaml names
    commit(repo, "init")
    return repo


def commit(repo: Path, message: str) -> None:
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", message, cwd=repo)


def mlflow_runs(repo: Path):
    """(parent runs, child runs) of the project's MLflow experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("semdlm")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def metrics_snapshot(repo: Path) -> dict[str, object]:
    """Every metrics file under metrics/ with the wall-time keys and columns removed, by relative path."""
    snap: dict[str, object] = {}
    for path in sorted((repo / "metrics").rglob("*")):
        rel = str(path.relative_to(repo))
        if path.suffix == ".json":
            snap[rel] = _drop_wall(json.loads(path.read_text()))
        elif path.suffix == ".tsv":
            df = pd.read_csv(path, sep="\t")
            snap[rel] = df.drop(columns=[c for c in df.columns if c in WALL_TIME_KEYS]).to_dict("list")
    return snap


def _drop_wall(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _drop_wall(v) for k, v in obj.items() if k not in WALL_TIME_KEYS}
    return obj
