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
        """The exact posterior of the paper's model (x_t only) as a denoiser (x_t, t, state) -> logits."""
        return lambda xt, t, state=None: self.posterior(kernel, xt, t)


def local_likelihood(kernel: Kernel, state: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """q(state, x | x_0 = v) for every data-vocabulary v ([N, vocab]): m_t(state) times the chance it shows x."""
    from semdlm.kernels import GLOBAL, NEIGHBOUR

    m = kernel.state_probs(torch.tensor([t], dtype=torch.float64))[0][state]  # [N]
    ids = torch.arange(kernel.vocab_size)
    shows = torch.where((state == GLOBAL)[:, None], kernel.nu[x][:, None].expand(-1, kernel.vocab_size),
                        (ids[None] == x[:, None]).double())  # CLEAN
    if kernel.num_states > NEIGHBOUR:
        slot = (state - NEIGHBOUR).clamp_min(0)
        hit = (x[:, None] == kernel.neighbours[:, slot].T).double()  # N(v)[r] = x
        shows = torch.where((state >= NEIGHBOUR)[:, None], hit, shows)
    return m[:, None] * shows


def latent_posterior(toy: Toy, kernel: Kernel, xt: torch.Tensor, state: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact per-position posterior marginals q(x_0^i = v | x_t, state_t) of the latent-state model, as logits
    [B, L, vocab] (-inf off the support; the data law itself at unreachable states)."""
    B = xt.shape[0]
    out = torch.full((B, toy.L, toy.vocab), float("-inf"), dtype=torch.float64)
    for tv in torch.unique(t):
        rows = (t == tv).nonzero().squeeze(1)
        lik = local_likelihood(kernel, state[rows].reshape(-1), xt[rows].reshape(-1), float(tv))
        lik = lik.view(len(rows), toy.L, -1)  # [b, L, vocab]
        post = toy.p.expand(len(rows), -1).clone()
        for i in range(toy.L):
            post = post * lik[:, i, toy.seqs[:, i]]
        total = post.sum(1, keepdim=True)
        post = torch.where(total > 0, post / total.clamp_min(1e-300), toy.p.expand_as(post))
        for i in range(toy.L):
            m = torch.zeros(len(rows), toy.V, dtype=torch.float64).index_add_(1, toy.seqs[:, i], post)
            out[rows, i, : toy.V] = m.log()
    return out


def exact_denoiser(toy: Toy, kernel: Kernel, latent: bool):
    """The exact posterior as a denoiser (x_t, t, state) -> logits, of the latent-state or the paper's model."""
    def denoise(xt, t, state):  # computed once per distinct (t, x_t, state) row: samplers repeat them a lot
        key = torch.cat([t.double()[:, None], xt.double(), (state if latent else xt).double()], 1)
        rows, inverse = torch.unique(key, dim=0, return_inverse=True)
        L = xt.shape[1]
        ut, ux, us = rows[:, 0], rows[:, 1 : 1 + L].long(), rows[:, 1 + L :].long()
        out = latent_posterior(toy, kernel, ux, us, ut) if latent else toy.posterior(kernel, ux, ut)
        return out[inverse]

    return denoise


def known_positions(kernel: Kernel, xt: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """Where x_0 = x_t is known to the model (``Kernel.known``; no position for the paper's uniform-type model)."""
    known = kernel.known(xt, state)
    return torch.zeros_like(xt, dtype=torch.bool) if known is None else known


def wrong_where_known(toy: Toy, kernel: Kernel, latent: bool):
    """The exact posterior, except confidently wrong wherever x_0 is known (where a denoiser is never trained)."""
    exact = exact_denoiser(toy, kernel, latent)

    def denoise(xt, t, state):
        logits = exact(xt, t, state)
        wrong = torch.full_like(logits, -30.0).scatter_(-1, ((xt + 1) % toy.V)[..., None], 0.0)
        return torch.where(known_positions(kernel, xt, state if latent else None)[..., None], wrong, logits)

    return denoise


def imperfect_denoiser(toy: Toy, kernel: Kernel, latent: bool, seed: int = 5):
    """A fixed imperfect denoiser: the exact posterior blended with a fixed random law per (position, token), and
    confidently wrong wherever x_0 is known (clean / unmasked positions), where a denoiser is never trained."""
    exact = exact_denoiser(toy, kernel, latent)
    g = torch.Generator().manual_seed(seed)
    noise = torch.softmax(3 * torch.randn(toy.L, toy.vocab, toy.vocab, generator=g, dtype=torch.float64), -1)

    def denoise(xt, t, state):
        p = torch.softmax(exact(xt, t, state).double(), -1)
        logits = (0.6 * p + 0.4 * noise[torch.arange(toy.L)[None], xt]).log()  # depends on the token it sees
        wrong = torch.full_like(logits, -30.0).scatter_(-1, ((xt + 1) % toy.V)[..., None], 0.0)
        return torch.where(known_positions(kernel, xt, state if latent else None)[..., None], wrong, logits)

    return denoise
