"""Kernel dispersion D(Q) and between-t gradient heterogeneity V(Q) (App. B.6.2, Fig. 3 of the paper).

h(t; Q) = E_{x_t ~ q_t}[ H(q(x_0 | x_t; Q_t)) ] is measured per token with the data law of a token taken as
the train unigram m (a factorised data model: the exact sequence posterior is intractable), i.e.

    q(x_0 = v | x_t = j) ∝ m(v) q_t(j | v),   q_t(j | v) = alpha_t 1[j = v] + beta_t nu(j) + c_t / k_t 1[j in N_k(v)]

(Eq. 117), with x_t drawn from the kernel applied to real validation tokens. D(Q) = Var_t h(t; Q) over a
midpoint grid of t (App. B.6.2). The column q_t(j | .) needs the *reverse* neighbour lists (which v have j
among their k nearest); they are built once per k from the [V, k] table, never as a V x V matrix.
That is the posterior of the paper's model (the denoiser sees x_t only). The latent-state model's posterior
q(x_0 | x_t, state_t) is measured with the same data law (``latent_posterior_entropy``), so that D(Q) and the
gradient variance of Fig. 3 always describe one model.
Every tensor made here lives on the device of the inputs (the kernel's, the tokens').
"""

from __future__ import annotations

import torch

from semdlm.kernels import GLOBAL, NEIGHBOUR, Kernel


def midpoint_times(n: int, eps: float = 0.0) -> torch.Tensor:
    """n midpoints of [eps, 1] (float64): E_t of a function of t ~ U(eps, 1) is the mean over this grid."""
    return eps + (1.0 - eps) * (torch.arange(n, dtype=torch.float64) + 0.5) / n


class ReverseNeighbours:
    """For a [V, k] neighbour table: the rows v whose first k neighbours contain j, as a CSR index over j."""

    def __init__(self, neighbours: torch.Tensor, k: int) -> None:
        table = neighbours[:, :k]
        V = table.shape[0]
        targets = table.reshape(-1)
        order = torch.argsort(targets, stable=True)
        self.sources = torch.arange(V, device=table.device).repeat_interleave(k)[order]
        self.counts = torch.bincount(targets, minlength=V)
        self.start = torch.cumsum(self.counts, 0) - self.counts

    def indicator(self, j: torch.Tensor, V: int) -> torch.Tensor:
        """[N, V] float64 count of j_n in N_k(v) (a 0/1 matrix unless a row lists a neighbour twice)."""
        counts = self.counts[j]
        rows = torch.repeat_interleave(torch.arange(j.numel(), device=j.device), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        slots = torch.arange(int(counts.sum()), device=j.device)
        cols = self.sources[torch.repeat_interleave(self.start[j], counts) + slots - first]
        out = torch.zeros(j.numel(), V, dtype=torch.float64, device=j.device)
        return out.index_put_((rows, cols), torch.ones(rows.numel(), dtype=torch.float64, device=j.device),
                              accumulate=True)


def posterior_entropy(kernel: Kernel, unigram: torch.Tensor, xt: torch.Tensor, t: float,
                      chunk: int = 256) -> torch.Tensor:
    """H(q(x_0 | x_t = j)) in nats for each j in ``xt`` (1-D), prior ``unigram`` over x_0 ([V] float64)."""
    a, b, c, k = (float(v) for v in kernel.coefficients(torch.tensor([t], dtype=torch.float64, device=unigram.device)))
    unigram = unigram.to(torch.float64)
    V = unigram.numel()
    reverse = ReverseNeighbours(kernel.neighbours, int(k)) if kernel.uses_neighbours and c > 0 else None
    out = []
    for j in xt.reshape(-1).split(chunk):
        lik = (b * kernel.nu[j]).unsqueeze(1).expand(-1, V).clone()  # q_t(j | v) for every v: [N, V]
        lik[torch.arange(j.numel(), device=j.device), j] += a
        if reverse is not None:
            lik += (c / k) * reverse.indicator(j, V)
        w = unigram * lik
        p = w / w.sum(1, keepdim=True)
        out.append(-torch.special.xlogy(p, p).sum(1))
    return torch.cat(out)


def latent_posterior_entropy(kernel: Kernel, unigram: torch.Tensor, xt: torch.Tensor,
                             state: torch.Tensor) -> torch.Tensor:
    """H(q(x_0 | x_t, state_t)) in nats per position (1-D), prior m = ``unigram`` over x_0: 0 where the state is
    CLEAN (x_0 = x_t), H(m) at GLOBAL (a nu draw says nothing about x_0), and at slot r the entropy of m restricted to
    the preimage {v : N(v)[r] = x_t}, log M - sum m log m / M with M its mass. The state's own law cancels: no t."""
    unigram = unigram.to(torch.float64)
    xt, state = xt.reshape(-1), state.reshape(-1)
    out = torch.zeros(len(xt), dtype=torch.float64, device=unigram.device)
    out[state == GLOBAL] = float(-torch.special.xlogy(unigram, unigram).sum())
    slot = state >= NEIGHBOUR
    if bool(slot.any()):
        i, v = kernel.preimage_entries(xt[slot], state[slot] - NEIGHBOUR)
        mass = torch.zeros(int(slot.sum()), dtype=torch.float64, device=unigram.device).index_add(0, i, unigram[v])
        plogp = torch.zeros_like(mass).index_add(0, i, torch.special.xlogy(unigram[v], unigram[v]))
        out[slot] = mass.clamp_min(1e-300).log() - plogp / mass.clamp_min(1e-300)
    return out


def mean_posterior_entropy(kernel: Kernel, unigram: torch.Tensor, xt: torch.Tensor, t: float,
                           state: torch.Tensor | None = None) -> float:
    """Monte-Carlo h(t; Q): mean of H(q(x_0 | x_t)) over the drawn tokens ``xt`` (one posterior per value), or of
    H(q(x_0 | x_t, state_t)) when the model sees the latent ``state`` (``latent_posterior_entropy``)."""
    if state is not None:
        return float(latent_posterior_entropy(kernel, unigram, xt, state).mean())
    values, counts = torch.unique(xt.reshape(-1), return_counts=True)
    return float((posterior_entropy(kernel, unigram, values, t) * counts).sum() / counts.sum())


def dispersion(h: torch.Tensor) -> float:
    """D(Q) = Var_t h(t; Q) = E_t[h^2] - (E_t h)^2 over the grid (App. B.6.2)."""
    return float((h**2).mean() - h.mean() ** 2)


def between_t_variance(ga: torch.Tensor, gb: torch.Tensor) -> tuple[float, float]:
    """Var_t of the per-t mean gradient, corrected for estimation noise (Eq. 19, second term).

    ``ga``, ``gb``: [T, P] gradients of L_t on two independent equal-size batches per t. The per-t estimate
    g_t = (ga + gb) / 2 has noise variance E||ga - gb||^2 / 4, which inflates the raw variance over t by
    (T - 1) / T of its mean; that part is subtracted. Returns (between-t variance, subtracted noise term).
    """
    g = (ga.double() + gb.double()) / 2
    T = g.shape[0]
    raw = float(((g - g.mean(0)) ** 2).sum(1).mean())
    noise = float(((ga.double() - gb.double()) ** 2).sum(1).mean() / 4) * (T - 1) / T
    return raw - noise, noise
