"""train@<kernel>: fit the x0-prediction denoiser; resumable, NaN-safe, per-step logs for dvc plots."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict

import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.artifacts import (
    PRIOR_METRICS,
    checkpoint_dir,
    load_kernel,
    load_split,
    load_unigram,
    load_vocab,
    metrics_dir,
    model_path,
)
from pipeline.common import StageError, atomic, read_json, write_json
from semdlm.config import KernelConfig, Params, TrainConfig
from semdlm.kernels import Kernel
from semdlm.likelihood import bound_name, validation_nelbo
from semdlm.loss import change_aware_loss, stratified_times, time_weight, token_ce
from semdlm.model import Denoiser


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def fingerprint(params: Params, kernel: str, vocab_size: int, seq_len: int) -> str:
    """Identity of a training run: a checkpoint is only resumed by a run with the same fingerprint."""
    blob = {"model": asdict(params.model), "train": asdict(params.train), "kernel": kernel,
            "kernel_cfg": asdict(params.kernels[kernel]), "vocab_size": vocab_size, "seq_len": seq_len}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def make_optimizer(model: Denoiser, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def train_step(model: Denoiser, kernel: Kernel, x0: torch.Tensor, cfg: TrainConfig, kcfg: KernelConfig,
               gen: torch.Generator) -> torch.Tensor:
    """Loss of one batch: t (low-discrepancy if cfg.antithetic), x_t ~ q(.|x_0), Eq. 120 weighting."""
    B = x0.shape[0]
    if cfg.antithetic:
        t = stratified_times(B, cfg.t_eps, gen)
    else:
        t = cfg.t_eps + (1 - cfg.t_eps) * torch.rand(B, dtype=torch.float64, generator=gen)
    xt = kernel.sample_xt(x0, t, gen)
    ce = token_ce(model(xt, t.float()), x0, xt, kernel)
    omega = time_weight(kernel, t) if kcfg.time_weight == "elbo" else torch.ones_like(t)
    return change_aware_loss(ce, x0, xt, omega, kcfg.lambda_chg, kcfg.lambda_same)


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


def run(params: Params, kernel_name: str) -> None:
    cfg = params.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    vocab = load_vocab()
    kernel = load_kernel(kernel_name, params, vocab)
    train, valid = load_split("train"), load_split("valid")
    seq_len = train.shape[1]
    unigram_ce = read_json(PRIOR_METRICS, "prior")["unigram_valid_ce"]

    torch.manual_seed(cfg.seed)
    model = Denoiser(vocab.size, seq_len, params.model, kernel.mask_id)
    unigram = load_unigram(vocab)
    with torch.no_grad():  # start at the unigram predictor: every step is spent on learning from context
        model.bias.copy_(unigram.clamp_min(1e-12).log().float())
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    fp = fingerprint(params, kernel_name, vocab.size, seq_len)
    ckpt = Checkpoint(kernel_name)
    step, train_log, val_log, train_seconds = 0, [], [], 0.0
    window_loss, window_tokens, window_time = 0.0, 0, 0.0  # the log window in progress (part of the state)
    if (state := ckpt.load(fp)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, train_log, val_log = state["step"], state["train_log"], state["val_log"]
        train_seconds = state["train_seconds"]
        window_loss, window_tokens, window_time = state.get("window", (0.0, 0, 0.0))
        print(f"resuming {kernel_name} from step {step} ({ckpt.path})")

    def evaluate(batches: int, repeats: int = 1) -> float:
        model.eval()
        with torch.no_grad():
            v = validation_nelbo(model, kernel, valid, cfg.batch_size, batches, cfg.seed, cfg.bound_steps, unigram,
                                 repeats)
        model.train()
        return v

    model.train()
    last_good = step
    columns = (TextColumn(f"train@{kernel_name}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=step, loss=float("nan"))
        while step < cfg.steps:
            t0 = time.perf_counter()
            x0 = train[torch.randint(len(train), (cfg.batch_size,), generator=gen)]
            loss = train_step(model, kernel, x0, cfg, params.kernels[kernel_name], gen)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise StageError(
                    f"train loss is {loss_value} at step {step + 1} of train@{kernel_name}; stopped, the last good "
                    f"checkpoint (step {last_good}) is kept in {ckpt.path}; lower train.lr or raise train.warmup_steps"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            dt = time.perf_counter() - t0
            train_seconds += dt
            window_loss += loss_value
            window_tokens += x0.numel()
            window_time += dt
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                train_log.append({"step": step, "loss": window_loss / n, "lr": sched.get_last_lr()[0],
                                  "tokens_per_s": window_tokens / window_time})
                window_loss, window_tokens, window_time = 0.0, 0, 0.0
            if step % cfg.eval_every == 0 and step < cfg.steps:
                val_log.append({"step": step, "val_nelbo": evaluate(cfg.eval_batches)})
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                ckpt.save({"fingerprint": fp, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "generator": gen.get_state(),
                           "torch_rng": torch.get_rng_state(), "step": step, "train_log": train_log,
                           "val_log": val_log, "train_seconds": train_seconds,
                           "window": (window_loss, window_tokens, window_time)})
                last_good = step
            bar.update(task, completed=step, loss=loss_value)

    val_nelbo = evaluate(max(1, math.ceil(min(len(valid), cfg.val_sequences) / cfg.batch_size)), cfg.val_repeats)
    val_log.append({"step": step, "val_nelbo": val_nelbo})
    with atomic(model_path(kernel_name)) as tmp:
        meta = {"vocab_size": vocab.size, "seq_len": seq_len, "model": asdict(params.model),
                "mask_id": kernel.mask_id, "kernel": kernel_name, "steps": step, "fingerprint": fp}
        torch.save({"meta": meta, "state_dict": model.state_dict()}, tmp)
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
        "bound": bound_name(kernel),
    })
