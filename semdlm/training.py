"""The training step: the global batch (drawn, corrupted), the Eq. 120 loss of a shard of it, one optimiser step
(``optimizer_step``: accumulation, clipping, AdamW and its learning-rate schedule, the EMA of the weights), the state a
run resumes from (``TrainState``, its ``fingerprint``) and the validation bound spread over ranks (``sharded_mean``).
``pipeline/train.py`` adds devices, ranks, checkpoint files and logs; the benchmarks time this same step.

Randomness. A step's draws come from one generator ``gen`` that every rank holds in the same state: the rows of
the global batch, their times t, and two seeds per micro-batch (the global batch is cut into ``pieces`` micro-batches
of ``batch_size / pieces`` rows). One seed drives the corruption of that micro-batch, the other its dropout masks
(``train_step(seed=...)``). So a micro-batch is the same computation whichever rank computes it: runs with the same
number of micro-batches (ranks x accumulation steps) are the same computation up to the order of float sums, each
rank corrupts only its own rows, and a resume needs only ``gen``'s state.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from semdlm.config import KernelConfig, Params, TrainConfig
from semdlm.devices import autocast
from semdlm.kernels import Kernel
from semdlm.loss import change_aware_loss, stratified_times, time_weight, token_ce

if TYPE_CHECKING:
    from semdlm.model import Denoiser

SEED_MAX = 2**62  # seeds drawn for corruption and dropout lie in [0, SEED_MAX)
EVAL_LOGITS = 2**27  # logits per validation block (1 GiB of float64): bounds the block at large L x V
RUNTIME_FIELDS = ("devices", "grad_accum", "device", "precision", "compile", "threads", "deterministic")  # not in the
# fingerprint: how a run is computed, not what (precision and device are recorded in train.json instead)


CHECKPOINT_FORMAT = 2  # raised when TrainState's fields change: an older checkpoint is then not resumed


def fingerprint(params: Params, kernel: str, vocab_size: int, seq_len: int) -> str:
    """Identity of a training run: a checkpoint is only resumed by a run with the same fingerprint (the same params
    and checkpoint format)."""
    train = {k: v for k, v in asdict(params.train).items() if k not in RUNTIME_FIELDS}
    blob = {"format": CHECKPOINT_FORMAT, "model": asdict(params.model), "train": train, "kernel": kernel,
            "kernel_cfg": asdict(params.kernels[kernel]), "vocab_size": vocab_size, "seq_len": seq_len}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def init_output_bias(model: Denoiser, unigram: torch.Tensor) -> None:
    """Start at the unigram predictor (output bias = log m, m clamped at 1e-12): every step is spent on learning
    from context."""
    with torch.no_grad():
        model.bias.copy_(unigram.clamp_min(1e-12).log().float())


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with ``train.adam_beta1/adam_beta2/adam_eps``; no weight decay on biases (1-d parameters). The fused
    kernel (CPU and CUDA): the per-parameter loop of the default took 6x its time on the embedded model's CPU step."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=True)


class EMA:
    """Exponential moving average of the weights with MDLM's warm-up: the n-th update uses the decay
    min(decay, (1 + n) / (10 + n)). Decay 0 = off: the trained weights themselves."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).requires_grad_(False) if decay else model

    def rate(self, n: int) -> float:
        """The decay of the n-th update (n >= 1)."""
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.decay:
            self.updates += 1
            torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - self.rate(self.updates))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


@dataclass
class Batch:
    """Micro-batches of one global batch: x_0, x_t, the latent state, t, omega(t); ``counts`` = (changed, unchanged)
    positions of these rows (summed over all rows they give Eq. 120's normaliser, ``normaliser``); ``seeds`` = the
    dropout seed of each micro-batch (kept on the host)."""

    x0: torch.Tensor
    xt: torch.Tensor
    state: torch.Tensor
    t: torch.Tensor
    omega: torch.Tensor
    counts: torch.Tensor
    seeds: tuple[int, ...] = ()

    def to(self, device: torch.device) -> Batch:
        """This batch on ``device`` in one pinned, non-blocking host-to-device copy (on the CPU: itself)."""
        if device.type == "cpu":
            return self
        return self.unpack(self.pack().pin_memory().to(device, non_blocking=True))

    def pack(self) -> torch.Tensor:
        """Every tensor of the batch, in field order, in one flat int64 tensor (the float64 ones bit for bit)."""
        return torch.cat([x.reshape(-1).view(torch.int64) for x in self._tensors()])

    def unpack(self, flat: torch.Tensor) -> Batch:
        """The batch that ``flat`` (this batch's ``pack()``, on any device) holds."""
        like = self._tensors()
        parts = [p.view(x.dtype).view_as(x) for p, x in zip(flat.split([x.numel() for x in like]), like, strict=True)]
        return Batch(*parts, self.seeds)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.x0, self.xt, self.state, self.t, self.omega, self.counts


