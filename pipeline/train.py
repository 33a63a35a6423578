"""train@<kernel>: fit the x0-prediction denoiser; resumable, NaN-safe, per-step logs for dvc plots.

One process, or ``train.devices`` processes under torchrun (DDP). The step's math is ``semdlm.training``: every rank
advances one generator in the same way, reads and corrupts only its own micro-batches of the global batch and seeds
their dropout from it. Runs with the same number of micro-batches (ranks x grad_accum) are the same computation up to
the order of float sums, and a checkpoint (whose generator state is all the randomness there is) resumes on any number
of ranks. The loss is read back from the device only at log, checkpoint and evaluation steps. Validation is spread
over the ranks and runs on the device in float32, after the checkpoint of its step is written.

Read top to bottom: ``run`` (threads, ranks) -> ``_train``: ``open_job`` (what the run reads), ``start`` (the model and
``TrainState``, or the checkpoint's), ``loop`` (optimiser steps, loss checks, logs, checkpoints, periodic bounds),
``validate`` (the final bound) and ``finish`` (model.pt, logs, train.json).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.artifacts import PRIOR_METRICS, Vocab, checkpoint_dir, load_vocab, mapped_rows, metrics_dir, model_path
from pipeline.common import StageError, atomic, read_json, write_json
from pipeline.loaders import load_kernel, load_unigram
from semdlm.config import KernelConfig, Params, TrainConfig, load_params
from semdlm.devices import resolve_device
from semdlm.kernels import Kernel
from semdlm.likelihood import DENOISING, Estimate, estimates, validation_estimates
from semdlm.model import Denoiser
from semdlm.provenance import versions
from semdlm.training import (
    Batch,
    ImpossibleTarget,
    TrainState,
    draw_batch,
    fingerprint,
    init_output_bias,
    optimizer_step,
    sharded_mean,
    validation_block,
)

LOCK = Path("constraints.txt")  # the lock of exact package versions (README command 1 installs from it)


def versions_in_use() -> dict[str, str]:
    """The versions of the packages in use (``semdlm.provenance.versions``) and the first 16 hex digits of the
    lock's sha256 ("none" outside a checkout that has one): recorded with every training run and MLflow run."""
    lock = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16] if LOCK.is_file() else "none"
    return {**versions(), "constraints.txt": lock}


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, ranks on this node and device (torchrun sets RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def threads(cfg: TrainConfig) -> int:
    """torch threads of this process: ``train.threads``; with 0, torch's default in a lone process, and under torchrun
    (which sets OMP_NUM_THREADS=1) the node's cores shared evenly by its ranks (at least 1)."""
    if cfg.threads:
        return cfg.threads
    if "LOCAL_WORLD_SIZE" in os.environ:
        return max(1, len(os.sched_getaffinity(0)) // int(os.environ["LOCAL_WORLD_SIZE"]))
    return torch.get_num_threads()


def setup_dist(cfg: TrainConfig) -> Dist:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.batch_size % (world * cfg.grad_accum):
        raise StageError(f"train.batch_size={cfg.batch_size} is not divisible by {world} ranks x "
                         f"train.grad_accum={cfg.grad_accum}; change batch_size or grad_accum")
    device = resolve_device(cfg.device, "train.device", local)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    return Dist(rank, world, local, device)


def shared_rows(name: str, dist: Dist) -> np.ndarray:
    """A token split memory-mapped: written once per node (its local rank 0), read by all its ranks."""
    if dist.local_rank == 0:
        rows = mapped_rows(name)
        dist.barrier()
        return rows
    dist.barrier()
    return mapped_rows(name, write=False)


def launch(params_path: str, kernel: str) -> None:
    """Run train@kernel here, or under torchrun with train.devices processes when devices > 1."""
    params = load_params(params_path)
    n = params.train.devices
    if n == 1 or "LOCAL_RANK" in os.environ:
        run(params, kernel)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "pipeline", "train", "--kernel", kernel, "--params", params_path]
    print("launching:", " ".join(cmd[1:]))
    rc = subprocess.call(cmd)
    if rc:
        raise SystemExit(rc)


class Checkpoint:
    """A run's ``TrainState`` and fingerprint in one weights-only file (checkpoints/<kernel>/state.pt)."""

    def __init__(self, kernel: str, fp: str) -> None:
        self.path, self.fp = checkpoint_dir(kernel) / "state.pt", fp

    def save(self, state: dict) -> None:
        with atomic(self.path) as tmp:
            torch.save({"fingerprint": self.fp, **state}, tmp)

    def load(self) -> dict | None:
        """The saved state of this run (None when there is none, or one of other params)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise StageError(
                f"checkpoint {self.path} is corrupted ({e.__class__.__name__}); delete it to train from scratch"
            ) from None
        if state.get("fingerprint") != self.fp:
            print(f"note: {self.path} was written with other params or an older version; training from scratch")
            return None
        return state


@dataclass
class Job:
    """What one train@<kernel> run reads, fixed for its life: params, ranks, data, kernel and checkpoint file."""

    params: Params
    name: str
    dist: Dist
    vocab: Vocab
    kernel: Kernel  # on the CPU: the corruption runs there
    on_device: Kernel  # the loss and the bound run on the device
    train: np.ndarray
    validation: np.ndarray
    unigram: torch.Tensor
    unigram_ce: float  # the prior stage's validation cross-entropy of the unigram, beside the bound in train.json
    ckpt: Checkpoint

    @property
    def cfg(self) -> TrainConfig:
        return self.params.train

    @property
    def kcfg(self) -> KernelConfig:
        return self.params.kernels[self.name]

    @property
    def latent(self) -> bool:
        """The model sees each token's latent state (the kernel entry's latent_state; ours)."""
        return self.kcfg.latent_state

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    @functools.cached_property
    def reported(self) -> list[Estimate]:
        """What train.json reports for this kernel's model, the primary bound first (their prior terms on the
        device, computed once per run, at the first evaluation)."""
        return estimates(self.on_device, self.latent, self.cfg.bound_steps, self.unigram.to(self.dist.device))


def open_job(params: Params, kernel_name: str, dist: Dist) -> Job:
    vocab = load_vocab()
    kernel = load_kernel(kernel_name, params, vocab)
    train, validation = shared_rows("train", dist), shared_rows("validation", dist)
    unigram_ce = read_json(PRIOR_METRICS, "prior")["unigram_validation_ce"]
    fp = fingerprint(params, kernel_name, vocab.size, train.shape[1])
    return Job(params, kernel_name, dist, vocab, kernel, kernel.to(dist.device), train, validation, load_unigram(vocab),
               unigram_ce, Checkpoint(kernel_name, fp))


def run(params: Params, kernel_name: str) -> None:
    cfg = params.train
    torch.set_num_threads(threads(cfg))
    deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:  # cuBLAS reads the variable when its first handle is made: before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op without such a kernel warns, never stops
    dist = setup_dist(cfg)
    try:
        _train(params, kernel_name, dist)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(params: Params, kernel_name: str, dist: Dist) -> None:
    job = open_job(params, kernel_name, dist)
    state = start(job)
    ddp = None
    if dist.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            state.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            broadcast_buffers=False)
    net: Callable[..., torch.Tensor] = ddp or state.model
    if job.cfg.compile:
        net = torch.compile(net)
    loop(job, state, net, ddp)
    final = validate(job, state.ema.model, job.cfg.val_sequences, job.cfg.val_repeats, job.reported)
    if dist.main:
        finish(job, state, final)
    dist.barrier()


def start(job: Job) -> TrainState:
    """Step 0 (the model built from its seed and started at the unigram predictor), or the checkpoint of this run."""
    torch.manual_seed(job.cfg.seed)
    model = Denoiser.for_kernel(job.params.model, job.kernel, job.seq_len, job.latent)
    init_output_bias(model, job.unigram)
    state = TrainState.new(model.to(job.dist.device), job.cfg)
    if (saved := job.ckpt.load()) is not None:
        state.load_state_dict(saved)
        if job.dist.main:
            print(f"resuming {job.name} from step {state.step} ({job.ckpt.path})")
    return state


class Batches:
    """This rank's batch of each step, drawn and corrupted on the CPU from the run's generator in step order. With a
    pool (on a GPU or over several ranks) the next step's batch is drawn in a background thread while this step
    computes: the generator is used in the same order, so the batches are the same. ``resume`` is the generator's
    state after the draws of the batch last handed out: what a resumed run continues from."""

    def __init__(self, job: Job, gen: torch.Generator, pool: ThreadPoolExecutor | None) -> None:
        cfg, dist = job.cfg, job.dist
        mine = range(dist.rank * cfg.grad_accum, (dist.rank + 1) * cfg.grad_accum)  # of the global batch's pieces
        self.draw = functools.partial(draw_batch, job.train, job.kernel, cfg, job.kcfg, pieces=dist.world *
                                      cfg.grad_accum, mine=mine, never=job.kernel.mask_id)
        self.gen, self.pool, self.vocab = gen, pool, job.vocab
        self.pending: Future[Batch] | None = None
        self.resume = gen.get_state()

    def next(self, more: bool) -> Batch:
        """The next batch; ``more``: another one follows it (draw it ahead)."""
        try:
            batch = self.pending.result() if self.pending else self.draw(self.gen)
        except ImpossibleTarget as e:
            raise StageError(
                f"train sequence {e.row} has token id {e.token} ({self.vocab.tokens[e.token]}) as a clean token, whose "
                "logit is -inf, so the loss would be infinite: the corpus spells a special token; rebuild the tokens "
                "so that such text is encoded as text (`dvc repro tokenize`)"
            ) from None
        self.resume = self.gen.get_state()
        self.pending = self.pool.submit(self.draw, self.gen) if self.pool and more else None
        return batch


def loop(job: Job, state: TrainState, net: Callable[..., torch.Tensor],
         ddp: torch.nn.parallel.DistributedDataParallel | None) -> None:
    """Steps from ``state.step`` to train.steps. The losses are read back (and checked) at log, checkpoint and
    evaluation steps; the checkpoint of a step is written before its evaluation."""
    cfg, dist = job.cfg, job.dist
    state.model.train()
    if 0 < state.step < cfg.steps and state.step % cfg.eval_every == 0 and all(
            r["step"] != state.step for r in state.val_log):
        periodic_evaluation(job, state)  # the run stopped between this step's checkpoint and its evaluation
    last_good, last_loss = state.step, float("nan")
    losses: list[torch.Tensor] = []  # this rank's loss of each step since the last check, on the device
    columns = (TextColumn(f"train@{job.name}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())
    prefetch = dist.device.type == "cuda" or dist.world > 1
    with Progress(*columns, disable=not dist.main) as bar, ThreadPoolExecutor(1) as pool:
        task = bar.add_task("train", total=cfg.steps, completed=state.step, loss=float("nan"))
        batches = Batches(job, state.gen, pool if prefetch else None)
        while state.step < cfg.steps:
            t0 = time.perf_counter()
            batch = batches.next(more=state.step + 1 < cfg.steps).to(dist.device)
            losses.append(optimizer_step(state, net, job.on_device, batch, cfg, job.kcfg, job.latent, ddp))
            persist = state.step % cfg.ckpt_every == 0 or state.step == cfg.steps or state.step % cfg.eval_every == 0
            if persist or state.step % cfg.log_every == 0:
                last_loss = check_losses(job, state, losses, last_good)
                losses = []
            log_step(state, cfg, job.seq_len, time.perf_counter() - t0)
            if persist:
                if dist.main:  # written before this step's evaluation: a resume re-runs only the evaluation
                    job.ckpt.save(state.state_dict(batches.resume))
                last_good = state.step
                if state.step % cfg.eval_every == 0 and state.step < cfg.steps:
                    periodic_evaluation(job, state)
            bar.update(task, completed=state.step, loss=last_loss)


def check_losses(job: Job, state: TrainState, losses: list[torch.Tensor], last_good: int) -> float:
    """Read the losses of the steps since the last check back from the device (summed over the ranks), stop at a
    non-finite one, add them to the log window; returns the last."""
    values = torch.stack(losses)
    if job.dist.world > 1:
        torch.distributed.all_reduce(values)
    total, tokens, seconds = state.window
    for i, v in enumerate(values.tolist()):
        if not math.isfinite(v):
            raise StageError(
                f"train loss is {v} at step {state.step - len(losses) + i + 1} of train@{job.name}; stopped, the "
                f"last good checkpoint (step {last_good}) is kept in {job.ckpt.path}; lower train.lr or raise "
                "train.warmup_steps")
        total += v
    state.window = (total, tokens, seconds)
    return v


def log_step(state: TrainState, cfg: TrainConfig, seq_len: int, seconds: float) -> None:
    """Count a step's wall time and tokens; at a log step (and the last) close the log window into train_log."""
    total, tokens, window_s = state.window
    state.train_s += seconds
    tokens, window_s = tokens + cfg.batch_size * seq_len, window_s + seconds
    if state.step % cfg.log_every == 0 or state.step == cfg.steps:
        n = cfg.log_every if state.step % cfg.log_every == 0 else state.step % cfg.log_every
        state.train_log.append({"step": state.step, "loss": total / n, "lr": state.scheduler.get_last_lr()[0],
                                "tokens_per_s": tokens / window_s})
        total, tokens, window_s = 0.0, 0, 0.0
    state.window = (total, tokens, window_s)


