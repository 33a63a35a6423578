"""Multi-process training (DDP over gloo on CPU), dropout on: the same parameters as one process with as many
micro-batches, resumable on fewer ranks."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from semdlm.config import load_params
from tests.ddp_worker import train_rank
from tests.tiny import REPO, write_params

KERNEL = "uniform"  # lambda_same != lambda_chg: the Eq. 120 normaliser must be the global batch's
# One process with grad_accum 2 (the module fixture) and 2 ranks compute the same 2 micro-batches (rows, corruption,
# dropout seeds), and gloo adds the 2 ranks' gradients as autograd accumulates the 2 micro-batches': the same float
# sums, so the weights come out bitwise equal here (measured: max |diff| 0). The bound is the 1e-5; a
# different layout (1 micro-batch vs 2) sums gradients in another order, which Adam amplified to 1.3e-5 after 4 steps.
TRAIN = {"steps": 4, "batch_size": 8, "warmup_steps": 2, "eval_every": 100, "ckpt_every": 2, "log_every": 2,
         "threads": 1, "val_sequences": 16, "grad_accum": 2}
MODEL = {"dropout": 0.1}  # the paper profiles' dropout: masks must not depend on the rank that draws them
ATOL, RTOL = 1e-5, 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_train(ws: Path, **values) -> None:
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["train"].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def weights() -> dict[str, torch.Tensor]:
    return torch.load(f"models/{KERNEL}/model.pt", weights_only=True)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")


def val_nelbo() -> float:
    return json.loads(Path(f"metrics/{KERNEL}/train.json").read_text())["val_nelbo"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], float]:
    """A workspace with tokens + prior, and the weights and final bound of a one-process run."""
    from pipeline import prior, tokenize, train

    ws = tmp_path_factory.mktemp("ddp")
    write_params(ws / "params.yaml", ws / "unused-evaluator", train=TRAIN, model=MODEL,
                 kernels={KERNEL: {"lambda_same": 0.1, "time_weight": "none"}})
    old = Path.cwd()
    os.chdir(ws)
    try:
        p = load_params()
        tokenize.run(p.data)
        prior.run(p.prior)
        train.run(p, KERNEL)
        return ws, weights(), val_nelbo()
    finally:
        os.chdir(old)


@pytest.fixture
def workspace(single, tmp_path, monkeypatch) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(single[0], ws, ignore=shutil.ignore_patterns("checkpoints", "models", "metrics"))
    shutil.copytree(single[0] / "metrics", ws / "metrics", ignore=shutil.ignore_patterns(KERNEL))
    monkeypatch.chdir(ws)
    (ws / "keep").mkdir()
    return ws


def spawn(world: int, ws: Path) -> None:
    mp.spawn(train_rank, args=(world, free_port(), KERNEL, str(ws / "keep")), nprocs=world, join=True)


def fresh_training() -> None:
    for d in ("checkpoints", "models"):
        shutil.rmtree(d, ignore_errors=True)


def test_train_command_with_two_devices_runs_torchrun_and_matches_one_process(single, workspace):
    """The dvc command (`python -m pipeline train`) re-launches under torchrun: 2 gloo ranks, same weights and the
    same validation bound (its blocks are spread over the ranks)."""
    set_train(workspace, devices=2, grad_accum=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "pipeline", "train", "--kernel", KERNEL], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "torch.distributed.run --standalone --nproc_per_node=2" in res.stdout
    assert_same_weights(weights(), single[1])
    assert val_nelbo() == pytest.approx(single[2], rel=1e-6)
    state = torch.load(f"checkpoints/{KERNEL}/state.pt", weights_only=True)
    assert state["step"] == 4 and len(state["train_log"]) == 2  # rank 0 alone logged


def test_a_two_rank_checkpoint_resumes_on_one_rank_to_the_same_parameters(single, workspace, capsys):
    from pipeline import train

    set_train(workspace, devices=2, grad_accum=1)
    spawn(2, workspace)
    shutil.rmtree("models")
    shutil.copy("keep/step2.pt", f"checkpoints/{KERNEL}/state.pt")  # as if the 2-rank run had stopped at step 2
    set_train(workspace, devices=1, grad_accum=2)  # one rank, same global batch in two micro-batches
    train.run(load_params(), KERNEL)
    assert f"resuming {KERNEL} from step 2" in capsys.readouterr().out
    assert_same_weights(weights(), single[1])


def test_ddp_with_gradient_accumulation_matches_one_process(workspace):
    """2 ranks x grad_accum 2 (DDP's no_sync path) = 1 process x grad_accum 4: the same 4 micro-batches."""
    from pipeline import train

    set_train(workspace, grad_accum=4)
    train.run(load_params(), KERNEL)
    one = weights()
    fresh_training()
    set_train(workspace, devices=2, grad_accum=2)
    spawn(2, workspace)
    assert_same_weights(weights(), one)


def logs_without_wall_time() -> dict[str, dict]:
    return {n: pd.read_csv(f"metrics/{KERNEL}/{n}", sep="\t").drop(columns=["tokens_per_s"], errors="ignore")
            .to_dict("list") for n in ("train_log.tsv", "val_log.tsv")}


def test_a_resume_with_dropout_and_ema_is_bitwise_the_uninterrupted_run(workspace, monkeypatch, capsys):
    """Killed during the evaluation of step 2, whose checkpoint was written before it: the resume re-runs that
    evaluation, then steps 3-4 with dropout 0.1 and EMA 0.5; weights, EMA and both logs are bitwise those of one
    uninterrupted run."""
    import pipeline.train as train_mod

    set_train(workspace, ema=0.5, eval_every=2)
    train_mod.run(load_params(), KERNEL)
    full, full_state = weights(), torch.load(f"checkpoints/{KERNEL}/state.pt", weights_only=True)
    logs = logs_without_wall_time()
    fresh_training()
    real = train_mod.validation_estimates

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "validation_estimates", killed)
    with pytest.raises(KeyboardInterrupt):
        train_mod.run(load_params(), KERNEL)
    assert torch.load(f"checkpoints/{KERNEL}/state.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(train_mod, "validation_estimates", real)
    train_mod.run(load_params(), KERNEL)
    assert f"resuming {KERNEL} from step 2" in capsys.readouterr().out
    resumed = torch.load(f"checkpoints/{KERNEL}/state.pt", weights_only=True)
    for a, b in ((weights(), full), (resumed["model"], full_state["model"]), (resumed["ema"]["model"],
                                                                                full_state["ema"]["model"])):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert resumed["ema"]["updates"] == 4
    assert logs_without_wall_time() == logs


def test_batch_not_divisible_by_ranks_is_refused(workspace, monkeypatch):
    from pipeline import train
    from pipeline.common import StageError

    set_train(workspace, batch_size=6, grad_accum=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(StageError, match="batch_size=6 is not divisible by 2 ranks x train.grad_accum=2"):
        train.setup_dist(load_params().train)


def test_ema_weights_are_validated_and_saved_as_the_model(workspace):
    from pipeline import train

    set_train(workspace, ema=0.5)
    train.run(load_params(), KERNEL)
    state = torch.load(f"checkpoints/{KERNEL}/state.pt", weights_only=True)
    saved = weights()
    assert_same_weights(saved, state["ema"]["model"])
    assert not torch.equal(saved["embed.weight"], state["model"]["embed.weight"])


def test_the_token_split_is_memory_mapped_once_with_the_rows_of_the_shards(workspace):
    from pipeline.artifacts import TOKEN_CACHE, load_rows, mapped_rows, split_shards

    rows = mapped_rows("train")
    assert isinstance(rows, np.memmap) and not rows.flags.writeable
    assert rows.dtype == load_rows("train").dtype and np.array_equal(rows, load_rows("train"))
    (cached,) = TOKEN_CACHE.glob("train-*.npy")
    stamp = cached.stat().st_mtime_ns
    assert np.array_equal(mapped_rows("train", write=False), rows) and cached.stat().st_mtime_ns == stamp
    os.utime(split_shards("train")[0])  # the tokenize stage wrote the shards again
    mapped_rows("train")
    assert [p.name for p in TOKEN_CACHE.glob("train-*.npy")] != [cached.name]  # rebuilt, the stale copy removed
    assert len(list(TOKEN_CACHE.glob("train-*.npy"))) == 1


def test_a_corpus_that_spells_mask_stops_training_with_the_token_named(workspace, monkeypatch):
    import pipeline.train as train_mod
    from pipeline.artifacts import load_vocab
    from pipeline.common import StageError

    p = yaml.safe_load(Path("params.yaml").read_text())
    p["kernels"] = {"mask": {}}
    Path("params.yaml").write_text(yaml.safe_dump(p))
    mask = load_vocab().mask
    real = train_mod.mapped_rows

    def with_mask(name: str, write: bool = True) -> np.ndarray:
        rows = np.array(real(name, write))
        rows[:, 5] = mask  # as a tokenizer that maps the text "[MASK]" to the special id would
        return rows

    monkeypatch.setattr(train_mod, "mapped_rows", with_mask)
    with pytest.raises(StageError, match=rf"token id {mask} \(\[MASK\]\) as a clean token.*spells a special token"):
        train_mod.run(load_params(), "mask")
    assert not Path("models/mask/model.pt").exists()


def test_threads_0_under_torchrun_shares_the_cores_among_the_local_ranks(monkeypatch):
    from pipeline.train import threads
    from semdlm.config import TrainConfig

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads(TrainConfig()) == max(1, len(os.sched_getaffinity(0)) // 2)
    assert threads(TrainConfig(threads=3)) == 3


def test_deterministic_runs_under_torch_deterministic_algorithms_and_records_precision(workspace, monkeypatch):
    import pipeline.train as train_mod

    seen = []
    real = train_mod._train
    monkeypatch.setattr(train_mod, "_train", lambda *a: (seen.append(torch.are_deterministic_algorithms_enabled()),
                                                         real(*a)))
    set_train(workspace, deterministic=True)
    train_mod.run(load_params(), KERNEL)
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()  # restored afterwards
    metrics = json.loads(Path(f"metrics/{KERNEL}/train.json").read_text())
    assert (metrics["precision"], metrics["device"], metrics["deterministic"]) == ("float32", "cpu", True)
