"""A toy problem small enough to enumerate: V real tokens (+ [MASK]), length L, an explicit data law."""

from __future__ import annotations

import itertools

import torch

from semdlm.kernels import Kernel


class Toy:
    """Data distribution over V^L sequences and the exact posterior denoiser q(x_0^i | x_t) of a kernel."""

    def __init__(self, V: int = 4, L: int = 2, seed: int = 0, extra: int = 1) -> None:
        self.V, self.L = V, L
        self.vocab = V + extra  # room for [MASK] (id V) that is never a data token
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(V**L, generator=g, dtype=torch.float64) ** 3 + 0.02  # skewed, every sequence possible
        self.p = w / w.sum()  # [V^L]
        self.seqs = torch.tensor(list(itertools.product(range(V), repeat=L)), dtype=torch.long)  # [V^L, L]

    def entropy(self) -> float:
        """True NLL of the data law, E[-log p(x_0)] in nats per sequence."""
        return float(-(self.p * self.p.log()).sum())

    def token_marginal(self) -> torch.Tensor:
        """Law of a single data token (over the kernel vocabulary): the x_0 law m of reference distributions."""
        m = torch.zeros(self.vocab, dtype=torch.float64)
        return m.index_add_(0, self.seqs.reshape(-1), self.p.repeat_interleave(self.L)) / self.L

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.seqs[torch.multinomial(self.p, n, replacement=True, generator=generator)]

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Row of each data sequence in ``seqs`` (x uses only data tokens)."""
        return (x * (self.V ** torch.arange(self.L - 1, -1, -1))).sum(-1)

    def posterior(self, kernel: Kernel, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Exact per-position posterior marginals q(x_0^i = v | x_t) as logits [B, L, vocab] (-inf off data)."""
        out = torch.full((*xt.shape, self.vocab), float("-inf"), dtype=torch.float64)
        for tv in torch.unique(t):
            rows_b = (t == tv).nonzero().squeeze(1)
            q = kernel.probs(torch.arange(self.V), float(tv))  # [V, vocab]: q(x_t = . | x_0 = v)
            lik = torch.ones(len(rows_b), len(self.seqs), dtype=torch.float64)
            for i in range(self.L):
                lik = lik * q[self.seqs[:, i]][:, xt[rows_b, i]].T  # [B_g, S]
            post = self.p * lik
            post = post / post.sum(1, keepdim=True)
            for i in range(self.L):
                m = torch.zeros(len(rows_b), self.V, dtype=torch.float64).index_add_(1, self.seqs[:, i], post)
                out[rows_b, i, : self.V] = m.log()
        return out

    def denoiser(self, kernel: Kernel):
        return lambda xt, t: self.posterior(kernel, xt, t)
