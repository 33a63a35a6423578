"""report, track, compare and an MLflow server on a tiny workspace built in-process by the stage commands."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.__main__ import app
from tests.tiny import tiny_evaluator, write_params

GRID = [(0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5)]  # (lambda_freq, lambda_sem)


def invoke(*args: str) -> None:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output


def bad_input(*args: str) -> str:
    """The one line a command prints on bad input (exit code 2, no traceback)."""
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    return res.output.strip()


def set_sampler(ws: Path, **values) -> None:
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["sampler"].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """tokenize .. report for the mask kernel at sampling steps [2, 4]."""
    root = tmp_path_factory.mktemp("report")
    evaluator = tiny_evaluator(root / "tiny-lm")
    ws = root / "ws"
    ws.mkdir()
    write_params(ws / "params.yaml", evaluator, sampler={"steps": [2, 4]}, dispersion={"times": 3, "sequences": 2})
    old = os.getcwd()
    os.chdir(ws)
    try:
        for cmd in (["tokenize"], ["prior"], ["graph"], ["train", "-k", "mask"], ["dispersion"],
                    ["sample", "-k", "mask"], ["evaluator-lm"], ["evaluate", "-k", "mask"], ["reference"], ["report"]):
            invoke(*cmd)
        yield ws
    finally:
        os.chdir(old)


def test_report_has_both_tables_and_every_figure(ws):
    report = (ws / "reports/report.md").read_text()
    assert "ours: gen PPL @2 (windows)" in report and "ours: gen PPL @4 (windows)" in report
    assert "held-out text (floor)" in report and "D(Q)" in report
    assert "paper: LM1B" not in report and "paper: OWT" not in report  # bbcnews is neither LM1B nor OWT
    assert "No paper column" in report
    for fig in ("training", "genppl_entropy", "genppl_steps", "dispersion"):
        assert (ws / f"reports/figures/{fig}.png").stat().st_size > 0
        assert f"figures/{fig}.png" in report
    results = pd.read_csv(ws / "reports/results.csv")
    assert sorted(results[results["kind"] == "model"]["steps"]) == [2, 4]
    disp = json.loads((ws / "metrics/dispersion.json").read_text())["mask"]
    assert len(disp["posterior_entropy"]) == 3 and disp["dispersion"] >= 0


def test_report_rebuilt_from_the_same_metrics_is_byte_identical(ws):
    first = (ws / "reports/report.md").read_bytes()
    invoke("report")
    assert (ws / "reports/report.md").read_bytes() == first


def test_summary_holds_the_bounds_and_per_step_count_gen_ppl_entropy_and_repair_per_kernel_and_nothing_else(ws):
    invoke("summary")
    summary = json.loads((ws / "results/summary.json").read_text())
    train = json.loads((ws / "metrics/mask/train.json").read_text())
    evals = json.loads((ws / "metrics/mask/eval.json").read_text())["by_steps"]
    samples = json.loads((ws / "metrics/mask/sample.json").read_text())["by_steps"]
    assert summary == {"mask": {
        "val_ppl": train["val_ppl"], "val_ppl_ctmc": math.exp(train["val_nelbo_ctmc"]),
        "val_denoising_ppl": train["val_denoising_ppl"],
        **{f"{m}_{s}steps": evals[s][m] for s in ("2", "4") for m in ("gen_ppl", "entropy")},
        **{f"{m}_{s}steps": samples[s][m] for s in ("2", "4") for m in ("revisions", "semantic_repetition")}}}
    generation = pd.read_csv(ws / "results/generation.tsv", sep="\t")
    assert list(generation["steps"]) == [2, 4] and list(generation["kernel"]) == ["mask", "mask"]


def test_rows_below_min_entropy_are_marked_not_hidden_where_the_threshold_can_be_met(ws):
    for threshold in (100.0, 2.7, 0.0):  # 16-token samples: entropy <= ln 16 = 2.77, so 100 is not applied
        p = yaml.safe_load((ws / "params.yaml").read_text())
        p["eval"]["min_entropy"] = threshold
        (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        invoke("evaluate", "-k", "mask")
        invoke("reference")
        invoke("report")
        lines = (ws / "reports/report.md").read_text().splitlines()
        table3 = "| kernel | model | ours: gen PPL @2"
        header = next(i for i, ln in enumerate(lines) if ln.startswith(table3))
        row = lines[header + 2]
        assert row.startswith("| mask | ")
        by_steps = json.loads((ws / "metrics/mask/eval.json").read_text())["by_steps"]
        expected = sum(r["entropy"] < threshold for r in by_steps.values()) if threshold < 2.77 else 0
        assert row.count(" * |") == expected, row
        assert ("threshold is **not applied**" in "\n".join(lines)) == (threshold > 2.78)
    p["eval"]["min_entropy"] = 4.8
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.fixture(scope="module")
def tracked(ws) -> Path:
    """A lambda_freq x lambda_sem grid, each point re-sampled, re-evaluated, reported and tracked as a DVC exp."""
    old = os.environ.get("DVC_EXP_NAME")
    for lf, ls in GRID:
        set_sampler(ws, lambda_freq=lf, lambda_sem=ls)
        for cmd in (["sample", "-k", "mask"], ["evaluate", "-k", "mask"]):  # track reads the metrics, not report.md
            invoke(*cmd)
        os.environ["DVC_EXP_NAME"] = f"exp-f{lf}-s{ls}"
        try:
            invoke("track")
        finally:
            os.environ.pop("DVC_EXP_NAME")
    if old is not None:
        os.environ["DVC_EXP_NAME"] = old
    set_sampler(ws, lambda_freq=0.0, lambda_sem=0.0)
    return ws / "mlflow.db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def mlflow_ui(tracked, tmp_path_factory) -> Iterator[str]:
    """`mlflow ui` on the tracked store, as docs/experiments.md starts it; yields its base URL once /health answers."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{tracked}", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--default-artifact-root", str(tmp_path_factory.mktemp("art"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:  # uvicorn may wait on a browser's keep-alive connection
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def test_mlflow_server_lists_two_experiments_that_differ_only_in_lambda_sem(mlflow_ui):
    with urllib.request.urlopen(f"{mlflow_ui}/api/2.0/mlflow/experiments/get-by-name?experiment_name=semdlm") as r:
        exp = json.loads(r.read())["experiment"]
    found = api(mlflow_ui, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [exp["experiment_id"]],
        "filter": "params.`sampler.lambda_freq` = '0.0' and tags.kernel = 'mask'"})["runs"]
    by_sem = {}
    for run in found:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        by_sem[params["sampler.lambda_sem"]] = run
    assert set(by_sem) == {"0.0", "0.5"}
    for ls, run in by_sem.items():
        assert run["info"]["run_name"] == f"exp-f0.0-s{ls}/mask"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        for key in ("gen_ppl", "entropy", "distinct_2", "val_nelbo", "dispersion", "grad_var_between",
                    "gen_ppl_2steps", "gen_ppl_4steps", "entropy_4steps"):
            assert key in metrics, key
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert {"kernel", "sampler", "evaluator", "git_rev", "dvc_exp"} <= set(tags)


