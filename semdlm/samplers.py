"""Reverse-process samplers. All categorical draws use float64 probabilities and float64 uniforms.

Every sampler draws from one model per kernel (docs/samplers.md). In the latent-state model (``latent=True``, the
default) the sampler carries each token's state (``semdlm.latent``) and the denoiser sees it; going from t to
s < t the new states are drawn first (their reverse law R_{t->s} does not depend on x_0), the network is called
only when some position changes state, and only those positions draw x^_0 ~ p_theta(x_0 | x_t, state_t).
In the paper's model (``latent=False``) the denoiser sees x_t only and each step marginalises the state
(``latent.marginal_reverse_step``); for the absorbing kernel the state is x_t itself, so both models coincide.
Known-clean positions are always carried over (``Kernel.constrain``): a revealed token is never redrawn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from semdlm.ctmc import is_markov, model_ratio, rate
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


class Chain:
    """The sampler's state: tokens x ([B, L]), latent states (tracked in the latent-state model and for the
    absorbing kernel, whose state x_t shows), the network and its call count, the penalties."""

    def __init__(self, denoise: Denoise, kernel: Kernel, num: int, seq_len: int, latent: bool,
                 x0_dist: torch.Tensor | None, generator: torch.Generator | None,
                 transform: Transform | None = None) -> None:
        self.denoise, self.kernel, self.num, self.gen, self.transform = denoise, kernel, num, generator, transform
        self.latent = latent
        self.tracked = latent or kernel.is_absorbing
        if x0_dist is None and (kernel.schedule.alpha_min > 0 or kernel.uses_neighbours):
            raise ValueError(f"kernel {kernel.name!r} needs x0_dist to draw its t=1 reference distribution")
        self.x, self.state = kernel.sample_prior((num, seq_len), kernel.nu if x0_dist is None else x0_dist, generator)
        self.nfe = 0

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

    def reverse(self, t: float, s: float, cache: bool = True) -> None:
        """One exact step t -> s of the model over the whole sequence."""
        if self.tracked:
            new = reverse_states(self.kernel, self.state.reshape(-1), t, s, self.gen).view_as(self.state)
            change = new != self.state
            logits = self.logits(t) if change.any() or not cache else None
            if change.any():
                x0_hat = self.propose(logits, change)
                self.x[change] = move(self.kernel, self.x[change], self.state[change], new[change], x0_hat, self.gen)
            self.state = new
        else:
            x0_hat = self.propose(self.logits(t), torch.ones_like(self.x, dtype=torch.bool))
            self.x = marginal_reverse_step(self.kernel, self.x.reshape(-1), x0_hat, t, s, self.gen).view_as(self.x)

    def correct(self, s: float, ds: float, at: torch.Tensor) -> None:
        """Corrector at level s on the positions ``at``: x^_0 ~ p_theta(. | x_s), the process forward to s + ds and
        back to s. With the exact posterior it leaves the level-s law invariant (a Gibbs step through x_0)."""
        up = min(1.0, s + ds)
        x0_hat = self.propose(self.logits(s), at)
        x = self.x[at]
        if self.tracked:
            x, st = forward_step(self.kernel, x, self.state[at], x0_hat, s, up, self.gen)
            x, st = reverse_step(self.kernel, x, st, x0_hat, up, s, self.gen)
            self.state[at] = st
        else:
            x = marginal_forward_step(self.kernel, x, x0_hat, s, up, self.gen)
            x = marginal_reverse_step(self.kernel, x, x0_hat, up, s, self.gen)
        self.x[at] = x

    def result(self) -> SampleResult:
        return SampleResult(self.x, self.nfe)


def ancestral(
    denoise: Denoise,
    kernel: Kernel,
    num: int,
    seq_len: int,
    steps: int,
    generator: torch.Generator | None = None,
    x0_dist: torch.Tensor | None = None,
    on_step: Callable[[], None] | None = None,
    transform: Transform | None = None,
    cache: bool = True,
    latent: bool = True,
) -> SampleResult:
    """Ancestral sampling on ``steps`` uniform steps 1 -> 0 of the kernel's model (``Chain.reverse``).

    With ``cache`` the network is skipped at steps where no position changes state (``cache=False`` calls it at
    every step with identical output). For the absorbing kernel this is MDLM's sampler. x_1 comes from the
    kernel's reference distribution with x_0 ~ ``x0_dist`` (needed by kernels whose t=1 law depends on x_0)."""
    chain = Chain(denoise, kernel, num, seq_len, latent, x0_dist, generator, transform)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for k in range(steps):
        chain.reverse(float(grid[k]), float(grid[k + 1]), cache)
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
    lam = rate(kernel, level).clamp_max(1e12)
    r = lam * kernel.nu[x][:, None] * model_ratio(p, x, kernel, a)
    if forward:
        r = r + lam * kernel.nu
    return (r * dt).scatter(-1, x[:, None], 0.0)


