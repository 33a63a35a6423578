"""Reverse-process samplers. All categorical draws use float64 probabilities and float64 uniforms.

``ancestral`` is MDLM's sampler for the absorbing kernel: going from t to s < t, each masked position is
revealed with probability (alpha_s - alpha_t) / (1 - alpha_t) and then drawn from p_theta(x_0 | x_t). Which
positions change is decided first, the categorical draw is made only there, and the network is not called
at a step where nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from semdlm.kernels import Kernel

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B, L], t [B]) -> logits [B, L, V]


def categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``logits`` ([N, V]) by inverse CDF in float64."""
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    cdf = torch.cumsum(p, dim=-1)
    u = torch.rand(p.shape[0], 1, dtype=torch.float64, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(p.shape[1] - 1)


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
    on_step: Callable[[], None] | None = None,
) -> SampleResult:
    """MDLM ancestral sampling for the absorbing kernel, ``steps`` uniform steps from t=1 to t=0."""
    if not kernel.is_absorbing:
        raise ValueError(f"sampler 'ancestral' needs the absorbing kernel 'mask', not {kernel.name!r}")
    x = torch.full((num, seq_len), kernel.mask_id, dtype=torch.long)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    nfe = 0
    for k in range(steps):
        t, s = grid[k], grid[k + 1]
        a_t, a_s = kernel.schedule.alpha(t), kernel.schedule.alpha(s)
        reveal_p = (a_s - a_t) / (1.0 - a_t)
        u = torch.rand(x.shape, dtype=torch.float64, generator=generator)
        reveal = (x == kernel.mask_id) & (u < reveal_p)
        if reveal.any():
            logits = denoise(x, torch.full((num,), float(t)))
            nfe += 1
            x[reveal] = categorical(logits[reveal], generator)
        if on_step is not None:
            on_step()
    return SampleResult(x, nfe)