def test_compare_builds_the_cross_experiment_table_and_the_penalty_heatmaps(tracked, tmp_path):
    out = tmp_path / "compare"
    invoke("compare", "--out", str(out), "--tracking-uri", f"sqlite:///{tracked}")
    df = pd.read_csv(out / "compare.csv")
    mask = df[df["kernel"] == "mask"]
    assert set(zip(mask["lambda_freq"], mask["lambda_sem"], strict=True)) == set(GRID)
    assert sorted(mask["steps"].unique()) == [2, 4]
    assert mask["gen_ppl"].notna().all() and mask["entropy"].notna().all()
    for name in ("genppl_steps.png", "genppl_entropy.png", "heatmap_gen_ppl_mask.png", "heatmap_entropy_mask.png"):
        assert (out / name).stat().st_size > 0, name
    assert "heatmap_gen_ppl_mask.png" in (out / "compare.md").read_text()


def test_experiment_is_marked_model_training_and_flat_gen_ppl_names_equal_the_step_history(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked}")
    exp = client.get_experiment_by_name("semdlm")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.search_runs([exp.experiment_id], "tags.kernel = 'mask'")[0]
    for metric in ("gen_ppl", "entropy"):
        history = {h.step: h.value for h in client.get_metric_history(run.info.run_id, metric)}
        assert {steps: run.data.metrics[f"{metric}_{steps}steps"] for steps in (2, 4)} == history


def test_every_run_records_the_package_versions_its_model_was_trained_with(tracked):
    """train.json names the versions (and the lock's hash) it ran with; MLflow's kernel runs carry them as tags,
    and the parent run those that every kernel shares."""
    from importlib import metadata

    from mlflow.tracking import MlflowClient

    trained = json.loads((tracked.parent / "metrics/mask/train.json").read_text())["versions"]
    assert trained["torch"] == metadata.version("torch") and trained["transformers"] == metadata.version("transformers")
    assert {"python", "semdlm", "numpy", "dvc", "mlflow", "constraints.txt"} <= set(trained)
    client = MlflowClient(f"sqlite:///{tracked}")
    exp = client.get_experiment_by_name("semdlm")
    run = client.search_runs([exp.experiment_id], "tags.kernel = 'mask'")[0]
    assert {k.removeprefix("versions."): v for k, v in run.data.tags.items() if k.startswith("versions.")} == trained
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["versions.torch"] == trained["torch"]


def test_compare_x_plots_val_ppl_and_gen_ppl_against_a_param_that_varies(tracked, tmp_path):
    out = tmp_path / "compare"
    invoke("compare", "--out", str(out), "--tracking-uri", f"sqlite:///{tracked}", "--x", "sampler.lambda_sem")
    swept = pd.read_csv(out / "sweep_sampler.lambda_sem.csv")
    assert list(swept.columns) == ["kernel", "sampler.lambda_sem", "val_ppl", "gen_ppl_2steps", "gen_ppl_4steps"]
    assert list(swept["sampler.lambda_sem"]) == [0.0, 0.5]  # newest run per value, sorted numerically
    assert swept[["val_ppl", "gen_ppl_2steps", "gen_ppl_4steps"]].notna().all().all()
    assert (out / "sweep_sampler.lambda_sem.png").stat().st_size > 0
    assert "sweep_sampler.lambda_sem.png" in (out / "compare.md").read_text()


