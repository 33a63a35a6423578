"""train@<kernel>: fit the x0-prediction denoiser; resumable, NaN-safe, per-step logs for dvc plots.

One process, or ``train.devices`` processes under torchrun (DDP). The step's math is ``semdlm.training``: every rank
advances one generator in the same way, reads and corrupts only its own micro-batches of the global batch and seeds
their dropout from it. Runs with the same number of micro-batches (ranks x grad_accum) are the same computation up to
the order of float sums, and a checkpoint (whose generator state is all the randomness there is) resumes on any number
of ranks. The loss is read back from the device only at log, checkpoint and evaluation steps. Validation is spread
over the ranks and runs on the device in float32, after the checkpoint of its step is written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.artifacts import (
    PRIOR_METRICS,
    Vocab,
    checkpoint_dir,
    load_kernel,
    load_unigram,
    load_vocab,
    mapped_rows,
    metrics_dir,
    model_path,
)
from pipeline.common import StageError, atomic, autocast, load_params, read_json, resolve_device, write_json
from semdlm.config import Params, TrainConfig
from semdlm.kernels import Kernel
from semdlm.likelihood import DENOISING, Estimate, estimates, validation_estimates
from semdlm.model import Denoiser
from semdlm.training import (
    EMA,
    Batch,
    ImpossibleTarget,
    draw_batch,
    lr_factor,
    make_optimizer,
    normaliser,
    train_step,
)

EVAL_LOGITS = 2**27  # logits per validation block (1 GiB of float64): bounds the block at large L x V
RUNTIME_FIELDS = ("devices", "grad_accum", "device", "precision", "compile", "threads", "deterministic")  # not in the
# fingerprint: how a run is computed, not what (precision and device are recorded in train.json instead)


def fingerprint(params: Params, kernel: str, vocab_size: int, seq_len: int) -> str:
    """Identity of a training run: a checkpoint is only resumed by a run with the same fingerprint."""
    train = {k: v for k, v in asdict(params.train).items() if k not in RUNTIME_FIELDS}
    blob = {"model": asdict(params.model), "train": train, "kernel": kernel,
            "kernel_cfg": asdict(params.kernels[kernel]), "vocab_size": vocab_size, "seq_len": seq_len}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


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
    """Full training state (model, EMA, optimiser, schedule, data generator, step, logs) in one weights-only file."""

    def __init__(self, kernel: str) -> None:
        self.path = checkpoint_dir(kernel) / "state.pt"

    def save(self, state: dict) -> None:
        with atomic(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, fp: str) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise StageError(
                f"checkpoint {self.path} is corrupted ({e.__class__.__name__}); delete it to train from scratch"
            ) from None
        if state.get("fingerprint") != fp:
            print(f"note: {self.path} was written with other params; training from scratch")
            return None
        return state


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
    cfg = params.train
    vocab = load_vocab()
    kernel = load_kernel(kernel_name, params, vocab)
    on_device = kernel.to(dist.device)  # corruption runs on the CPU; the loss and the bound on the device
    kcfg = params.kernels[kernel_name]
    train, valid = shared_rows("train", dist), shared_rows("valid", dist)
    seq_len = train.shape[1]
    unigram_ce = read_json(PRIOR_METRICS, "prior")["unigram_valid_ce"]
    pieces = dist.world * cfg.grad_accum  # micro-batches of the global batch; this rank computes `mine`
    micro = cfg.batch_size // pieces
    mine = range(dist.rank * cfg.grad_accum, (dist.rank + 1) * cfg.grad_accum)

    torch.manual_seed(cfg.seed)
    model = Denoiser(vocab.size, seq_len, params.model, kernel.mask_id, kernel.num_states if kcfg.latent_state else 0)
    unigram = load_unigram(vocab)
    with torch.no_grad():  # start at the unigram predictor: every step is spent on learning from context
        model.bias.copy_(unigram.clamp_min(1e-12).log().float())
    model.to(dist.device)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    ema = EMA(model, cfg.ema)
    fp = fingerprint(params, kernel_name, vocab.size, seq_len)
    ckpt = Checkpoint(kernel_name)
    step, train_log, val_log, train_seconds = 0, [], [], 0.0
    window_loss, window_tokens, window_time = 0.0, 0, 0.0  # the log window in progress (part of the state)
    if (state := ckpt.load(fp)) is not None:
        model.load_state_dict(state["model"])
        if cfg.ema:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        step, train_log, val_log = state["step"], state["train_log"], state["val_log"]
        train_seconds = state["train_seconds"]
        window_loss, window_tokens, window_time = state["window"]
        if dist.main:
            print(f"resuming {kernel_name} from step {step} ({ckpt.path})")
    ddp = None
    if dist.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, broadcast_buffers=False)
    net: Callable[..., torch.Tensor] = ddp or model
    if cfg.compile:
        net = torch.compile(net)
    eval_bs = min(cfg.batch_size, max(1, EVAL_LOGITS // (seq_len * vocab.size)))  # the same for any rank count

    @functools.cache
    def reported() -> list[Estimate]:  # once per run (their prior terms), at the first evaluation, on the device
        return estimates(on_device, kcfg.latent_state, cfg.bound_steps, unigram.to(dist.device))

    def denoise(xt: torch.Tensor, t: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """EMA logits in float32 on the device (no autocast, whatever the training precision), where the bound's
        tensors are; the latent state goes along when the model sees it."""
        return ema.model(xt.to(dist.device), t.to(dist.device), None if state is None else state.to(dist.device))

    def evaluate(sequences: int, repeats: int, chosen: list[Estimate]) -> dict[str, float]:
        """Each of ``chosen`` over the first ``sequences`` validation sequences: blocks of eval_bs, block k scored by
        rank k mod world with its own seed, the per-block sums all-reduced (the same value for any rank count)."""
        n = min(sequences, len(valid))
        starts = range(0, n, eval_bs)
        sums = torch.zeros(len(starts), len(chosen), dtype=torch.float64, device=dist.device)
        was_training = ema.model.training
        ema.model.eval()
        with torch.no_grad():
            for k in range(dist.rank, len(starts), dist.world):
                x0 = torch.from_numpy(valid[starts[k] : min(starts[k] + eval_bs, n)].astype(np.int64))
                means = validation_estimates(denoise, on_device, x0.to(dist.device), eval_bs, 1, cfg.seed + k,
                                             chosen, repeats)
                sums[k] = torch.tensor([means[e.key] for e in chosen], dtype=torch.float64) * len(x0)
        ema.model.train(was_training)
        if dist.world > 1:
            torch.distributed.all_reduce(sums)
        return {e.key: float(v) / n for e, v in zip(chosen, sums.sum(0), strict=True)}

    def periodic_evaluation() -> None:  # the primary bound only
        val_log.append({"step": step, **evaluate(cfg.eval_batches * cfg.batch_size, 1, reported()[:1])})

    def drawn(pending: Future[Batch] | None) -> Batch:
        try:
            return pending.result() if pending else draw(gen)
        except ImpossibleTarget as e:
            raise StageError(
                f"train sequence {e.row} has token id {e.token} ({vocab.tokens[e.token]}) as a clean token, whose "
                "logit is -inf, so the loss would be infinite: the corpus spells a special token; rebuild the tokens "
                "so that such text is encoded as text (`dvc repro tokenize`)"
            ) from None

    draw = functools.partial(draw_batch, train, kernel, cfg, kcfg, pieces=pieces, mine=mine, never=model.mask_id)
    model.train()
    if 0 < step < cfg.steps and step % cfg.eval_every == 0 and all(r["step"] != step for r in val_log):
        periodic_evaluation()  # the run stopped between this step's checkpoint and its evaluation
    last_good, last_loss = step, float("nan")
    losses: list[torch.Tensor] = []  # this rank's loss of each step since the last check, on the device
    columns = (TextColumn(f"train@{kernel_name}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())
    # on a GPU or over several ranks, draw and corrupt the next batch in a background thread while this step
    # computes (the generator is used in the same order: same results)
    prefetch = dist.device.type == "cuda" or dist.world > 1
    pending: Future[Batch] | None = None
    with Progress(*columns, disable=not dist.main) as bar, ThreadPoolExecutor(1) as pool:
        task = bar.add_task("train", total=cfg.steps, completed=step, loss=float("nan"))
        while step < cfg.steps:
            t0 = time.perf_counter()
            batch = drawn(pending)
            gen_state = gen.get_state()  # after this step's draws: what a resumed run continues from
            pending = pool.submit(draw, gen) if prefetch and step + 1 < cfg.steps else None
            batch = batch.to(dist.device)
            if dist.world > 1:
                torch.distributed.all_reduce(batch.counts)  # Eq. 120's normaliser is the global batch's
            norm = normaliser(batch.counts, kcfg)
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=dist.device)
            for j in range(cfg.grad_accum):
                defer = ddp is not None and j < cfg.grad_accum - 1  # all-reduce once, after the last micro-batch
                with (ddp.no_sync() if defer else contextlib.nullcontext()), autocast(dist.device, cfg.precision):
                    loss = train_step(net, on_device, batch, slice(j * micro, (j + 1) * micro), kcfg, norm,
                                      kcfg.latent_state, batch.seeds[j])
                loss_sum += loss.detach()
                (loss * dist.world if dist.world > 1 else loss).backward()  # DDP averages over ranks
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            ema.update(model)
            losses.append(loss_sum)
            step += 1
            persist = step % cfg.ckpt_every == 0 or step == cfg.steps or step % cfg.eval_every == 0
            if persist or step % cfg.log_every == 0:  # read the losses back: check them before they are kept
                values = torch.stack(losses)
                if dist.world > 1:
                    torch.distributed.all_reduce(values)
                for i, v in enumerate(values.tolist()):
                    if not math.isfinite(v):
                        raise StageError(
                            f"train loss is {v} at step {step - len(losses) + i + 1} of train@{kernel_name}; stopped, "
                            f"the last good checkpoint (step {last_good}) is kept in {ckpt.path}; lower train.lr or "
                            "raise train.warmup_steps")
                    window_loss += v
                losses, last_loss = [], v
            dt = time.perf_counter() - t0
            train_seconds += dt
            window_tokens += cfg.batch_size * seq_len
            window_time += dt
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                train_log.append({"step": step, "loss": window_loss / n, "lr": sched.get_last_lr()[0],
                                  "tokens_per_s": window_tokens / window_time})
                window_loss, window_tokens, window_time = 0.0, 0, 0.0
            if persist:
                if dist.main:  # written before this step's evaluation: a resume re-runs only the evaluation
                    ckpt.save({"fingerprint": fp, "model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "generator": gen_state, "step": step,
                               "train_log": train_log, "val_log": val_log, "train_seconds": train_seconds,
                               "window": (window_loss, window_tokens, window_time),
                               **({"ema": ema.state_dict()} if cfg.ema else {})})
                last_good = step
                if step % cfg.eval_every == 0 and step < cfg.steps:
                    periodic_evaluation()
            bar.update(task, completed=step, loss=last_loss)
    final = evaluate(cfg.val_sequences, cfg.val_repeats, reported())
    if dist.main:
        _finish(params, kernel_name, vocab, kernel, ema.model, step, train_log, val_log, final, reported(),
                train_seconds, fp, unigram_ce, seq_len, dist)
    dist.barrier()


def _finish(params: Params, kernel_name: str, vocab: Vocab, kernel: Kernel, model: Denoiser, step: int,
            train_log: list[dict], val_log: list[dict], final: dict[str, float], reported: list[Estimate],
            train_seconds: float, fp: str, unigram_ce: float, seq_len: int, dist: Dist) -> None:
    """model.pt (the EMA weights when train.ema > 0), logs and train.json with the final bounds and the denoising
    CE, each named and labelled (rank 0)."""
    cfg, kcfg = params.train, params.kernels[kernel_name]
    val_nelbo = final["val_nelbo"]
    val_log.append({"step": step, "val_nelbo": val_nelbo})
    with atomic(model_path(kernel_name)) as tmp:
        meta = {"vocab_size": vocab.size, "seq_len": seq_len, "model": asdict(params.model),
                "mask_id": kernel.mask_id, "num_states": model.num_states, "kernel": kernel_name, "steps": step,
                "fingerprint": fp, "ema": cfg.ema}
        torch.save({"meta": meta, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, tmp)
    out = metrics_dir(kernel_name)
    out.mkdir(parents=True, exist_ok=True)
    with atomic(out / "train_log.tsv") as tmp:
        pd.DataFrame(train_log).to_csv(tmp, sep="\t", index=False)
    with atomic(out / "val_log.tsv") as tmp:
        pd.DataFrame(val_log).to_csv(tmp, sep="\t", index=False)
    tail = train_log[-max(1, len(train_log) // 10):]
    write_json(out / "train.json", {
        "kernel": kernel_name,
        "steps": step,
        "parameters": model.num_parameters(),
        "train_loss": sum(r["loss"] for r in tail) / len(tail),
        "val_nelbo": val_nelbo,
        "val_ppl": math.exp(val_nelbo),
        "unigram_valid_ce": unigram_ce,
        "val_nelbo_minus_unigram": val_nelbo - unigram_ce,
        "tokens_per_s": step * cfg.batch_size * seq_len / train_seconds,
        "train_tokens": step * cfg.batch_size * seq_len,
        "train_seconds": train_seconds,
        **{e.key: final[e.key] for e in reported[1:]},
        "val_denoising_ppl": math.exp(final["val_denoising_ce"]),
        "denoising_ppl_label": DENOISING,
        "bound": reported[0].name,
        "bound_label": reported[0].label,
        "estimates": {e.key: {"name": e.name, "label": e.label, "value": final[e.key]} for e in reported},
        "kernel_type": kcfg.type,
        "model": "latent-state" if kcfg.latent_state else "paper",
        "precision": "bf16 autocast" if dist.device.type == "cuda" and cfg.precision == "bf16" else "float32",
        "validation_precision": "float32",  # the network's, whatever the training precision
        "device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
        "ranks": dist.world,
        "deterministic": cfg.deterministic,
    })
