"""Reverse-process samplers. All categorical draws use float64 probabilities and float64 uniforms.

Every sampler draws from the model of its kernel entry (docs/samplers.md), ``latent``:

- the paper's model (``latent=False``, every default kernel): the denoiser sees x_t only; every position draws
  x^_0 ~ p_theta(x_0 | x_t) and takes the model's reverse step given it, so the step is
  p_theta(x_s | x_t) = sum_{x_0} p_theta(x_0 | x_t) q(x_s | x_t, x_0) (Eq. 2):
  - mask: MDLM's step; the state is x_t itself ([MASK] or not), so it is tracked as in the latent-state model and
    a revealed token is carried over (``Kernel.constrain``);
  - uniform (every Markov kernel): the exact posterior of the Markov chain in x_t (``semdlm.ctmc``);
  - knn, semdlm_plus: the state-marginalised step (``latent.marginal_reverse_step``): no Markov chain in x_t has
    Eq. 117's marginals.
  Any token but [MASK] may change at any step: these samplers repair.
- the latent-state model (ours, ``latent=True``): the sampler carries each token's state (``semdlm.latent``) and the
  denoiser sees it; from t to s < t the new states are drawn first (R_{t->s} does not depend on x_0), the network is
  called only when some state changes, only those positions draw x^_0 ~ p_theta(x_0 | x_t, state_t), and a clean
  token is never redrawn.

The three samplers share one signature (``Sampler``) and are looked up by name (``get_sampler``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from semdlm import ctmc
from semdlm.config import SamplerConfig
from semdlm.kernels import Kernel
from semdlm.latent import (
    draw,
    forward_step,
    marginal_forward_step,
    marginal_reverse_step,
    move,
    reverse_states,
    reverse_step,
)

# (x_t [B, L], t [B], state [B, L] or None) -> logits [B, L, V]
Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# (logits [N, V], x [B, L], positions [N, 2]) -> logits: e.g. the Eq. 23 penalties; identity when None
Transform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of ids whose probability reaches ``top_p`` (nucleus); -inf elsewhere. float64."""
    logits = logits.to(torch.float64)
    if top_p >= 1.0:
        return logits
    p, order = torch.softmax(logits, -1).sort(-1, descending=True)
    drop_sorted = (p.cumsum(-1) - p) >= top_p  # mass before this id already reaches top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def truncate(logits: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Top-k (0 = off) then nucleus truncation of logits ([N, V]), float64; -inf outside the kept set."""
    logits = logits.to(torch.float64)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return top_p_filter(logits, top_p)


def categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``logits`` ([N, V]), with float64 probabilities and uniforms."""
    return draw(torch.softmax(logits.to(torch.float64), dim=-1), generator)


@dataclass
class SampleResult:
    ids: torch.Tensor  # [N, L] long
    nfe: int  # network function evaluations
    revisions: torch.Tensor  # [N, L] long: changes of each position's token after it first held a data token

    @property
    def mean_revisions(self) -> float:
        """Revisions per position (0 for mask without correctors: a revealed token is never redrawn)."""
        return float(self.revisions.double().mean())


class Chain:
    """The sampler's state: tokens x ([B, L]), latent states (tracked in the latent-state model and for the
    absorbing kernel, whose state x_t shows), the network and its call count, the penalties, and the revision count
    of every position (``commit``)."""

    def __init__(self, denoise: Denoise, kernel: Kernel, num: int, seq_len: int, latent: bool,
                 unigram: torch.Tensor | None, generator: torch.Generator | None,
                 transform: Transform | None = None) -> None:
        self.denoise, self.kernel, self.num, self.gen, self.transform = denoise, kernel, num, generator, transform
        self.latent = latent
        self.tracked = latent or kernel.is_absorbing
        self.markov = not self.tracked and kernel.is_markov  # the paper's uniform: the Markov chain in x_t
        if unigram is None and (kernel.schedule.alpha_min > 0 or kernel.uses_neighbours):
            raise ValueError(f"kernel {kernel.name!r} needs unigram to draw its t=1 reference distribution")
        self.x, self.state = kernel.sample_prior((num, seq_len), kernel.nu if unigram is None else unigram, generator)
        self.held = self.data(self.x)
        self.revisions = torch.zeros_like(self.x)
        self.nfe = 0

    def data(self, x: torch.Tensor) -> torch.Tensor:
        """Where x holds a data token (anything but [MASK])."""
        return x != self.kernel.mask_id if self.kernel.is_absorbing else torch.ones_like(x, dtype=torch.bool)

    def commit(self, x: torch.Tensor, state: torch.Tensor | None = None) -> None:
        """Take the tokens ``x`` (and states) of the whole sequence, counting a revision at every position whose token
        changes after it first held a data token."""
        self.revisions += (x != self.x) & self.held
        self.held |= self.data(x)
        self.x = x
        if state is not None:
            self.state = state

    def logits(self, level: float) -> torch.Tensor:
        """Constrained logits of p_theta(x_0 | x, state) at noise ``level`` for every position ([B, L, V])."""
        seen = self.state if self.latent else None
        t = torch.full((self.num,), level, device=self.x.device)
        self.nfe += 1
        return self.kernel.constrain(self.denoise(self.x, t, seen), self.x, seen)

    def propose(self, logits: torch.Tensor, at: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
        """x^_0 at the positions ``at`` (bool [B, L]) from their logits, after the penalties and truncation."""
        rows = logits[at]
        if self.transform is not None:
            rows = self.transform(rows, self.x, at.nonzero())
        return categorical(truncate(rows, top_p, top_k), self.gen)

    def move(self, x: torch.Tensor, x0_hat: torch.Tensor, t: float, s: float) -> torch.Tensor:
        """The paper's model (untracked): tokens x ([n]) at level t moved to level s given x^_0, by the Markov chain's
        exact posterior (uniform) or the state-marginalised step (knn, semdlm_plus)."""
        step = ctmc.reverse_step if self.markov else marginal_reverse_step
        return step(self.kernel, x, x0_hat, t, s, self.gen)

    def reverse(self, t: float, s: float, cache: bool = True) -> None:
        """One exact step t -> s of the model over the whole sequence."""
        if self.tracked:
            new = reverse_states(self.kernel, self.state.reshape(-1), t, s, self.gen).view_as(self.state)
            change = new != self.state
            logits = self.logits(t) if change.any() or not cache else None
            x = self.x
            if change.any():
                x0_hat = self.propose(logits, change)
                x = x.clone()
                x[change] = move(self.kernel, x[change], self.state[change], new[change], x0_hat, self.gen)
            self.commit(x, new)
        else:
            x0_hat = self.propose(self.logits(t), torch.ones_like(self.x, dtype=torch.bool))
            self.commit(self.move(self.x.reshape(-1), x0_hat, t, s).view_as(self.x))

    def correct(self, s: float, ds: float, at: torch.Tensor) -> None:
        """Corrector at level s on the positions ``at``: x^_0 ~ p_theta(. | x_s), the process forward to s + ds and
        back to s. With the exact posterior it leaves the level-s law invariant (a Gibbs step through x_0)."""
        up = min(1.0, s + ds)
        x0_hat = self.propose(self.logits(s), at)
        x, state = self.x.clone(), self.state.clone()
        if self.tracked:
            moved, st = forward_step(self.kernel, x[at], state[at], x0_hat, s, up, self.gen)
            moved, state[at] = reverse_step(self.kernel, moved, st, x0_hat, up, s, self.gen)
        elif self.markov:
            moved = ctmc.forward_step(self.kernel, x[at], s, up, self.gen)
            moved = ctmc.reverse_step(self.kernel, moved, x0_hat, up, s, self.gen)
        else:
            moved = marginal_forward_step(self.kernel, x[at], x0_hat, s, up, self.gen)
            moved = marginal_reverse_step(self.kernel, moved, x0_hat, up, s, self.gen)
        x[at] = moved
        self.commit(x, state)

    def result(self) -> SampleResult:
        return SampleResult(self.x, self.nfe, self.revisions)


class Sampler(Protocol):
    """The signature every sampler shares: ``cfg`` with one step count; ``latent``: the kernel entry's model."""

    def __call__(self, denoise: Denoise, kernel: Kernel, cfg: SamplerConfig, num: int, seq_len: int, *,
                 latent: bool, generator: torch.Generator | None = None, unigram: torch.Tensor | None = None,
                 transform: Transform | None = None, on_step: Callable[[], None] | None = None) -> SampleResult: ...


def step_count(cfg: SamplerConfig) -> int:
    """The one step count a sampler runs (a list in ``sampler.steps`` is looped over by the caller)."""
    if not isinstance(cfg.steps, int):
        raise ValueError(f"sampler.steps={list(cfg.steps)}: a sampler runs one count; call it once per count")
    return cfg.steps


