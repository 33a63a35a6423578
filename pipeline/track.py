"""track: mirror params + metrics of this DVC experiment to MLflow, idempotently.

One parent run per (DVC experiment, git rev, params) and one child run per kernel. DVC's run-cache and
``dvc exp`` restore outs without running commands, so logging happens here, from the metrics files, not in
train/sample. Re-running with the same metrics changes nothing; with new metrics the runs are replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.artifacts import DISPERSION, PRIOR_METRICS, REFERENCE, REPORTS, metrics_dir, samples_path
from pipeline.common import StageError, read_json
from pipeline.results import PER_KERNEL, PER_STEPS, collect, flat_name
from semdlm.config import Params

EXPERIMENT = "semdlm"
# The experiment kind (model training, not GenAI). MLflow 3.17's UI does not consult it for the landing page: that
# follows the browser's GenAI / Model training switch (localStorage, default GenAI), so a browser that never picked
# "Model training" opens the experiment on the GenAI overview; the README's link adds workflowType=machine_learning.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def dvc_root() -> Path:
    """The original repository root, also inside the temporary copies of queued experiments (DVC_ROOT)."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else sqlite at the DVC root (absolute: queued runs work in temporary copies)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{dvc_root() / 'mlflow.db'}"


class Retrying:
    """An MlflowClient whose calls back off and retry while sqlite says "database is locked".

    Queued experiments (`dvc queue start -j N`) run `track` in parallel against one mlflow.db; sqlite lets one
    writer in at a time and a failed write is rolled back, so retrying the call loses and duplicates nothing.
    """

    def __init__(self, client: Any, tries: int = 10, base_s: float = 0.2) -> None:
        self._client, self._tries, self._base_s = client, tries, base_s

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(self._tries - 1):
                try:
                    return attr(*args, **kwargs)
                except Exception as e:
                    if "database is locked" not in str(e):
                        raise
                    time.sleep(self._base_s * 2**attempt * (1 + random.random()))
            return attr(*args, **kwargs)

        return call


@contextlib.contextmanager
def store_setup_lock(uri: str) -> Iterator[None]:
    """Serialise the set-up of a local sqlite store (tables, experiment) across processes.

    On a fresh store two parallel `track` stages (`dvc queue start -j 2`) would both create MLflow's tables
    ("table experiments already exists") or the experiment; an exclusive lock on ``<db>.lock`` lets the first
    one set up and the second find it. Tracking servers serialise this themselves: no lock.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = os.open(uri.removeprefix("sqlite:///") + ".lock", os.O_RDWR | os.O_CREAT, 0o644)  # empty, never an out
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # releases the lock


KERNEL_VIEW = "kernel-runs"  # the UI opens it at #/experiments/<id>/runs?viewStateShareKey=kernel-runs


def kernel_view(steps: list[int], now: int) -> str:
    """A saved view of the MLflow UI (experiment tag ``mlflow.sharedViewState.<id>``, listed under "Views"): the
    kernel runs only, sorted by gen PPL at the largest step count, with the headline metrics as columns."""
    metrics = ["val_ppl", "val_denoising_ppl", *(flat_name(m, s) for s in steps for m in ("gen_ppl", "entropy",
                                                                                            "revisions"))]
    state = {"searchFilter": "tags.kernel != ''", "orderByKey": f"metrics.`{flat_name('gen_ppl', max(steps))}`",
             "orderByAsc": True,
             "selectedColumns": [f"params.`sampler.{p}`" for p in ("name", "lambda_freq", "lambda_sem")]
             + [f"metrics.`{m}`" for m in metrics]}
    return json.dumps({"name": "kernel runs: val PPL, gen PPL, entropy", "createdAt": now, "updatedAt": now,
                       "state": json.dumps(state)})


def open_experiment(uri: str) -> tuple[Any, str]:
    """A retrying client of the store and the semdlm experiment's id, created (marked as model development) when
    the store has none. MlflowClient creates a fresh store's tables as it starts: it starts under the lock."""
    from mlflow.tracking import MlflowClient

    with store_setup_lock(uri):
        client = Retrying(MlflowClient(uri))
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:  # artifacts beside the db, by absolute path, unless a tracking server is configured
            store = None if os.environ.get("MLFLOW_TRACKING_URI") else (dvc_root() / "mlartifacts").as_uri()
            return client, client.create_experiment(EXPERIMENT, artifact_location=store, tags=EXPERIMENT_TAGS)
        for key, value in EXPERIMENT_TAGS.items():  # stores made before the tag existed
            if exp.tags.get(key) != value:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return client, exp.experiment_id