def periodic_evaluation(job: Job, state: TrainState) -> None:
    sequences = job.cfg.eval_batches * job.cfg.batch_size
    state.val_log.append({"step": state.step, **validate(job, state.ema.model, sequences, 1, job.reported[:1])})


def validate(job: Job, model: Denoiser, sequences: int, repeats: int, chosen: list[Estimate]) -> dict[str, float]:
    """Each of ``chosen`` for ``model`` (the EMA weights) over the first ``sequences`` validation sequences, each
    scored ``repeats`` times: on the device in float32 (no autocast, whatever the training precision), its blocks
    spread over the ranks, block k with seed train.seed + k."""
    cfg, device = job.cfg, job.dist.device
    block = validation_block(cfg.batch_size, job.seq_len, job.vocab.size)

    def denoise(xt: torch.Tensor, t: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        return model(xt.to(device), t.to(device), None if state is None else state.to(device))

    def score(k: int, rows: slice) -> list[float]:
        x0 = torch.from_numpy(job.validation[rows].astype(np.int64)).to(device)
        means = validation_estimates(denoise, job.on_device, x0, block, 1, cfg.seed + k, chosen, repeats)
        return [means[e.key] for e in chosen]

    was_training = model.training
    model.eval()
    with torch.no_grad():
        values = sharded_mean(score, min(sequences, len(job.validation)), block, len(chosen), job.dist.rank,
                              job.dist.world, device)
    model.train(was_training)
    return {e.key: v for e, v in zip(chosen, values, strict=True)}


def finish(job: Job, state: TrainState, final: dict[str, float]) -> None:
    """model.pt (the EMA weights when train.ema > 0), the logs and train.json with the final bounds and the denoising
    CE, each named and labelled (rank 0)."""
    cfg, model, reported = job.cfg, state.ema.model, job.reported
    val_nelbo = final["val_nelbo"]
    state.val_log.append({"step": state.step, "val_nelbo": val_nelbo})
    with atomic(model_path(job.name)) as tmp:
        model.save(tmp, kernel=job.name, steps=state.step, fingerprint=job.ckpt.fp, ema=cfg.ema)
    out = metrics_dir(job.name)
    out.mkdir(parents=True, exist_ok=True)
    for name, log in (("train_log.tsv", state.train_log), ("val_log.tsv", state.val_log)):
        with atomic(out / name) as tmp:
            pd.DataFrame(log).to_csv(tmp, sep="\t", index=False)
    tail = state.train_log[-max(1, len(state.train_log) // 10):]
    tokens = state.step * cfg.batch_size * job.seq_len
    cuda = job.dist.device.type == "cuda"
    write_json(out / "train.json", {
        "kernel": job.name,
        "steps": state.step,
        "parameters": model.num_parameters(),
        "train_loss": sum(r["loss"] for r in tail) / len(tail),
        "val_nelbo": val_nelbo,
        "val_ppl": math.exp(val_nelbo),
        "unigram_validation_ce": job.unigram_ce,
        "val_nelbo_minus_unigram": val_nelbo - job.unigram_ce,
        "tokens_per_s": tokens / state.train_s,
        "train_tokens": tokens,
        "train_s": state.train_s,
        **{e.key: final[e.key] for e in reported[1:]},
        "val_denoising_ppl": math.exp(final["val_denoising_ce"]),
        "denoising_ppl_label": DENOISING,
        "bound": reported[0].name,
        "bound_label": reported[0].label,
        "estimates": {e.key: {"name": e.name, "label": e.label, "value": final[e.key]} for e in reported},
        "kernel_type": job.kcfg.type,
        "model": "latent-state" if job.latent else "paper",
        "precision": "bf16 autocast" if cuda and cfg.precision == "bf16" else "float32",
        "validation_precision": "float32",  # the network's, whatever the training precision
        "device": torch.cuda.get_device_name(job.dist.device) if cuda else "cpu",
        "ranks": job.dist.world,
        "deterministic": cfg.deterministic,
        "versions": versions_in_use(),
    })
