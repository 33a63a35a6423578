"""Reverse-process samplers. All categorical draws use float64 probabilities and float64 uniforms.

``ancestral`` works for every kernel. For the absorbing kernel it is MDLM's sampler: going from t to s < t,
each masked position is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t) and then drawn from
p_theta(x_0 | x_t); which positions change is decided first, the categorical draw is made only there, and
the network is not called at a step where nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from semdlm.coupling import forward_step, reverse_step
from semdlm.ctmc import is_markov, model_ratio, rate
from semdlm.kernels import Kernel

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B, L], t [B]) -> logits [B, L, V]
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


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of (unnormalised) float64 ``probs`` ([N, V]) by inverse CDF."""
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[1] - 1)


def categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``logits`` ([N, V]), with float64 probabilities and uniforms."""
    return draw(torch.softmax(logits.to(torch.float64), dim=-1), generator)


def initial_state(kernel: Kernel, num: int, seq_len: int, x0_dist: torch.Tensor | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """x_1 from the kernel's reference distribution, with x_0 ~ ``x0_dist`` where that law depends on x_0."""
    if kernel.is_absorbing:
        return torch.full((num, seq_len), kernel.mask_id, dtype=torch.long)
    if x0_dist is None and (kernel.schedule.alpha_min > 0 or kernel.uses_neighbours):
        raise ValueError(f"kernel {kernel.name!r} needs x0_dist to draw its t=1 reference distribution")
    return kernel.sample_prior((num, seq_len), x0_dist if x0_dist is not None else kernel.nu, generator)


@dataclass
class SampleResult:
    ids: torch.Tensor  # [N, L] long
    nfe: int  # network function evaluations


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
) -> SampleResult:
    """Ancestral sampling x_s ~ sum_x0 p_theta(x_0 | x_t) q(x_s | x_t, x_0) on ``steps`` uniform steps, 1 -> 0.

    Absorbing kernel: MDLM's sampler (reveal first, draw only where revealed, skip the network when nothing
    is revealed; ``cache=False`` calls it at every step, as MDLM's plain sampler, with identical output).
    Other kernels: draw x_0 ~ p_theta(. | x_t) per position, then the reverse coupling of
    ``semdlm.coupling`` (exact marginals q_s). x_1 comes from the kernel's reference distribution with
    x_0 ~ ``x0_dist`` (needed only by kernels whose t=1 law depends on x_0, e.g. knn).
    """
    x = initial_state(kernel, num, seq_len, x0_dist, generator)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    nfe = 0
    for k in range(steps):
        t, s = float(grid[k]), float(grid[k + 1])
        tt = torch.full((num,), t)
        if kernel.is_absorbing:
            a_t, a_s = kernel.schedule.alpha(grid[k]), kernel.schedule.alpha(grid[k + 1])
            u = torch.rand(x.shape, dtype=torch.float64, generator=generator)
            reveal = (x == kernel.mask_id) & (u < (a_s - a_t) / (1.0 - a_t))
            if not cache and not reveal.any():
                denoise(x, tt)  # the plain sampler's network call, whose output no position uses
                nfe += 1
            if reveal.any():
                logits = denoise(x, tt)[reveal]
                if transform is not None:
                    logits = transform(logits, x, reveal.nonzero())
                x[reveal] = categorical(logits, generator)
                nfe += 1
        else:
            logits = denoise(x, tt).reshape(num * seq_len, -1)
            nfe += 1
            if transform is not None:
                logits = transform(logits, x, torch.ones_like(x, dtype=torch.bool).nonzero())
            x0_hat = categorical(logits, generator)
            x = reverse_step(kernel, x.reshape(-1), x0_hat, t, s, generator).view(num, seq_len)
        if on_step is not None:
            on_step()
    return SampleResult(x, nfe)


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


