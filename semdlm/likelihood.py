"""Likelihood bounds used as validation NELBO ("test PPL", Table 2) for each kernel.

- mask: the MDLM continuous-time NELBO, E_t[ -alpha'_t / (1 - alpha_t) * sum_{masked i} -log p(x_0^i | x_t) ].
"""

from __future__ import annotations

import torch

from semdlm.kernels import Kernel
from semdlm.loss import mask_nelbo, stratified_times, token_ce
from semdlm.samplers import Denoise


def bound_name(kernel: Kernel) -> str:
    if kernel.is_absorbing:
        return "continuous-time NELBO (exact, MDLM)"
    raise NotImplementedError(f"no likelihood bound for kernel {kernel.name!r}")


def sequence_nelbo(denoise: Denoise, kernel: Kernel, x0: torch.Tensor, t: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """One-sample Monte-Carlo estimate of the NELBO (nats/token) of each sequence in x0 at times t ([B])."""
    xt = kernel.sample_xt(x0, t, generator)
    logits = denoise(xt, t.float())
    if kernel.is_absorbing:
        return mask_nelbo(token_ce(logits, x0, xt, kernel), kernel, t)
    raise NotImplementedError(f"no likelihood bound for kernel {kernel.name!r}")


def validation_nelbo(denoise: Denoise, kernel: Kernel, data: torch.Tensor, batch_size: int, batches: int,
                     seed: int) -> float:
    """Mean NELBO (nats/token) over the first ``batches * batch_size`` sequences, stratified t, fixed seed."""
    gen = torch.Generator().manual_seed(seed + 1)
    total, n = 0.0, 0
    for start in range(0, min(len(data), batches * batch_size), batch_size):
        x0 = data[start : start + batch_size]
        t = stratified_times(len(x0), 0.0, gen).clamp_min(1e-6)
        total += float(sequence_nelbo(denoise, kernel, x0, t, gen).sum())
        n += len(x0)
    return total / n
