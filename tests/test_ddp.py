"""Multi-process training (DDP over gloo on CPU): same parameters as one process, resumable on fewer ranks."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from pipeline.common import load_params
from tests.ddp_worker import train_rank
from tests.tiny import REPO, write_params

KERNEL = "uniform"  # lambda_same != lambda_chg: the Eq. 120 normaliser must be the global batch's
TRAIN = {"steps": 4, "batch_size": 8, "warmup_steps": 2, "eval_every": 100, "ckpt_every": 2, "log_every": 2,
         "threads": 1, "val_sequences": 16}
# float32 gradients summed across ranks in another order than in one process, then 4 AdamW steps
ATOL, RTOL = 1e-5, 1e-5  # measured: <= 1e-6 abs, 1.1e-7 rel (1 ulp) on this CPU


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


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A workspace with tokens + prior, and the weights of a one-process run."""
    from pipeline import prior, tokenize, train

    ws = tmp_path_factory.mktemp("ddp")
    write_params(ws / "params.yaml", ws / "unused-evaluator", train=TRAIN,
                 kernels={KERNEL: {"lambda_same": 0.1, "time_weight": "none"}})
    old = Path.cwd()
    os.chdir(ws)
    try:
        p = load_params()
        tokenize.run(p.data)
        prior.run(p.prior)
        train.run(p, KERNEL)
        return ws, weights()
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


def test_train_command_with_two_devices_runs_torchrun_and_matches_one_process(single, workspace):
    """The dvc command (`python -m pipeline train`) re-launches under torchrun: 2 gloo ranks, same weights."""
    set_train(workspace, devices=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "pipeline", "train", "--kernel", KERNEL], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "torch.distributed.run --standalone --nproc_per_node=2" in res.stdout
    assert_same_weights(weights(), single[1])
    state = torch.load(f"checkpoints/{KERNEL}/state.pt", weights_only=True)
    assert state["step"] == 4 and len(state["train_log"]) == 2  # rank 0 alone logged


def test_a_two_rank_checkpoint_resumes_on_one_rank_to_the_same_parameters(single, workspace, capsys):
    from pipeline import train

    set_train(workspace, devices=2)
    spawn(2, workspace)
    shutil.rmtree("models")
    shutil.copy("keep/step2.pt", f"checkpoints/{KERNEL}/state.pt")  # as if the 2-rank run had stopped at step 2
    set_train(workspace, devices=1, grad_accum=2)  # one rank, same global batch in two micro-batches
    train.run(load_params(), KERNEL)
    assert f"resuming {KERNEL} from step 2" in capsys.readouterr().out
    assert_same_weights(weights(), single[1])


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
    assert_same_weights(saved, state["ema"])
    assert not torch.equal(saved["embed.weight"], state["model"]["embed.weight"])


def test_ema_update_is_the_exponential_moving_average():
    from pipeline.train import EMA
    from semdlm.config import ModelConfig
    from semdlm.model import Denoiser

    model = Denoiser(11, 8, ModelConfig(d_model=8, n_layers=1, n_heads=2))
    ema = EMA(model, 0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for k, v in ema.model.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * model.state_dict()[k])
