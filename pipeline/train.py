"""train@<kernel>: fit the x0-prediction denoiser; resumable, NaN-safe, per-step logs for dvc plots.

One process, or ``train.devices`` processes under torchrun (DDP). Every rank draws the same global batch
(indices, t and x_t from one generator) and trains on its own rows of it, so the run is the same computation for
any number of ranks and accumulation steps, and a checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
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
    load_rows,
    load_split,
    load_unigram,
    load_vocab,
    metrics_dir,
    model_path,
)
from pipeline.common import StageError, atomic, load_params, read_json, write_json
from semdlm.config import KernelConfig, Params, TrainConfig
from semdlm.kernels import Kernel
from semdlm.likelihood import bound_name, token_prior_kl, validation_nelbo
from semdlm.loss import change_aware_loss, change_weights, stratified_times, time_weight, token_ce
from semdlm.model import Denoiser

EVAL_LOGITS = 2**27  # logits per validation batch (1 GiB of float64): bounds the batch at large L x V
RUNTIME_FIELDS = ("devices", "grad_accum", "device", "precision", "compile", "threads")  # not in the fingerprint


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def fingerprint(params: Params, kernel: str, vocab_size: int, seq_len: int) -> str:
    """Identity of a training run: a checkpoint is only resumed by a run with the same fingerprint."""
    train = {k: v for k, v in asdict(params.train).items() if k not in RUNTIME_FIELDS}
    blob = {"model": asdict(params.model), "train": train, "kernel": kernel,
            "kernel_cfg": asdict(params.kernels[kernel]), "vocab_size": vocab_size, "seq_len": seq_len}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def make_optimizer(model: Denoiser, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


@dataclass
class Batch:
    """One global batch, identical on every rank: x_0, x_t, its latent state, t, omega(t) and the Eq. 120
    normaliser sum_i w_i."""

    x0: torch.Tensor
    xt: torch.Tensor
    state: torch.Tensor
    t: torch.Tensor
    omega: torch.Tensor
    norm: torch.Tensor


def draw_batch(rows: np.ndarray, kernel: Kernel, cfg: TrainConfig, kcfg: KernelConfig,
               gen: torch.Generator) -> Batch:
    """The global batch of one optimiser step: cfg.batch_size sequences drawn with replacement, corrupted."""
    idx = torch.randint(len(rows), (cfg.batch_size,), generator=gen)
    return corrupt_batch(torch.from_numpy(rows[idx.numpy()].astype(np.int64)), kernel, cfg, kcfg, gen)


def corrupt_batch(x0: torch.Tensor, kernel: Kernel, cfg: TrainConfig, kcfg: KernelConfig,
                  gen: torch.Generator) -> Batch:
    """t (low-discrepancy if cfg.antithetic), x_t ~ q(.|x_0), omega(t) and sum_i w_i (Eq. 120) for ``x0``."""
    B = len(x0)
    if cfg.antithetic:
        t = stratified_times(B, cfg.t_eps, gen)
    else:
        t = cfg.t_eps + (1 - cfg.t_eps) * torch.rand(B, dtype=torch.float64, generator=gen)
    xt, state = kernel.corrupt(x0, t, gen)
    omega = time_weight(kernel, t) if kcfg.time_weight == "elbo" else torch.ones_like(t)
    return Batch(x0, xt, state, t, omega, change_weights(x0, xt, kcfg.lambda_chg, kcfg.lambda_same).sum())


def train_step(model: Callable[..., torch.Tensor], kernel: Kernel, batch: Batch, rows: slice, kcfg: KernelConfig,
               device: torch.device, latent: bool) -> torch.Tensor:
    """Eq. 120 loss of ``rows`` of the batch, normalised by the whole batch: the shards' losses add up to it.
    ``latent``: the model sees the latent state (and carries clean positions over)."""
    x0, xt, state = batch.x0[rows].to(device), batch.xt[rows].to(device), batch.state[rows].to(device)
    state = state if latent else None
    ce = token_ce(kernel.constrain(model(xt, batch.t[rows].float().to(device), state), xt, state), x0)
    return change_aware_loss(ce, x0, xt, batch.omega[rows].to(device), kcfg.lambda_chg, kcfg.lambda_same,
                             batch.norm.to(device))


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size and device (torchrun sets RANK / WORLD_SIZE)."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(cfg: TrainConfig) -> Dist:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.batch_size % (world * cfg.grad_accum):
        raise StageError(f"train.batch_size={cfg.batch_size} is not divisible by {world} ranks x "
                         f"train.grad_accum={cfg.grad_accum}; change batch_size or grad_accum")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise StageError("train.device=cuda but torch sees no CUDA device; use train.device=auto or cpu")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    return Dist(rank, world, device)


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
    """Full training state (model, optimiser, schedule, RNG, step, logs) in one weights-only file."""

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


class EMA:
    """Exponential moving average of the weights (decay 0 = off: the trained weights themselves)."""

    def __init__(self, model: Denoiser, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False) if decay else model

    @torch.no_grad()
    def update(self, model: Denoiser) -> None:
        if self.decay:
            for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1.0 - self.decay)


def run(params: Params, kernel_name: str) -> None:
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    dist = setup_dist(params.train)
    try:
        _train(params, kernel_name, dist)
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(params: Params, kernel_name: str, dist: Dist) -> None:
    cfg = params.train
    vocab = load_vocab()
    kernel = load_kernel(kernel_name, params, vocab)
    kcfg = params.kernels[kernel_name]
    train = load_rows("train")
    valid = load_split("valid") if dist.main else torch.zeros(0, train.shape[1], dtype=torch.long)  # rank 0 validates
    seq_len = train.shape[1]
    unigram_ce = read_json(PRIOR_METRICS, "prior")["unigram_valid_ce"]
    micro = cfg.batch_size // (dist.world * cfg.grad_accum)

    torch.manual_seed(cfg.seed)
    model = Denoiser(vocab.size, seq_len, params.model, kernel.mask_id,
                     kernel.num_states if params.model.latent_state else 0)
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
            ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, train_log, val_log = state["step"], state["train_log"], state["val_log"]
        train_seconds = state["train_seconds"]
        window_loss, window_tokens, window_time = state.get("window", (0.0, 0, 0.0))
        if dist.main:
            print(f"resuming {kernel_name} from step {step} ({ckpt.path})")
    if dist.rank:  # dropout differs between ranks
        torch.manual_seed(cfg.seed + 7919 * dist.rank + step)
    ddp = None
    if dist.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, broadcast_buffers=False)
    net: Callable[..., torch.Tensor] = ddp or model
    if cfg.compile:
        net = torch.compile(net)
    bf16 = dist.device.type == "cuda" and cfg.precision == "bf16"

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    eval_bs = min(micro, max(1, EVAL_LOGITS // (seq_len * vocab.size)))  # float64 bound arithmetic is on the CPU

    @functools.cache
    def prior() -> torch.Tensor | None:  # once per run, at the first evaluation (rank 0 only evaluates)
        return token_prior_kl(kernel, unigram, params.model.latent_state)

    def evaluate(batches: int, repeats: int = 1) -> float:
        """Bound over the first ``batches`` x batch_size validation sequences, with the EMA weights."""
        def denoise(xt: torch.Tensor, t: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
            with autocast():
                seen = None if state is None else state.to(dist.device)
                return ema.model(xt.to(dist.device), t.to(dist.device), seen).float().cpu()

        ema.model.eval()
        with torch.no_grad():
            v = validation_nelbo(denoise, kernel, valid, eval_bs, -(-batches * cfg.batch_size // eval_bs), cfg.seed,
                                 cfg.bound_steps, prior(), repeats, params.model.latent_state)
        ema.model.train()
        return v

    def barrier() -> None:
        if dist.world > 1:
            torch.distributed.barrier()

    model.train()
    last_good = step
    columns = (TextColumn(f"train@{kernel_name}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())
    # every rank corrupts the whole global batch on the CPU: on a GPU or over several ranks, draw the next one in a
    # background thread while this step computes (the generator is used in the same order: same results)
    prefetch = dist.device.type == "cuda" or dist.world > 1
    pending: Future[Batch] | None = None
    with Progress(*columns, disable=not dist.main) as bar, ThreadPoolExecutor(1) as pool:
        task = bar.add_task("train", total=cfg.steps, completed=step, loss=float("nan"))
        while step < cfg.steps:
            t0 = time.perf_counter()
            batch = pending.result() if pending else draw_batch(train, kernel, cfg, kcfg, gen)
            gen_state = gen.get_state()  # after this step's draws: what a resumed run continues from
            more = prefetch and step + 1 < cfg.steps
            pending = pool.submit(draw_batch, train, kernel, cfg, kcfg, gen) if more else None
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=dist.device)
            for j in range(cfg.grad_accum):
                start = (dist.rank * cfg.grad_accum + j) * micro
                defer = ddp is not None and j < cfg.grad_accum - 1  # all-reduce once, after the last micro-batch
                with (ddp.no_sync() if defer else contextlib.nullcontext()), autocast():
                    loss = train_step(net, kernel, batch, slice(start, start + micro), kcfg, dist.device,
                                      params.model.latent_state)
                loss_sum += loss.detach()
                (loss * dist.world if dist.world > 1 else loss).backward()  # DDP averages over ranks
            if dist.world > 1:
                torch.distributed.all_reduce(loss_sum)
            loss_value = float(loss_sum)
            if not math.isfinite(loss_value):
                raise StageError(
                    f"train loss is {loss_value} at step {step + 1} of train@{kernel_name}; stopped, the last good "
                    f"checkpoint (step {last_good}) is kept in {ckpt.path}; lower train.lr or raise train.warmup_steps"
                )
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            ema.update(model)
            step += 1
            dt = time.perf_counter() - t0
            train_seconds += dt
            window_loss += loss_value
            window_tokens += batch.x0.numel()
            window_time += dt
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                train_log.append({"step": step, "loss": window_loss / n, "lr": sched.get_last_lr()[0],
                                  "tokens_per_s": window_tokens / window_time})
                window_loss, window_tokens, window_time = 0.0, 0, 0.0
            if step % cfg.eval_every == 0 and step < cfg.steps:
                if dist.main:
                    val_log.append({"step": step, "val_nelbo": evaluate(cfg.eval_batches)})
                barrier()
            if (step % cfg.ckpt_every == 0 or step == cfg.steps) and dist.main:
                ckpt.save({"fingerprint": fp, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "generator": gen_state,
                           "torch_rng": torch.get_rng_state(), "step": step, "train_log": train_log,
                           "val_log": val_log, "train_seconds": train_seconds,
                           "window": (window_loss, window_tokens, window_time),
                           **({"ema": ema.model.state_dict()} if cfg.ema else {})})
                last_good = step
            bar.update(task, completed=step, loss=loss_value)
    if dist.main:
        _finish(params, kernel_name, vocab, kernel, ema.model, step, train_log, val_log, train_seconds, fp,
                evaluate, unigram_ce, len(valid), seq_len)
    barrier()


def _finish(params: Params, kernel_name: str, vocab: Vocab, kernel: Kernel, model: Denoiser, step: int,
            train_log: list[dict], val_log: list[dict], train_seconds: float, fp: str,
            evaluate: Callable[[int, int], float], unigram_ce: float, n_valid: int, seq_len: int) -> None:
    """Final validation bound, model.pt (the EMA weights when train.ema > 0), logs and train.json (rank 0)."""
    cfg = params.train
    val_nelbo = evaluate(max(1, math.ceil(min(n_valid, cfg.val_sequences) / cfg.batch_size)), cfg.val_repeats)
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
        "bound": bound_name(params.model.latent_state),
        "model": "latent-state" if params.model.latent_state else "paper",
    })
