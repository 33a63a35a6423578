"""Frequency and semantic-frequency penalties on the denoiser's logits (Eq. 23 / Eq. 115):

    l~_i(k) = l_i(k) - lambda_freq log(1 + n_i(k)) - lambda_sem log(1 + m_i(k)),   m_i(k) = sum_l S_+(k, l) n_i(l)

n_i counts the tokens in the window of position i: the ``window`` positions on each side, i itself excluded
(ours: the paper says "a recent window"; in the semi-autoregressive sampler the left side holds the finished
strides). S_+(k, l) = max(0, cos(k, l)) for k in the neighbour table of l, 0 elsewhere: each window token adds
its similarity to at most k_max ids, so the cost is O(window * k_max) per position, never V x V. S_+ includes the
token itself (cosine 1), as the paper's S_+ does: a repeated token is hit by both terms.
Every tensor made here lives on the device of the inputs (the logits' for the [N, V] counts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # a type only: the metrics that count window tokens need no sampler
    from semdlm.samplers import Transform


def window_tokens(x: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """Token ids in the window of each (b, i) in ``positions`` ([N, 2]) -> [N, 2 * window], -1 = padding."""
    B, L = x.shape
    offsets = torch.cat([torch.arange(-window, 0, device=x.device), torch.arange(1, window + 1, device=x.device)])
    cols = positions[:, 1:2] + offsets  # [N, 2W]
    ok = (cols >= 0) & (cols < L)
    ids = x[positions[:, :1].expand_as(cols), cols.clamp(0, L - 1)]
    return torch.where(ok, ids, torch.full_like(ids, -1))


def penalise(
    logits: torch.Tensor,
    window_ids: torch.Tensor,
    lambda_freq: float,
    lambda_sem: float,
    neighbours: torch.Tensor | None = None,
    sims: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply Eq. 23 to ``logits`` [N, V] given each row's window ids [N, W] (-1 = none). Returns new logits."""
    if lambda_freq == 0 and lambda_sem == 0:
        return logits
    N, V = logits.shape
    valid = window_ids >= 0
    ids = window_ids.clamp_min(0)
    counts = torch.zeros(N, V, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, ids, valid.to(logits.dtype))  # n_i(k)
    out = logits - lambda_freq * torch.log1p(counts)
    if lambda_sem != 0:
        if neighbours is None or sims is None:
            raise ValueError("lambda_sem > 0 needs the neighbour table and its similarities (graph stage)")
        nb = neighbours[ids]  # [N, W, K]: the ids each window token is similar to
        s = sims[ids].clamp_min(0.0) * valid[..., None]  # S_+(k, l) for k in N(l)
        m = counts.scatter_add(1, nb.reshape(N, -1), s.reshape(N, -1).to(logits.dtype))  # S_+(k, k) = 1
        out = out - lambda_sem * torch.log1p(m)
    return out


def penalty(lambda_freq: float, lambda_sem: float, window: int, neighbours: torch.Tensor | None = None,
            sims: torch.Tensor | None = None) -> Transform | None:
    """The samplers' ``transform`` for Eq. 23: float64 logits penalised from the window of the current sequence
    (None when both lambdas are 0). ``neighbours``, ``sims``: the graph's [V, k_max] table, on the samplers' device."""
    if lambda_freq == 0 and lambda_sem == 0:
        return None

    def transform(logits: torch.Tensor, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return penalise(logits.double(), window_tokens(x, positions, window), lambda_freq, lambda_sem, neighbours, sims)

    return transform