def draw_times(n: int, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """n diffusion times in [t_eps, 1] (float64): low-discrepancy if ``cfg.antithetic``, else i.i.d. uniform."""
    if cfg.antithetic:
        return stratified_times(n, cfg.t_eps, gen)
    return cfg.t_eps + (1 - cfg.t_eps) * torch.rand(n, dtype=torch.float64, generator=gen)


def corrupt_batch(x0: torch.Tensor, kernel: Kernel, cfg: TrainConfig, kcfg: KernelConfig, gen: torch.Generator,
                  t: torch.Tensor | None = None) -> Batch:
    """x_t ~ q(. | x_0), its latent state, omega(t) and the change counts of ``x0`` at times ``t`` (drawn with
    ``draw_times`` when None)."""
    t = draw_times(len(x0), cfg, gen) if t is None else t
    xt, state = kernel.corrupt(x0, t, gen)
    omega = time_weight(kernel, t) if kcfg.time_weight == "elbo" else torch.ones_like(t)
    changed = int((xt != x0).sum())
    return Batch(x0, xt, state, t, omega, torch.tensor([changed, x0.numel() - changed]))


class ImpossibleTarget(ValueError):
    """A clean token the model can never predict (its logit is -inf), e.g. [MASK] spelled in the corpus."""

    def __init__(self, row: int, token: int) -> None:
        super().__init__(f"sequence {row} has token id {token} as a clean token, whose logit the model sets to -inf")
        self.row, self.token = row, token


def draw_batch(rows: np.ndarray, kernel: Kernel, cfg: TrainConfig, kcfg: KernelConfig, gen: torch.Generator,
               pieces: int = 1, mine: range = range(1), never: int | None = None) -> Batch:
    """The micro-batches ``mine`` (of ``pieces``) of one step's global batch: ``cfg.batch_size`` sequences of
    ``rows`` drawn with replacement. Only those rows are read and corrupted; ``gen`` advances as on every rank.
    Raises ``ImpossibleTarget`` when one of them holds the id ``never`` (the id whose logit the model sets to
    -inf), before any loss is computed."""
    B = cfg.batch_size
    idx = torch.randint(len(rows), (B,), generator=gen)
    t = draw_times(B, cfg, gen)
    seeds = torch.randint(SEED_MAX, (pieces, 2), generator=gen)  # per micro-batch: corruption, dropout
    n = B // pieces
    parts = []
    for m in mine:
        sel = idx[m * n : (m + 1) * n]
        x0 = torch.from_numpy(rows[sel.numpy()].astype(np.int64))
        if never is not None and bool((bad := x0 == never).any()):
            raise ImpossibleTarget(int(sel[bad.any(1)][0]), never)
        corrupt_gen = torch.Generator().manual_seed(int(seeds[m, 0]))
        parts.append(corrupt_batch(x0, kernel, cfg, kcfg, corrupt_gen, t[m * n : (m + 1) * n]))
    return Batch(*(torch.cat([getattr(p, f) for p in parts]) for f in ("x0", "xt", "state", "t", "omega")),
                 torch.stack([p.counts for p in parts]).sum(0), tuple(int(s) for s in seeds[mine.start : mine.stop, 1]))


def normaliser(counts: torch.Tensor, kcfg: KernelConfig) -> torch.Tensor:
    """sum_i w_i of Eq. 120 from the (changed, unchanged) counts of the whole global batch (exact integers, so the
    same for any split of the batch)."""
    return (kcfg.lambda_chg * counts[0].double() + kcfg.lambda_same * counts[1].double()).float()


def train_step(model: Callable[..., torch.Tensor], kernel: Kernel, batch: Batch, rows: slice, kcfg: KernelConfig,
               norm: torch.Tensor, latent: bool, seed: int | None = None) -> torch.Tensor:
    """Eq. 120 loss of ``rows`` of the batch divided by ``norm`` (the whole global batch's normaliser), so that the
    shards' losses add up to the loss of the global batch. ``latent``: the model sees the latent state. The loss is
    that of the logits restricted by ``Kernel.constrain`` (carry-over), as the samplers and the bound restrict them.
    ``seed``: the global torch RNG (dropout, CPU and CUDA) is seeded with it first."""
    if seed is not None:
        torch.manual_seed(seed)
    x0, xt, state = batch.x0[rows], batch.xt[rows], batch.state[rows]
    state = state if latent else None
    ce = token_ce(model(xt, batch.t[rows].float(), state), x0, kernel, xt, state)
    return change_aware_loss(ce, x0, xt, batch.omega[rows], kcfg.lambda_chg, kcfg.lambda_same, norm)


@dataclass
class TrainState:
    """Everything a run resumes from: model, optimiser, schedule, EMA, the generator of the batches, the step, the
    logs and the log window in progress (loss sum, tokens, seconds). ``state_dict`` is the checkpoint."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA
    gen: torch.Generator
    step: int = 0
    train_log: list[dict] = field(default_factory=list)
    val_log: list[dict] = field(default_factory=list)
    train_s: float = 0.0
    window: tuple[float, int, float] = (0.0, 0, 0.0)

    VALUES = ("step", "train_log", "val_log", "train_s", "window")  # saved as they are

    @classmethod
    def new(cls, model: nn.Module, cfg: TrainConfig) -> TrainState:
        """Step 0 of ``model`` (already on its device): AdamW, the warm-up + cosine schedule, the EMA and the
        generator seeded with ``cfg.seed``."""
        opt = make_optimizer(model, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
        return cls(model, opt, sched, EMA(model, cfg.ema), torch.Generator().manual_seed(cfg.seed))

    def _stateful(self) -> dict[str, Any]:
        """The members saved by their own ``state_dict`` (the EMA only when it is on)."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                **({"ema": self.ema} if self.ema.decay else {})}

    def state_dict(self, generator: torch.Tensor | None = None) -> dict[str, Any]:
        """The checkpoint. ``generator``: the generator state to resume from, when the run has already drawn ahead
        of ``step`` (default: ``gen``'s own)."""
        return {**{k: m.state_dict() for k, m in self._stateful().items()},
                **{k: getattr(self, k) for k in self.VALUES},
                "generator": self.gen.get_state() if generator is None else generator}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, m in self._stateful().items():
            m.load_state_dict(state[k])
        for k in self.VALUES:
            setattr(self, k, state[k])
        self.gen.set_state(state["generator"])


def optimizer_step(state: TrainState, net: Callable[..., torch.Tensor], kernel: Kernel, batch: Batch,
                   cfg: TrainConfig, kcfg: KernelConfig, latent: bool,
                   ddp: torch.nn.parallel.DistributedDataParallel | None = None) -> torch.Tensor:
    """One optimiser step on ``batch`` (this rank's ``cfg.grad_accum`` micro-batches of a ``draw_batch``, on the
    device of ``kernel``): each micro-batch's Eq. 120 loss in ``cfg.precision`` (dropout seeded by its seed), the
    gradients accumulated (under ``ddp``, all-reduced once, after the last), clipped to ``cfg.grad_clip``; then
    AdamW, the schedule and the EMA advance and ``state.step`` counts one more. ``net`` computes the logits:
    ``state.model`` or a (DDP, compiled) wrapper of it; ``latent``: it sees the latent state. Returns this rank's
    loss of the step, on the device (no host sync)."""
    world = torch.distributed.get_world_size() if ddp is not None else 1
    if world > 1:
        torch.distributed.all_reduce(batch.counts)  # Eq. 120's normaliser is the global batch's
    norm = normaliser(batch.counts, kcfg)
    micro = len(batch.x0) // cfg.grad_accum
    state.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=batch.xt.device)
    for j in range(cfg.grad_accum):
        defer = ddp is not None and j < cfg.grad_accum - 1  # all-reduce once, after the last micro-batch
        with (ddp.no_sync() if defer else contextlib.nullcontext()), autocast(batch.xt.device, cfg.precision):
            loss = train_step(net, kernel, batch, slice(j * micro, (j + 1) * micro), kcfg, norm, latent,
                              batch.seeds[j])
        total += loss.detach()
        (loss * world if world > 1 else loss).backward()  # DDP averages over ranks
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.ema.update(state.model)
    state.step += 1
    return total


def validation_block(batch_size: int, seq_len: int, vocab_size: int) -> int:
    """Sequences per validation block: the training batch, fewer when its logits would exceed ``EVAL_LOGITS``
    (the same for any rank count)."""
    return min(batch_size, max(1, EVAL_LOGITS // (seq_len * vocab_size)))


def sharded_mean(score: Callable[[int, slice], list[float]], n: int, block: int, width: int = 1, rank: int = 0,
                 world: int = 1, device: torch.device | None = None) -> list[float]:
    """Means of ``width`` per-sequence values over ``n`` sequences in blocks of ``block``: block k (``rows``) is
    scored by rank k mod ``world`` as ``score(k, rows)`` (the block's ``width`` means; seed it with k), the
    per-block sums are all-reduced (on ``device``), so the values are the same for any number of ranks."""
    starts = range(0, n, block)
    sums = torch.zeros(len(starts), width, dtype=torch.float64, device=device)
    for k in range(rank, len(starts), world):
        rows = slice(starts[k], min(starts[k] + block, n))
        sums[k] = torch.tensor(score(k, rows), dtype=torch.float64) * (rows.stop - rows.start)
    if world > 1:
        torch.distributed.all_reduce(sums)
    return (sums.sum(0) / n).tolist()
