import contextlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.__main__ import app
from tests.tiny import write_params

runner = CliRunner()
COMMANDS = ["tokenize", "graph", "prior", "train", "sample", "evaluator-lm", "evaluate", "reference", "dispersion",
            "summary", "plots", "report", "track", "compare", "use-profile"]


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
def base_workspace(tmp_path_factory, evaluator_dir) -> Path:
    """tokenize -> graph -> prior -> train@mask on tiny params, once per session."""
    ws = tmp_path_factory.mktemp("ws")
    write_params(ws / "params.yaml", evaluator_dir)
    with cwd(ws):
        for cmd in (["tokenize"], ["prior"], ["graph"], ["train", "--kernel", "mask"]):
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


def test_training_killed_inside_a_log_window_resumes_to_the_same_parameters_and_logs(workspace, monkeypatch):
    """6 steps in one go vs. killed during step 5 (checkpoint at 3, inside the 2-step log window) + a second run:
    identical weights, loss log and validation log (checkpointing does not change what is trained)."""
    import semdlm.training as training

    full = torch.load("models/mask/model.pt", weights_only=True)["state_dict"]
    logs = {name: Path(f"metrics/mask/{name}").read_text() for name in ("train_log.tsv", "val_log.tsv")}
    shutil.rmtree("checkpoints")
    shutil.rmtree("models")
    edit_params(workspace, "train", ckpt_every=3)
    real, calls = training.train_step, []

    def killed_at_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", killed_at_5)
    assert invoke("train", "--kernel", "mask").exit_code != 0
    assert not Path("models/mask/model.pt").exists()
    monkeypatch.setattr(training, "train_step", real)
    res = invoke("train", "--kernel", "mask")
    assert res.exit_code == 0 and "resuming mask from step 3" in res.output, res.output
    resumed = torch.load("models/mask/model.pt", weights_only=True)["state_dict"]
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)
    train_log = pd.read_csv("metrics/mask/train_log.tsv", sep="\t")
    expected = pd.read_csv(io.StringIO(logs["train_log.tsv"]), sep="\t")
    pd.testing.assert_series_equal(train_log["loss"], expected["loss"], rtol=0, atol=0)
    assert Path("metrics/mask/val_log.tsv").read_text() == logs["val_log.tsv"]


def test_tokenize_reads_a_local_datasets_directory(tmp_path, evaluator_dir):
    import datasets

    from pipeline.tokenize import read_corpus
    from semdlm.config import load_params

    texts = [f"document number {i} talks about markets and football." for i in range(6)]
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "ds"))
    write_params(tmp_path / "params.yaml", evaluator_dir, data={"source": str(tmp_path / "ds"), "text_field": "body"})
    with cwd(tmp_path):
        assert read_corpus(load_params().data) == texts


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
    assert metrics["sampler"] == sampler and metrics["by_steps"]["4"]["nfe_per_batch"] == nfe
    assert len(pd.read_parquet("samples/semdlm_plus/samples.parquet")) == p["sampler"]["num_samples"]


def test_one_family_in_both_models_runs_side_by_side_each_named_with_its_bounds_and_repair(workspace):
    # the paper's model of SemDLM+ and ours (latent_state) as two entries of one params file; mask's bounds beside
    p = yaml.safe_load((workspace / "params.yaml").read_text())
    p["kernels"] = {"mask": {}, "semdlm_plus": {"k_max": 4},
                    "plus_latent": {"type": "semdlm_plus", "latent_state": True, "k_max": 4}}
    p["sampler"].update(steps=[2, 4])
    (workspace / "params.yaml").write_text(yaml.safe_dump(p))
    for k in ("semdlm_plus", "plus_latent"):
        assert invoke("train", "--kernel", k).exit_code == 0
        res = invoke("sample", "--kernel", k)
        assert res.exit_code == 0, res.output
    train = {k: json.loads(Path(f"metrics/{k}/train.json").read_text()) for k in ("mask", "semdlm_plus", "plus_latent")}
    assert [train[k]["model"] for k in train] == ["paper", "paper", "latent-state"]
    assert train["plus_latent"]["kernel_type"] == "semdlm_plus" and train["plus_latent"]["kernel"] == "plus_latent"
    assert set(train["mask"]["estimates"]) == {"val_nelbo", "val_nelbo_ctmc", "val_denoising_ce"}
    assert "MDLM" in train["mask"]["bound"] and "val_nelbo_ctmc" in train["mask"]
    assert "valid, not tight for this kernel" in train["semdlm_plus"]["bound_label"]
    for row in train.values():
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_nelbo"]))
        assert row["val_denoising_ppl"] == pytest.approx(math.exp(row["val_denoising_ce"]))
        assert "not a likelihood bound" in row["denoising_ppl_label"]
    for k in ("semdlm_plus", "plus_latent"):
        by_steps = json.loads(Path(f"metrics/{k}/sample.json").read_text())["by_steps"]
        assert set(by_steps) == {"2", "4"}
        assert all(r["revisions"] > 0 and 0 <= r["semantic_repetition"] <= 1 for r in by_steps.values()), by_steps
    p["kernels"]["plus_latent"]["latent_state"] = False  # the model file no longer is the entry's model
    (workspace / "params.yaml").write_text(yaml.safe_dump(p))
    assert_bad_input(invoke("sample", "--kernel", "plus_latent"), "models/plus_latent/model.pt is a latent-state model",
                     "run `dvc repro train@plus_latent`")


