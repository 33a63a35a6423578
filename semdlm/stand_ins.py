"""Stand-ins for the pipeline's tables, of the same shapes, for the benchmarks: token rows, the x_0 law and
kernels over V ids with a random [V, width] neighbour table. What they cost to train on or sample from is what the
real tables cost (the same tensor shapes); what a model learns from them is noise."""

from __future__ import annotations

import numpy as np
import torch

from semdlm.config import KernelConfig
from semdlm.kernels import Kernel, get_kernel


def random_rows(n: int, seq_len: int, vocab_size: int, gen: torch.Generator) -> np.ndarray:
    """``n`` token rows ([n, seq_len] int64) drawn uniformly from every id but [MASK] = V - 1."""
    return torch.randint(0, vocab_size - 1, (n, seq_len), generator=gen).numpy()


def uniform_unigram(vocab_size: int, mask_id: int | None = None) -> torch.Tensor:
    """A uniform x_0 law ([V] float64) over every id but [MASK] (``mask_id``, default V - 1)."""
    m = torch.ones(vocab_size, dtype=torch.float64)
    m[vocab_size - 1 if mask_id is None else mask_id] = 0.0
    return m / m.sum()


def random_kernel(name: str, cfg: KernelConfig, vocab_size: int, gen: torch.Generator, width: int = 0,
                  mask_id: int | None = None) -> Kernel:
    """The kernel ``name`` (of family ``cfg.type``) over ``vocab_size`` ids with [MASK] = ``mask_id`` (default
    V - 1), nu uniform over the others and a random neighbour table [V, width] of those (``width`` 0: ``cfg.k_max``;
    never V x V)."""
    V = vocab_size
    nu = uniform_unigram(V, mask_id)
    valid = nu > 0
    ids = valid.nonzero().flatten()
    neighbours = ids[torch.randint(len(ids), (V, width or cfg.k_max), generator=gen)]
    return get_kernel(cfg.type, cfg, name=name, mask_id=V - 1 if mask_id is None else mask_id, valid=valid,
                      unigram_nu=nu, neighbours=neighbours)
