"""benchmarks/gpu_check.sh: its --dry-run (the GPU check's path on the CPU at toy sizes) and its summary table."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_dry_run_runs_every_part_on_the_cpu_and_writes_one_summary(gpu_check_dry_run):
    res, tmp_path = gpu_check_dry_run  # `bash SCRIPT --dry-run --results tmp_path`, run from the session's start
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check_dry_run.json"]  # benchmark JSONs stay in temp
    summary = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert summary["dry_run"] and set(summary["parts"]) == {"repro", "train_step", "sampling"}
    assert all(p["rc"] == 0 for p in summary["parts"].values())
    rows = {(r["part"], r["stage"]): r for r in summary["rows"]}
    for stage in ("train@mask", "sample@mask", "evaluate@mask", "reference", "dispersion"):
        assert rows["repro", stage]["device"] == "cpu" and rows["repro", stage]["seconds"] > 0, stage
    assert "gen PPL" in rows["repro", "evaluate@mask"]["figure"]
    assert [r["tokens_per_s"] > 0 for r in summary["rows"] if r["part"] == "train_step"] == [True]
    sampling = [r for r in summary["rows"] if r["part"] == "sampling"]
    assert {r["stage"].split(" L=")[0] for r in sampling} == {"mask ancestral", "mask blockwise",
                                                               "semdlm_plus ancestral", "semdlm_plus blockwise"}
    assert all(r["nfe_over_steps"] <= 1.1 and r["samples_per_s"] > 0 for r in sampling)
    assert all((r["projected_hours"] is not None) == (" L=1024 " in r["stage"]) for r in sampling)
    table = res.stdout[res.stdout.index("gpu_check --dry-run on"):]
    assert "part" in table and "train@mask" in table and "FAILED" not in table


def test_unknown_option_is_a_one_line_error():
    res = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: unknown option --gpu; use --dry-run and/or --results DIR"


@pytest.mark.parametrize(("rc", "status"), [(0, 0), (124, 1), (3, 1)])
def test_summary_times_each_stage_and_fails_when_a_part_failed(tmp_path, monkeypatch, rc, status):
    gc = gpu_check_module()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "repro.log").write_text("100.0 Running stage 'tokenize':\n101.0 > python -m pipeline tokenize\n"
                                        "102.5 Running stage 'train@mask':\n110.0 done\n")
    for part, (start, end, code) in {"repro": (99.0, 110.0, 0), "train_step": (110.0, 120.0, 0),
                                     "sampling": (120.0, 121.0, rc)}.items():
        (tmp_path / f"{part}.status").write_text(json.dumps({"rc": code, "start": start, "end": end, "limit_s": 60}))
    out = tmp_path / "out" / "summary.json"
    assert gc.summary(tmp_path, tmp_path / "none.json", tmp_path / "none.json", out, False) == status
    summary = json.loads(out.read_text())
    seconds = {r["stage"]: r["seconds"] for r in summary["rows"]}
    assert seconds == {"tokenize": 2.5, "train@mask": 7.5, "dvc repro (all)": 11.0}
    assert summary["total_s"] == 22.0 and summary["parts"]["sampling"]["timed_out"] == (rc == 124)