@pytest.mark.parametrize(("case", "fragment"), [
    ("missing store", "no MLflow store at"),
    ("empty store", "no MLflow experiment 'semdlm'"),
    ("--x names no param", "no tracked run has the param 'kernels.semdlm_plus.gama'"),
    ("--x does not vary", "param model.d_model does not vary across the tracked runs"),
])
def test_compare_bad_input_is_one_line_naming_it_and_writes_nothing(tracked, tmp_path, case, fragment):
    from mlflow.tracking import MlflowClient

    db = {"missing store": tmp_path / "none" / "mlflow.db", "empty store": tmp_path / "mlflow.db"}.get(case, tracked)
    if case == "empty store":
        MlflowClient(f"sqlite:///{db}").search_experiments()  # creates the tables, no experiment
    x = {"--x names no param": ["--x", "kernels.semdlm_plus.gama"], "--x does not vary": ["--x", "model.d_model"]}
    line = bad_input("compare", "--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{db}",
                     *x.get(case, []))
    assert line.startswith("error: ") and fragment in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "none").exists()


def test_mlflow_ui_in_headless_chromium_lists_the_kernel_runs_with_gen_ppl(tracked, mlflow_ui, tmp_path):
    """The walkthrough of docs/experiments.md in a browser that never opened MLflow: the link (saved view
    `kernel-runs`, set by track, model-training workflow) lists every kernel run with its gen PPL per step count.
    The plain experiment page opens on MLflow 3.17's GenAI overview (the UI takes the workflow from the browser, not
    from the experiment's tags); its clicks ("Got it", "Model training", Views > the kernel view) lead to the same
    table, and the browser keeps "Model training": the plain page then opens on the runs."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    from mlflow.tracking import MlflowClient

    from tests.browser import Browser

    client = MlflowClient(f"sqlite:///{tracked}")
    exp_id = client.get_experiment_by_name("semdlm").experiment_id
    kernel_runs = client.search_runs([exp_id], "tags.kernel = 'mask'")
    assert len(kernel_runs) == len(GRID)
    view = "kernel runs: val PPL, gen PPL, entropy"

    def assert_kernel_table(text: str) -> None:
        cells = {line.strip() for line in text.splitlines()}
        assert "gen_ppl_4steps" in cells and "gen_ppl_2steps" in cells, f"no gen PPL column:\n{text}"
        for run in kernel_runs:  # the run's name and its gen PPL values, as table cells
            assert run.info.run_name in cells, (run.info.run_name, text)
            for steps in (2, 4):
                assert repr(run.data.metrics[f"gen_ppl_{steps}steps"]) in cells, (run.info.run_name, steps, text)

    page = f"{mlflow_ui}/#/experiments/{exp_id}"
    profile = tmp_path / "chromium-profile"
    with Browser(chromium, profile) as b:
        b.open(f"{page}/runs?viewStateShareKey=kernel-runs&workflowType=machine_learning")  # the documented link
        names = [r.info.run_name for r in kernel_runs]
        assert_kernel_table(b.wait_text(*names))
        assert view in b.text()

        b.open(page)  # the plain page: GenAI overview, under a tip that covers the page until "Got it"
        b.wait_text("Got it")
        assert "/overview" in b.url() and "workflowType=genai" in b.url(), b.url()
        b.click("button", "Got it")
        b.click("[role=button]", "Model training")
        b.wait_text("matching runs")
        assert f"/experiments/{exp_id}/runs" in b.url(), b.url()
        b.click("button", "Views")
        b.wait_text(view)
        b.click("[role=menuitem]", view)
        assert_kernel_table(b.wait_text(*names))
        b.screenshot(tmp_path / "mlflow_ui.png")  # the test's artifact, under its tmp dir
    with Browser(chromium, profile) as b:  # the same browser later: the plain page opens on the runs
        b.open(page)
        b.wait_text("matching runs")
        assert f"/experiments/{exp_id}/runs" in b.url() and "workflowType=machine_learning" in b.url(), b.url()
    assert (tmp_path / "mlflow_ui.png").stat().st_size > 0


def test_three_processes_setting_up_a_fresh_store_at_once_all_get_the_one_experiment(tmp_path):
    """Parallel first writes (`dvc queue start -j N` on a fresh store): without the set-up lock, MLflow's table
    creation races ("table experiments already exists") and most such rounds fail."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = "import sys; from pipeline.track import open_experiment; print(open_experiment(sys.argv[1])[1])"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(3)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [r[0] for r in results] == [0, 0, 0], [r[2][-2000:] for r in results]
    assert {r[1].strip() for r in results} == {"1"}