def tau_leaping(
    denoise: Denoise,
    kernel: Kernel,
    num: int,
    seq_len: int,
    steps: int,
    generator: torch.Generator | None = None,
    corrector_steps: int = 0,
    transform: Transform | None = None,
    on_step: Callable[[], None] | None = None,
    x0_dist: torch.Tensor | None = None,
    latent: bool = True,
) -> SampleResult:
    """Tau-leaping with predictor-corrector.

    The paper's model of the Markov kernels (mask, uniform with ``latent=False``): Campbell et al. (2022), each
    position jumps x -> y with probability R^_t(x -> y)(t - s), R^ = lambda_t nu(x) s(y) the model's reverse rate
    (``semdlm.ctmc``); the corrector at level s leaps with forward plus reverse rates, which leave q_s invariant.
    Every other model: its transition over a whole leap is known exactly (``semdlm.latent``), so the predictor
    is that transition (first-order rates would only add error and miss the jumps of the integer k_t), and the
    corrector is ``Chain.correct``. Correctors run after every predictor step except the last (s = 0).
    """
    chain = Chain(denoise, kernel, num, seq_len, latent, x0_dist, generator, transform)
    rates = is_markov(kernel) and not latent and not kernel.is_absorbing
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    everywhere = torch.ones_like(chain.x, dtype=torch.bool)

    def leap(level: torch.Tensor, dt: float, forward: bool) -> None:
        logits = chain.logits(float(level)).reshape(-1, kernel.vocab_size)
        if transform is not None:
            logits = transform(logits, chain.x, everywhere.nonzero())
        p = torch.softmax(logits.double(), -1)
        x = chain.x.reshape(-1)
        chain.x = _leap(x, _rate_jumps(kernel, x, p, level, dt, forward), generator).view_as(chain.x)

    for k in range(steps):
        t, s = grid[k].clamp_max(1 - 1e-9), grid[k + 1]
        dt = float(t - s)
        if rates:
            leap(t, dt, forward=False)
        else:
            chain.reverse(float(t), float(s), cache=False)
        for _ in range(corrector_steps if s > 0 else 0):
            if rates:
                leap(s, dt, forward=True)
            else:
                chain.correct(float(s), dt, everywhere)
        if on_step is not None:
            on_step()
    return chain.result()


def blockwise(
    denoise: Denoise,
    kernel: Kernel,
    num: int,
    seq_len: int,
    steps: int,
    strides: int,
    generator: torch.Generator | None = None,
    x0_dist: torch.Tensor | None = None,
    top_p: float = 1.0,
    rho: float = 0.0,
    freeze_threshold: float = 1.0,
    transform: Transform | None = None,
    on_step: Callable[[], None] | None = None,
    top_k: int = 0,
    corrector_steps: int = 0,
    latent: bool = True,
) -> SampleResult:
    """The paper's semi-autoregressive "blockwise predictor" sampler (Sec. 5, App. E.1, Eq. 121).

    The sequence is cut into ``strides`` blocks, denoised left to right with ``steps // strides`` steps each;
    every position starts from the kernel's reference distribution. At a step t -> s of the current block the
    model's own reverse step proposes each position's next token (``Chain.reverse``'s move: new states first,
    then x^_0 ~ p_theta truncated by ``top_k`` / ``top_p`` where a state changes; in the paper's model x^_0 at
    every position and the state-marginalised step). Eq. 121's confidence factor accepts the proposal with
    probability (1 - p_theta(x_t^i | x_t))^rho, never at frozen positions (confidence above
    ``freeze_threshold``); a carried-over (known-clean) position has confidence 1 and is never redrawn. Then
    ``corrector_steps`` correctors at level s on the block's unfrozen positions. With rho = 0, no freezing and
    no truncation this is the exact ancestral sampler run block by block (docs/samplers.md). NFE <=
    strides * (per-block steps + corrector_steps * (per-block steps - 1)).
    """
    if seq_len % strides:
        raise ValueError(f"strides={strides} does not divide seq_len={seq_len}")
    chain = Chain(denoise, kernel, num, seq_len, latent, x0_dist, generator, transform)
    per_block = max(1, steps // strides)
    block = seq_len // strides
    grid = torch.linspace(1.0, 0.0, per_block + 1, dtype=torch.float64)
    cols = torch.arange(seq_len, device=chain.x.device)
    for b in range(strides):
        inside = ((cols >= b * block) & (cols < (b + 1) * block)).expand(num, -1)
        frozen = torch.zeros_like(inside)
        for k in range(per_block):
            t, s = float(grid[k]), float(grid[k + 1])
            if chain.tracked:
                new = reverse_states(kernel, chain.state.reshape(-1), t, s, generator).view_as(chain.state)
                change = (new != chain.state) & inside & ~frozen
            else:
                new, change = chain.state, inside & ~frozen
            if change.any():
                logits = chain.logits(t)
                conf = torch.softmax(logits.double(), -1).gather(-1, chain.x[..., None]).squeeze(-1)
                frozen |= inside & (conf > freeze_threshold)
                change &= ~frozen
                x0_hat = chain.propose(logits, change, top_p, top_k)
                x, st = chain.x[change], chain.state[change]
                if chain.tracked:
                    proposal, new_st = move(kernel, x, st, new[change], x0_hat, generator), new[change]
                else:
                    proposal, new_st = marginal_reverse_step(kernel, x, x0_hat, t, s, generator), st
                u = torch.rand(len(x), dtype=torch.float64, generator=generator, device=x.device)
                accept = u < (1.0 - conf[change]).clamp_min(0.0) ** rho  # Eq. 121's confidence factor
                chain.x[change] = torch.where(accept, proposal, x)
                chain.state[change] = torch.where(accept, new_st, st)
            for _ in range(corrector_steps if s > 0 else 0):
                chain.correct(s, t - s, inside & ~frozen)
            if on_step is not None:
                on_step()
    return chain.result()