def git_rev() -> str:
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, tuple):
            out[key] = list(v)  # sampler.steps: logged as "[16, 48]", the form `dvc exp run -S` takes
        else:
            out[key] = v
    return out


def numbers(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


RUN_METRICS = ("val_nelbo", "val_nelbo_ctmc", "val_denoising_ce", "tokens_per_s", "train_s", "parameters",
               "train_tokens", "train_steps", "evaluate_s", *PER_KERNEL)  # one value per kernel run
# per sampling-step count, logged with MLflow's step = the step count (a kernel run's chart of gen_ppl is Fig. 7)
HISTORY_METRICS = ("gen_ppl", "entropy", "distinct_1", "distinct_2", "distinct_3", "repeated_4gram",
                   "semantic_repetition", "revisions", "below_min_entropy", "eval_tokens", "num_texts", "nfe",
                   "sample_s", "true_nll", "true_ppl", "zero_prob_share", "true_nll_minus_entropy")
DISPERSION_METRICS = ("dispersion", "mean_posterior_entropy", "grad_var_between", "grad_noise", "dispersion_s")


def kernel_metrics(rows: pd.DataFrame, disp: dict, now: int) -> list:
    """A kernel's report rows as MLflow metrics named as in results.csv. Per-step-count metrics are logged with
    step = sampling steps (the UI plots Fig. 7; the latest value is the largest step count), and the headline ones
    once more under summary.json's flat names for the runs table: gen_ppl_48steps, entropy_48steps, ... A number
    the kernel does not have (e.g. no continuous-time bound) is not logged."""
    from mlflow.entities import Metric

    def known(r: pd.Series, m: str) -> bool:
        return m in r and pd.notna(r[m])

    top = rows.loc[rows["steps"].idxmax()]
    batch = [Metric(m, float(top[m]), now, 0) for m in RUN_METRICS if known(top, m)]
    batch += [Metric(m, float(disp[m]), now, 0) for m in DISPERSION_METRICS]
    batch += [Metric(m, float(r[m]), now, int(r["steps"])) for _, r in rows.iterrows() for m in HISTORY_METRICS
              if known(r, m)]
    batch += [Metric(flat_name(m, int(r["steps"])), float(r[m]), now, 0) for _, r in rows.iterrows()
              for m in PER_STEPS if known(r, m)]
    return batch


def trained_with(kernel: str) -> dict[str, str]:
    """The package versions train@kernel recorded in its train.json (empty for a train.json from before)."""
    return read_json(metrics_dir(kernel) / "train.json", f"train@{kernel}").get("versions", {})


def version_tags(versions: dict[str, str]) -> dict[str, str]:
    return {f"versions.{name}": v for name, v in versions.items()}


def _log_child(client, exp_id: str, parent_id: str, run_name: str, tags: dict, params: dict, k: str,
               rows: pd.DataFrame, disp: dict) -> None:
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, run_name=f"{run_name}/{k}", tags={
        **tags, "mlflow.parentRunId": parent_id, "kernel": k, "sampler": str(rows["sampler"].iloc[0]),
        "evaluator": str(rows["evaluator"].iloc[0]), "eval_dtype": str(rows["eval_dtype"].iloc[0]),
        "model": str(rows["model"].iloc[0]), "kernel_type": str(rows["kernel_type"].iloc[0]),
        "bound": str(rows["bound"].iloc[0]), "bound_label": str(rows["bound_label"].iloc[0]),
        **version_tags(trained_with(k))})
    now = int(time.time() * 1000)
    batch = kernel_metrics(rows, disp, now)
    for name, cols in (("train_log.tsv", ("loss", "lr", "tokens_per_s")), ("val_log.tsv", ("val_nelbo",))):
        log = pd.read_csv(metrics_dir(k) / name, sep="\t")
        batch += [Metric(f"curve.{c}", float(r[c]), now, int(r["step"])) for _, r in log.iterrows() for c in cols]
    for i in range(0, len(batch), 900):
        client.log_batch(run.info.run_id, metrics=batch[i : i + 900])
    client.log_batch(run.info.run_id, params=[Param(key, str(v)[:500]) for key, v in params.items()])
    client.log_artifact(run.info.run_id, str(samples_path(k)))
    client.set_terminated(run.info.run_id)