# ---- bad-input matrix: exit code 2, one `error:` line naming the bad value and the fix, the stage's outs untouched


class Evil:
    """Unpickling this runs code (creates a marker file): a weights-only load must refuse it."""

    def __reduce__(self):
        return (Path.touch, (Path("pwned"),))


def set_kernels(ws: Path, **kernels: dict) -> None:
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["kernels"] = kernels
    (ws / "params.yaml").write_text(yaml.safe_dump(p))


def fresh_training(ws: Path) -> None:
    shutil.rmtree(ws / "checkpoints")
    shutil.rmtree(ws / "models")


def nan_at_step_5(ws: Path, mp: pytest.MonkeyPatch) -> None:
    import semdlm.training as training

    fresh_training(ws)
    real, calls = training.train_step, []

    def flaky(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    mp.setattr(training, "train_step", flaky)


def bad_checkpoint(payload: bytes | None):
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        (ws / "models/mask/model.pt").unlink()
        ckpt = ws / "checkpoints/mask/state.pt"
        if payload is None:
            torch.save({"step": 2, "model": Evil()}, ckpt)
        else:
            ckpt.write_bytes(payload)

    return setup


def offline(ws: Path, mp: pytest.MonkeyPatch) -> None:
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    edit_params(ws, "data", source="someone/no-such-dataset")


def truncate(path: str):
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        data = (ws / path).read_bytes()
        (ws / path).write_bytes(data[: len(data) // 2])

    return setup


def empty_corpus(ws: Path, mp: pytest.MonkeyPatch) -> None:
    (ws / "empty.txt").write_text("\n\n  \n")
    edit_params(ws, "data", source=str(ws / "empty.txt"))


def params(section: str, **values):
    return lambda ws, mp: edit_params(ws, section, **values)


def kernels(**ks: dict):
    return lambda ws, mp: set_kernels(ws, **ks)


TOKENS, PRIOR_OUTS = ["data/tokens"], ["data/prior", "metrics/prior.json"]
TRAIN_MASK = ["models/mask", "checkpoints/mask", "metrics/mask"]
SAMPLE_MASK = ["samples/mask", "metrics/mask/sample.json"]
# id: (setup, command, fragments of the error line: the bad value ... the fix, outs that must stay as they were)
BAD_INPUTS = {
    "bound grid of zero steps": (params("train", bound_steps=0), ["train", "-k", "mask"],
                                 ["train.bound_steps=0 must be >= 1", "set a positive integer"],
                                 ["models/mask", "checkpoints/mask"]),
    "unknown kernel": (kernels(maks={}), ["train", "-k", "maks"], ["unknown kernel 'maks'", "did you mean mask"],
                       ["models/maks", "checkpoints/maks"]),
    "model.latent_state of the former default": (params("model", latent_state=True), ["train", "-k", "mask"],
                                                 ["model.latent_state moved", "kernels.<name>.latent_state"],
                                                 TRAIN_MASK),
    "kernel not in params": (None, ["train", "-k", "uniform"],
                             ["kernel 'uniform' is not in params.yaml", "add a kernels.uniform section"],
                             ["models/uniform", "checkpoints/uniform"]),
    "unknown sampler": (params("sampler", name="gibbs"), ["sample", "-k", "mask"],
                        ["sampler.name='gibbs' is unknown", "choose one of ancestral, tau_leaping, blockwise"],
                        SAMPLE_MASK),
    "sampler option incompatible with the sampler": (params("sampler", name="ancestral", corrector_steps=2),
                                                     ["sample", "-k", "mask"],
                                                     ["sampler.corrector_steps=2", "tau_leaping or blockwise"],
                                                     SAMPLE_MASK),
    "sampler incompatible with the model": (params("sampler", name="blockwise", strides=3, steps=6),
                                            ["sample", "-k", "mask"],
                                            ["sampler.strides=3 does not divide the sequence length 16",
                                             "choose a divisor"], SAMPLE_MASK),
    "alpha_min out of range": (kernels(semdlm_plus={"alpha_min": 1.5, "k_max": 4}), ["train", "-k", "semdlm_plus"],
                               ["alpha_min=1.5 is outside [0, 1]", "choose a value in [0, 1)"],
                               ["models/semdlm_plus", "checkpoints/semdlm_plus"]),
    "alpha_t + beta_t > 1": (kernels(semdlm_plus={"alpha_min": 0.5, "beta_max": 0.9, "eta": 1.0, "k_max": 4}),
                             ["train", "-k", "semdlm_plus"], ["alpha_t + beta_t", "beta_max=0.9", "lower beta_max"],
                             ["models/semdlm_plus", "checkpoints/semdlm_plus"]),
    "k_max above the neighbour table": (kernels(semdlm_plus={"k_max": 32}), ["train", "-k", "semdlm_plus"],
                                        ["k_max=32 is larger than the neighbour table width 8", "raise graph.k_max"],
                                        ["models/semdlm_plus", "checkpoints/semdlm_plus"]),
    "seq_len < 8": (params("data", seq_len=4), ["tokenize"], ["data.seq_len=4", "use seq_len >= 8"], TOKENS),
    "empty corpus": (empty_corpus, ["tokenize"], ["empty.txt' has 0 non-empty documents", "need at least 2"], TOKENS),
    "corpus path missing": (params("data", source="nowhere/corpus.txt"), ["tokenize"],
                            ["data.source='nowhere/corpus.txt' does not exist", "check the path"], TOKENS),
    "dataset id unreachable offline": (offline, ["tokenize"], ["someone/no-such-dataset", "use 'bbcnews'"], TOKENS),
    "num_samples <= 0": (params("sampler", num_samples=0), ["sample", "-k", "mask"],
                         ["sampler.num_samples=0", "must be >= 1"], SAMPLE_MASK),
    "train.steps <= 0": (params("train", steps=0), ["train", "-k", "mask"], ["train.steps=0", "must be >= 1"],
                         TRAIN_MASK),
    "sampler.steps <= 0": (params("sampler", steps=-1), ["sample", "-k", "mask"], ["sampler.steps=-1", "must be >= 1"],
                           SAMPLE_MASK),
    "-S key typo": (params("sampler", lamda_sem=0.5), ["sample", "-k", "mask"],
                    ["unknown key sampler.lamda_sem", "did you mean sampler.lambda_sem?"], SAMPLE_MASK),
    "corrupted checkpoint": (bad_checkpoint(b"PK\x03\x04 not a zip"), ["train", "-k", "mask"],
                             ["checkpoints/mask/state.pt is corrupted", "delete it to train from scratch"], TRAIN_MASK),
    "checkpoint that runs code when unpickled": (bad_checkpoint(None), ["train", "-k", "mask"],
                                                 ["checkpoints/mask/state.pt is corrupted", "delete it"],
                                                 [*TRAIN_MASK, "pwned"]),
    "corrupted model": (lambda ws, mp: (ws / "models/mask/model.pt").write_bytes(b"\0" * 64), ["sample", "-k", "mask"],
                        ["models/mask/model.pt is not a usable model", "run `dvc repro train@mask`"], SAMPLE_MASK),
    "truncated parquet": (truncate("data/tokens/train/part-00000.parquet"), ["prior"],
                          ["data/tokens/train/part-00000.parquet is unreadable", "run `dvc repro tokenize`"],
                          PRIOR_OUTS),
    "missing upstream file": (lambda ws, mp: shutil.rmtree(ws / "data/tokens"), ["graph"],
                              ["missing upstream file data/tokens/vocab.json", "run `dvc repro tokenize`"],
                              ["data/graph"]),
    "NaN loss": (nan_at_step_5, ["train", "-k", "mask"],
                 ["train loss is nan at step 5", "last good checkpoint (step 4) is kept", "lower train.lr"],
                 ["models/mask", "metrics/mask"]),
    "evaluator that cannot be loaded": (params("eval", model="/no/such-model"), ["evaluator-lm"],
                                        ["eval.model='/no/such-model' cannot be loaded", "pip install --no-deps"],
                                        ["models/evaluator"]),
}


def snapshot(paths: list[str]) -> dict[str, bytes | None]:
    """Bytes of every file under ``paths`` (None for a path that does not exist)."""
    out: dict[str, bytes | None] = {}
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out.update({str(f): f.read_bytes() if f.exists() else None for f in files} or {str(p): b"<empty dir>"})
    return out


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_naming_value_and_fix_and_writes_no_out(workspace, monkeypatch, case):
    setup, command, fragments, outs = BAD_INPUTS[case]
    if setup:
        setup(workspace, monkeypatch)
    before = snapshot(outs)
    assert_bad_input(invoke(*command), *fragments)
    assert snapshot(outs) == before
    if case == "NaN loss":  # the checkpoint is kept at the last finite step
        assert torch.load("checkpoints/mask/state.pt", weights_only=True)["step"] == 4
