"""report, track, compare and an MLflow server on a tiny workspace built in-process by the stage commands."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
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
                    ["sample", "-k", "mask"], ["evaluator"], ["evaluate", "-k", "mask"], ["reference"], ["report"]):
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


def test_rows_below_min_entropy_are_marked_not_hidden_where_the_threshold_can_be_met(ws):
    for threshold in (100.0, 2.7, 0.0):  # 16-token samples: entropy <= ln 16 = 2.77, so 100 is not applied
        p = yaml.safe_load((ws / "params.yaml").read_text())
        p["eval"]["min_entropy"] = threshold
        (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        invoke("evaluate", "-k", "mask")
        invoke("reference")
        invoke("report")
        lines = (ws / "reports/report.md").read_text().splitlines()
        header = next(i for i, ln in enumerate(lines) if ln.startswith("| kernel | ours: gen PPL @2"))  # Table 3
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


def test_mlflow_server_lists_two_experiments_that_differ_only_in_lambda_sem(tracked, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tracked}", "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1", "--default-artifact-root", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=semdlm") as r:
            exp = json.loads(r.read())["experiment"]
        found = api(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp["experiment_id"]],
            "filter": "params.`sampler.lambda_freq` = '0.0' and tags.kernel = 'mask'"})["runs"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    by_sem = {}
    for run in found:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        by_sem[params["sampler.lambda_sem"]] = run
    assert set(by_sem) == {"0.0", "0.5"}
    for ls, run in by_sem.items():
        assert run["info"]["run_name"] == f"exp-f0.0-s{ls}/mask"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        for key in ("gen_ppl", "entropy", "distinct_2", "val_nelbo", "dispersion", "grad_var_between"):
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