def run(params: Params) -> None:
    exp_name = os.environ.get("DVC_EXP_NAME") or "workspace"
    flat = flatten({k: v for k, v in asdict(params).items()})
    results = collect(params)
    disp = read_json(DISPERSION, "dispersion")
    payloads = {"results": results.to_dict("records"), "dispersion": disp}
    reference = read_json(REFERENCE, "reference")
    prior = read_json(PRIOR_METRICS, "prior")
    rev = git_rev()
    key = hashlib.sha256(json.dumps([exp_name, rev, flat], sort_keys=True, default=str).encode()).hexdigest()[:16]
    content = hashlib.sha256(json.dumps([payloads, reference], sort_keys=True, default=str).encode()).hexdigest()[:16]
    uri = tracking_uri()
    client, exp_id = open_experiment(uri)
    existing = client.search_runs([exp_id], f"tags.`semdlm.key` = '{key}'")
    if any(r.data.tags.get("semdlm.content") == content for r in existing):
        print(f"MLflow already holds this experiment ({exp_name}, key {key}); nothing to do")
        return
    for r in existing:  # same experiment, changed metrics: replace, never duplicate
        client.delete_run(r.info.run_id)
    run_name = exp_name if exp_name != "workspace" else f"workspace@{rev[:7]}"
    tags = {"semdlm.key": key, "semdlm.content": content, "git_rev": rev, "dvc_exp": exp_name}
    per_kernel = [trained_with(k) for k in params.kernels]  # the parent carries the versions all kernels share
    shared = {n: v for n, v in per_kernel[0].items() if all(kv.get(n) == v for kv in per_kernel)}
    parent = client.create_run(exp_id, run_name=run_name, tags={**tags, "kernels": ",".join(params.kernels),
                                                                **version_tags(shared)})
    pid = parent.info.run_id
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    ref_metrics = [Metric(f"reference.{r}.{m}", v, now, 0) for r in ("heldout_text", "unigram_samples")
                   for m, v in numbers(reference[r]).items()]
    client.log_batch(pid, metrics=ref_metrics + [Metric(f"prior.{m}", v, now, 0) for m, v in numbers(prior).items()],
                     params=[Param(k, str(v)[:500]) for k, v in flat.items()])
    for path in (REPORTS / "report.md", REPORTS / "results.csv"):
        if not path.exists():
            raise StageError(f"missing {path}; run `dvc repro report` first")
        client.log_artifact(pid, str(path))
    client.log_artifacts(pid, str(REPORTS / "figures"), "figures")
    client.log_artifact(pid, str(DISPERSION))
    models = results[results["kind"] == "model"]
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{KERNEL_VIEW}",
                              kernel_view(sorted({int(n) for n in models["steps"]}), now))
    for k in params.kernels:
        _log_child(client, exp_id, pid, run_name, tags, flat, k, models[models["kernel"] == k], disp[k])
    client.set_terminated(pid)
    print(f"logged {run_name} with {len(params.kernels)} kernel run(s) to {uri}")