def ancestral(denoise: Denoise, kernel: Kernel, cfg: SamplerConfig, num: int, seq_len: int, *, latent: bool,
              generator: torch.Generator | None = None, unigram: torch.Tensor | None = None,
              transform: Transform | None = None, on_step: Callable[[], None] | None = None) -> SampleResult:
    """Ancestral sampling on ``cfg.steps`` uniform steps 1 -> 0 of the kernel's model (``Chain.reverse``).

    With ``cfg.cache`` a tracked chain (mask, the latent-state model) skips the network at steps where no position
    changes state (``cache=False`` calls it at every step with identical output). For the absorbing kernel this is
    MDLM's sampler. x_1 comes from the kernel's reference distribution with x_0 ~ ``unigram`` (needed by kernels
    whose t=1 law depends on x_0)."""
    steps = step_count(cfg)
    chain = Chain(denoise, kernel, num, seq_len, latent, unigram, generator, transform)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for k in range(steps):
        chain.reverse(float(grid[k]), float(grid[k + 1]), cfg.cache)
        if on_step is not None:
            on_step()
    return chain.result()


def _leap(x: torch.Tensor, jump: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One tau-leaping step per position: jump to y with probability jump[y] (row total capped at 1), else stay."""
    total = jump.sum(-1, keepdim=True)
    jump = torch.where(total > 1, jump / total, jump)
    return draw(jump.scatter(-1, x[:, None], (1 - jump.sum(-1, keepdim=True)).clamp_min(0.0)), generator)


def _rate_jumps(kernel: Kernel, x: torch.Tensor, p: torch.Tensor, level: torch.Tensor, dt: float,
                forward: bool) -> torch.Tensor:
    """Jump probabilities R dt of a Markov kernel at ``level`` ([N, V]): the model's reverse rate
    lambda nu(x) s(y) (``semdlm.ctmc``), plus the forward rate lambda nu(y) for a corrector step."""
    a = kernel.schedule.alpha(level)
    lam = ctmc.rate(kernel, level).clamp_max(1e12)
    r = lam * kernel.nu[x][:, None] * ctmc.model_ratio(p, x, kernel, a)
    if forward:
        r = r + lam * kernel.nu
    return (r * dt).scatter(-1, x[:, None], 0.0)


def tau_leaping(denoise: Denoise, kernel: Kernel, cfg: SamplerConfig, num: int, seq_len: int, *, latent: bool,
                generator: torch.Generator | None = None, unigram: torch.Tensor | None = None,
                transform: Transform | None = None, on_step: Callable[[], None] | None = None) -> SampleResult:
    """Tau-leaping with predictor-corrector (``cfg.corrector_steps`` correctors after each predictor step).

    The paper's model of uniform (a Markov kernel that is not absorbing): Campbell et al. (2022), each position jumps
    x -> y with probability R^_t(x -> y)(t - s), R^ = lambda_t nu(x) s(y) the model's reverse rate
    (``semdlm.ctmc``); the corrector at level s leaps with forward plus reverse rates, which leave q_s invariant.
    Every other model: its transition over a whole leap is known exactly, so the predictor is that transition
    (first-order rates would only add error and miss the jumps of the integer k_t), and the corrector is
    ``Chain.correct``. Correctors run after every predictor step except the last (s = 0).
    """
    steps = step_count(cfg)
    chain = Chain(denoise, kernel, num, seq_len, latent, unigram, generator, transform)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    everywhere = torch.ones_like(chain.x, dtype=torch.bool)

    def leap(level: torch.Tensor, dt: float, forward: bool) -> None:
        logits = chain.logits(float(level)).reshape(-1, kernel.vocab_size)
        if transform is not None:
            logits = transform(logits, chain.x, everywhere.nonzero())
        p = torch.softmax(logits.double(), -1)
        x = chain.x.reshape(-1)
        chain.commit(_leap(x, _rate_jumps(kernel, x, p, level, dt, forward), generator).view_as(chain.x))

    for k in range(steps):
        t, s = grid[k].clamp_max(1 - 1e-9), grid[k + 1]
        dt = float(t - s)
        if chain.markov:
            leap(t, dt, forward=False)
        else:
            chain.reverse(float(t), float(s), cache=False)
        for _ in range(cfg.corrector_steps if s > 0 else 0):
            if chain.markov:
                leap(s, dt, forward=True)
            else:
                chain.correct(float(s), dt, everywhere)
        if on_step is not None:
            on_step()
    return chain.result()


def blockwise(denoise: Denoise, kernel: Kernel, cfg: SamplerConfig, num: int, seq_len: int, *, latent: bool,
              generator: torch.Generator | None = None, unigram: torch.Tensor | None = None,
              transform: Transform | None = None, on_step: Callable[[], None] | None = None) -> SampleResult:
    """The paper's semi-autoregressive "blockwise predictor" sampler (Sec. 5.1, App. E.1, Eq. 121).

    The sequence is cut into ``cfg.strides`` blocks, denoised left to right with ``steps // strides`` steps each;
    every position starts from the kernel's reference distribution. A step t -> s of the current block is a
    predictor and ``cfg.corrector_steps`` correctors (``Chain.correct``) at level s on the block's unfrozen
    positions. The predictor: x^_0 ~ p_theta truncated by ``top_k`` / ``top_p`` at every unfrozen position of the
    block (in a tracked chain, where its state changes), the model's own reverse step given it (``Chain.reverse``'s
    move), kept with Eq. 121's confidence factor (1 - p_theta(x_t^i | x_t))^rho. A position is frozen once its
    confidence exceeds ``freeze_threshold``; a carried-over (known-clean) position has confidence 1. With
    ``cfg.projection`` the predictor is instead App. E.1's literal reading of Eq. 121: the proposal is projected to
    level s by the forward kernel, x ~ q_s(. | x^_0), and replaces x_t^i with probability
    (p_t - p_s) / p_t (1 - p_theta(x_t^i | x_t))^rho, p_t = 1 - alpha_t (docs/samplers.md: it does not converge).
    With rho = 0, no freezing, no truncation and no projection this is the exact ancestral sampler run block by
    block. NFE <= strides * (per-block steps + corrector_steps * (per-block steps - 1)).
    """
    steps = step_count(cfg)
    if seq_len % cfg.strides:
        raise ValueError(f"strides={cfg.strides} does not divide seq_len={seq_len}")
    chain = Chain(denoise, kernel, num, seq_len, latent, unigram, generator, transform)
    per_block = max(1, steps // cfg.strides)
    block = seq_len // cfg.strides
    grid = torch.linspace(1.0, 0.0, per_block + 1, dtype=torch.float64)
    cols = torch.arange(seq_len, device=chain.x.device)
    for b in range(cfg.strides):
        inside = ((cols >= b * block) & (cols < (b + 1) * block)).expand(num, -1)
        frozen = torch.zeros_like(inside)
        for k in range(per_block):
            t, s = float(grid[k]), float(grid[k + 1])
            if chain.tracked:
                new = reverse_states(kernel, chain.state.reshape(-1), t, s, generator).view_as(chain.state)
            change = inside & ~frozen
            if chain.tracked and not cfg.projection:
                change &= new != chain.state
            if change.any():
                logits = chain.logits(t)
                conf = torch.softmax(logits.double(), -1).gather(-1, chain.x[..., None]).squeeze(-1)
                frozen |= inside & (conf > cfg.freeze_threshold)
                change &= ~frozen
                x0_hat = chain.propose(logits, change, cfg.top_p, cfg.top_k)
                x, st = chain.x[change], chain.state[change]
                replace = 1.0
                if cfg.projection:  # x ~ q_s(. | x^_0), w.p. (p_t - p_s) / p_t = (alpha_s - alpha_t) / (1 - alpha_t)
                    proposal, new_st = (v[:, 0] for v in kernel.corrupt(
                        x0_hat[:, None], torch.full((len(x),), s, dtype=torch.float64, device=x.device), generator))
                    a_t, a_s = (float(kernel.schedule.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s))
                    replace = (a_s - a_t) / (1.0 - a_t)
                elif chain.tracked:
                    proposal, new_st = move(kernel, x, st, new[change], x0_hat, generator), new[change]
                else:
                    proposal, new_st = chain.move(x, x0_hat, t, s), st
                u = torch.rand(len(x), dtype=torch.float64, generator=generator, device=x.device)
                accept = u < replace * (1.0 - conf[change]).clamp_min(0.0) ** cfg.rho  # Eq. 121
                xs, states = chain.x.clone(), chain.state.clone()
                xs[change], states[change] = torch.where(accept, proposal, x), torch.where(accept, new_st, st)
                chain.commit(xs, states)
            for _ in range(cfg.corrector_steps if s > 0 else 0):
                chain.correct(s, t - s, inside & ~frozen)
            if on_step is not None:
                on_step()
    return chain.result()


SAMPLERS: dict[str, Sampler] = {"ancestral": ancestral, "tau_leaping": tau_leaping, "blockwise": blockwise}


def get_sampler(name: str) -> Sampler:
    """The sampler registered under ``name`` (``sampler.name``)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler.name={name!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