def renoise_denoise(kernel: Kernel, x: torch.Tensor, x0_hat: torch.Tensor, s: float, ds: float,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Corrector for any kernel: the latent-flag process forward from s to s + ds and back, given x^_0.

    With x^_0 drawn from the exact posterior q(x_0 | x_s) this leaves q_s invariant (a Gibbs step through
    x_0; tests/test_coupling.py checks q_s(. | x_0) invariance)."""
    up = min(1.0, s + ds)
    return reverse_step(kernel, forward_step(kernel, x, x0_hat, s, up, generator), x0_hat, up, s, generator)


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
) -> SampleResult:
    """CTMC tau-leaping (Campbell et al. 2022) with predictor-corrector, for every kernel.

    Markov kernels (mask, uniform): predictor over [s, t] jumps x -> y with probability R^_t(x -> y)(t - s),
    R^ = lambda_t nu(x) s(y) the model's reverse rate (``semdlm.ctmc``); the corrector at level s uses
    forward plus reverse rates, lambda_s nu(y) + R^_s(x -> y), which leave q_s invariant.
    Other kernels (knn, SemDLM+) have no CTMC generator with their marginals (docs/likelihood.md): the chain is
    the latent-flag process of ``semdlm.coupling``, whose transition over a leap [s, t] is known in closed
    form, so the predictor takes it exactly given x^_0 ~ p_theta(x_0 | x_t) (first-order rates would add
    error and miss the jumps of the integer k_t), and the corrector is ``renoise_denoise``.
    Correctors run after every predictor step except the last (s = 0). NFE = steps + corrector_steps * (steps - 1).
    """
    markov = is_markov(kernel)
    x = initial_state(kernel, num, seq_len, x0_dist, generator).reshape(-1)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    nfe = 0

    def posterior(level: float) -> torch.Tensor:
        nonlocal nfe
        logits = denoise(x.view(num, seq_len), torch.full((num,), level)).reshape(num * seq_len, -1)
        nfe += 1
        if transform is not None:
            logits = transform(logits, x.view(num, seq_len), torch.ones(num, seq_len, dtype=torch.bool).nonzero())
        return torch.softmax(logits.double(), -1)

    for k in range(steps):
        t, s = grid[k].clamp_max(1 - 1e-9), grid[k + 1]
        dt = float(t - s)
        if markov:
            x = _leap(x, _rate_jumps(kernel, x, posterior(float(t)), t, dt, forward=False), generator)
        else:
            x = reverse_step(kernel, x, draw(posterior(float(t)), generator), float(t), float(s), generator)
        for _ in range(corrector_steps if s > 0 else 0):
            if markov:
                x = _leap(x, _rate_jumps(kernel, x, posterior(float(s)), s, dt, forward=True), generator)
            else:
                x = renoise_denoise(kernel, x, draw(posterior(float(s)), generator), float(s), dt, generator)
        if on_step is not None:
            on_step()
    return SampleResult(x.view(num, seq_len), nfe)


def truncate(logits: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Top-k (0 = off) then nucleus truncation of logits ([N, V]), float64; -inf outside the kept set."""
    logits = logits.to(torch.float64)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return top_p_filter(logits, top_p)


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
) -> SampleResult:
    """The paper's semi-autoregressive "blockwise predictor" sampler (Sec. 5, App. E.1, Eq. 121).

    The sequence is cut into ``strides`` blocks, denoised left to right with ``steps // strides`` steps each;
    every position starts from the kernel's reference distribution (nu for mask, uniform and SemDLM+). At a
    step t -> s of the current block: predict p_theta(x_0 | x_t), apply ``transform`` (penalties), truncate
    (``top_k``, ``top_p``), draw a clean proposal x^_0 and project it to level s with the kernel's reverse
    coupling q(x_s | x_t, x^_0) (``semdlm.coupling``: a corrupted token is replaced by x^_0 with probability
    (p_t - p_s) / p_t, p_t = 1 - alpha_t, else moved within the level-s kernel). The projected token is
    accepted with probability (1 - p_theta(x_t^i | x_t))^rho (Eq. 121's confidence factor), never at frozen
    positions (confidence above ``freeze_threshold``). Then ``corrector_steps`` predictor-corrector steps
    (``renoise_denoise``) at level s on the block. With rho = 0, no freezing and no truncation this is the
    exact ancestral sampler run block by block. (Reading Eq. 121 as "replace by a fresh draw from
    q_s(. | x^_0)" instead does not converge: for mask it unmasks only (t - s)^2 / t per step;
    docs/samplers.md.) NFE = strides * (per-block steps + corrector_steps * (per-block steps - 1)).
    """
    if seq_len % strides:
        raise ValueError(f"strides={strides} does not divide seq_len={seq_len}")
    per_block = max(1, steps // strides)
    block = seq_len // strides
    x = initial_state(kernel, num, seq_len, x0_dist, generator)
    grid = torch.linspace(1.0, 0.0, per_block + 1, dtype=torch.float64)
    nfe = 0
    for b in range(strides):
        lo, hi = b * block, (b + 1) * block
        frozen = torch.zeros(num, block, dtype=torch.bool)
        pos = torch.stack(torch.meshgrid(torch.arange(num), torch.arange(lo, hi), indexing="ij"), -1).reshape(-1, 2)

        def predict(level: float, lo: int = lo, hi: int = hi, pos: torch.Tensor = pos) -> torch.Tensor:
            nonlocal nfe
            logits = denoise(x, torch.full((num,), level))[:, lo:hi].reshape(num * block, -1)
            nfe += 1
            return logits if transform is None else transform(logits, x, pos)

        for k in range(per_block):
            t, s = float(grid[k]), float(grid[k + 1])
            logits = predict(t)
            current = x[:, lo:hi].reshape(-1)
            conf = torch.softmax(logits.double(), -1).gather(-1, current[:, None]).squeeze(-1).view(num, block)
            frozen |= conf > freeze_threshold
            x0_hat = categorical(truncate(logits, top_p, top_k), generator)
            proposal = reverse_step(kernel, current, x0_hat, t, s, generator).view(num, block)
            accept = torch.rand(num, block, dtype=torch.float64, generator=generator) < (1.0 - conf).clamp_min(0) ** rho
            x[:, lo:hi] = torch.where(accept & ~frozen, proposal, x[:, lo:hi])
            for _ in range(corrector_steps if s > 0 else 0):
                x0_hat = categorical(truncate(predict(s), top_p, top_k), generator)
                fixed = renoise_denoise(kernel, x[:, lo:hi].reshape(-1), x0_hat, s, t - s, generator)
                x[:, lo:hi] = torch.where(frozen, x[:, lo:hi], fixed.view(num, block))
            if on_step is not None:
                on_step()
    return SampleResult(x, nfe)
