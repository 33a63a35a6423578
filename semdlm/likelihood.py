"""Likelihood bounds (validation NELBO, the "test PPL" of Table 2) for every kernel. Derivations:
docs/likelihood.md.

- ``ctmc_nelbo``: the exact continuous-time NELBO of kernels q_t = alpha_t delta_{x_0} + (1 - alpha_t) nu
  (mask, uniform), which are Markov with rates lambda_t nu(y), lambda_t = -alpha'_t / alpha_t. For the
  absorbing kernel it is MDLM's E_t[-alpha'_t / (1 - alpha_t) sum_{masked} -log p_theta(x_0 | x_t)].
- ``coupling_bound``: a discrete-time ELBO on a T-step grid for any kernel of Eq. 117, through the reverse
  coupling of ``semdlm.coupling`` with the latent clean/corrupted flag z. The kNN and SemDLM+ kernels are not
  Markov processes in general, so they have no continuous-time NELBO; this bound is valid for the generative
  model that the coupling defines (the one ``samplers.ancestral`` draws from).
"""

from __future__ import annotations

import torch

from semdlm.coupling import Coef, coef, select
from semdlm.ctmc import is_markov, model_ratio, rate
from semdlm.kernels import CLEAN, Kernel
from semdlm.loss import stratified_times
from semdlm.samplers import Denoise

MAX_CHUNK_ELEMS = 2**23  # positions x V x k_max per chunk in the coupling bound (~64 MB of float64)


def bound_name(kernel: Kernel) -> str:
    if is_markov(kernel):
        return "continuous-time NELBO (exact)"
    return "coupling ELBO (discrete time, valid upper bound)"


def ctmc_nelbo_terms(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, kernel: Kernel,
                     t: torch.Tensor) -> torch.Tensor:
    """Integrand of the continuous-time NELBO at times t ([B]) per position ([B, L], nats).

    lambda_t nu(x) sum_{y != x} [s(y) - r(y) + r(y) log(r(y) / s(y))] with x = x_t,
    r(y) = q_t(y | x_0) / q_t(x | x_0) (true reverse-rate ratio) and s(y) = E_{p_theta(x_0' | x_t)} of the same.
    """
    a = kernel.schedule.alpha(t)[:, None, None]
    c = 1.0 - a
    lam = rate(kernel, t)[:, None, None]
    p = torch.softmax(logits.double(), dim=-1)  # [B, L, V]
    nu = kernel.nu
    nu_x = nu[xt][..., None]  # [B, L, 1]
    s = model_ratio(p, xt, kernel, a)
    # r(y) = (a delta_{y, x0} + c nu(y)) / (a delta_{x, x0} + c nu(x))
    onehot_x0 = torch.zeros_like(p).scatter_(-1, x0[..., None], 1.0)
    r = (a * onehot_x0 + c * nu) / (a * (xt == x0)[..., None] + c * nu_x)
    not_x = torch.ones_like(p).scatter_(-1, xt[..., None], 0.0)
    rlog = torch.where(r > 0, r * (r.clamp_min(1e-300).log() - s.clamp_min(1e-300).log()), torch.zeros_like(r))
    terms = ((s - r + rlog) * not_x).sum(-1, keepdim=True)
    return (lam * nu_x * terms).squeeze(-1).where(nu_x.squeeze(-1) > 0, torch.zeros_like(nu_x.squeeze(-1)))


def ctmc_nelbo(denoise: Denoise, kernel: Kernel, x0: torch.Tensor, t: torch.Tensor,
               generator: torch.Generator | None) -> torch.Tensor:
    """One-sample estimate per sequence (nats/token) of int_0^1 E_{x_t}[integrand] dt, at times t ([B])."""
    t = t.clamp(1e-6, 1 - 1e-6)
    xt = kernel.sample_xt(x0, t, generator)
    logits = denoise(xt, t.float())
    return ctmc_nelbo_terms(logits, x0, xt, kernel, t).sum(1) / x0.shape[1]


def _r_rows(kernel: Kernel, x0: torch.Tensor, alpha: float, t: float) -> torch.Tensor:
    """Dense corruption rows r_t(. | x_0) = (q_t(. | x_0) - alpha_t delta_{x_0}) / (1 - alpha_t) ([n, V])."""
    rows = kernel.probs(x0, t)
    rows[torch.arange(len(x0)), x0] -= alpha
    return (rows / (1.0 - alpha)).clamp_min(0.0)


def prior_kl(kernel: Kernel, m: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Per clean token x_0 ([V]): KL(q(z_1, x_1 | x_0) || p(z_1, x_1)) with p(x_1 | z_1=1) = m,
    p(x_1 | z_1=0) = sum_x0' m(x_0') r_1(. | x_0'): alpha_1 (-log m(x_0)) + (1 - alpha_1) KL(r_1 || mixture)."""
    a1 = float(kernel.schedule.alpha(torch.ones((), dtype=torch.float64)))
    V = kernel.vocab_size
    out = a1 * -m.clamp_min(1e-300).log()
    if a1 >= 1.0:
        return out
    mix = torch.zeros(V, dtype=torch.float64)
    for start in range(0, V, chunk):
        ids = torch.arange(start, min(start + chunk, V))
        mix += (m[ids, None] * _r_rows(kernel, ids, a1, 1.0)).sum(0)
    for start in range(0, V, chunk):
        ids = torch.arange(start, min(start + chunk, V))
        r = _r_rows(kernel, ids, a1, 1.0)
        kl = torch.where(r > 0, r * (r.clamp_min(1e-300).log() - mix.clamp_min(1e-300).log()), torch.zeros_like(r))
        out[ids] += (1 - a1) * kl.sum(1)
    return out


def _coupling_kl(kernel: Kernel, xt: torch.Tensor, x0: torch.Tensor, p: torch.Tensor, ct: Coef,
                 cs: Coef) -> torch.Tensor:
    """KL(M(. | x_t; x_0) || sum_x0' p(x_0') M(. | x_t; x_0')) for n positions (brute force over x_0')."""
    n, V = p.shape
    nu = kernel.nu
    db = (cs.b - ct.b)[:, None]  # [n, 1]
    db_pos = db.clamp_min(0.0)
    if kernel.uses_neighbours:
        nbr = kernel.neighbours[:, : kernel.schedule.k_max]  # [V, K]
        K = nbr.shape[1]
        ranks = torch.arange(K)
        in_t = ranks < ct.k[:, None, None]  # [n, 1, K]
        in_s = ranks < cs.k[:, None, None]
        member = nbr[None] == xt[:, None, None]  # [n, V, K]
        mem_t, mem_s = (member & in_t).any(-1), (member & in_s).any(-1)  # [n, V]
        slot = (db[..., None] * nu[nbr][None] + cs.h[:, None, None] * in_s - ct.h[:, None, None] * in_t)
        slot = torch.where(in_t, slot.clamp_min(0.0), torch.zeros_like(slot))  # [n, V, K]
        nu_in_t = (nu[nbr][None] * in_t).sum(-1)  # [n, V]
    else:
        mem_t = mem_s = torch.zeros(n, V, dtype=torch.bool)
        slot, nu_in_t = None, torch.zeros(n, V, dtype=torch.float64)
    nu_x = nu[xt][:, None]
    rt = ct.b[:, None] * nu_x + ct.h[:, None] * mem_t
    rs = cs.b[:, None] * nu_x + cs.h[:, None] * mem_s
    c_all = torch.where(rt > 0, (rs / rt.clamp_min(1e-300)).clamp_max(1.0), torch.ones_like(rt))  # [n, V]
    tv = db_pos * (1.0 - nu_in_t) + (slot.sum(-1) if slot is not None else 0.0)
    w = torch.where(tv > 0, p * (1.0 - c_all) / tv.clamp_min(1e-300), torch.zeros_like(p))  # [n, V]
    rows = torch.arange(n)
    P = db_pos * nu * w.sum(1, keepdim=True)
    P[rows, xt] += (p * c_all).sum(1)
    Mq = db_pos * nu.expand(n, -1).clone()
    if slot is not None:
        extra = (slot - db_pos[..., None] * nu[nbr][None] * in_t) * w[..., None]  # [n, V, K]
        P.scatter_add_(1, nbr.reshape(1, -1).expand(n, -1), extra.reshape(n, -1))
        own = slot[rows, x0]  # [n, K]: the true x_0's slots
        own_nb = nbr[x0]
        Mq.scatter_(1, own_nb, torch.where(in_t.squeeze(1), own, db_pos * nu[own_nb]))
    c0 = c_all[rows, x0]
    tv0 = tv[rows, x0]
    Mq = torch.where(tv0[:, None] > 0, (1 - c0)[:, None] * Mq / tv0.clamp_min(1e-300)[:, None], torch.zeros_like(Mq))
    Mq[rows, xt] += c0
    kl = torch.where(Mq > 0, Mq * (Mq.clamp_min(1e-300).log() - P.clamp_min(1e-300).log()), torch.zeros_like(Mq))
    return kl.sum(1)


def coupling_bound(denoise: Denoise, kernel: Kernel, x0: torch.Tensor, grid_steps: int, prior: torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
    """One-sample estimate per sequence (nats/token) of the T-step coupling ELBO (docs/likelihood.md):

    sum_i [ prior_kl(x_0^i) + T E_{k ~ U{1..T}} 1[z^i_{t_k}] ( pi_k (-log p_theta(x_0^i | x_{t_k}))
                                                            + (1 - pi_k) KL_M(x_{t_k}^i) ) ] / L
    with ``prior`` = prior_kl per token id ([V]).
    """
    B, L = x0.shape
    T = grid_steps
    u = stratified_times(B, 0.0, generator)
    k = (u * T).long().clamp(0, T - 1) + 1  # grid index in 1..T, stratified over the batch
    t = k.double() / T
    s = (k - 1).double() / T
    xt, state = kernel.corrupt(x0, t, generator)
    z = state != CLEAN
    logp = torch.log_softmax(denoise(xt, t.float()).double(), dim=-1)  # [B, L, V]
    ct, cs = coef(kernel, t), coef(kernel, s)
    pi = (cs.alpha - ct.alpha) / (1 - ct.alpha).clamp_min(1e-300)  # [B]
    ce = -logp.gather(-1, x0[..., None]).squeeze(-1)  # [B, L]
    step = pi[:, None] * ce
    pos = z.nonzero()  # corrupted positions (b, i)
    kl = torch.zeros(B, L, dtype=torch.float64)
    V = logp.shape[-1]
    chunk = max(1, MAX_CHUNK_ELEMS // (V * max(1, kernel.schedule.k_max if kernel.uses_neighbours else 1)))
    for start in range(0, len(pos), chunk):
        b, i = pos[start : start + chunk].T
        kl[b, i] = _coupling_kl(kernel, xt[b, i], x0[b, i], logp[b, i].exp(), select(ct, b), select(cs, b))
    step = step + (1 - pi)[:, None] * kl
    per_seq = prior[x0].sum(1) + T * (step * z).sum(1)
    return per_seq / L


def sequence_nelbo(denoise: Denoise, kernel: Kernel, x0: torch.Tensor, t: torch.Tensor,
                   generator: torch.Generator, grid_steps: int = 64, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence bound (nats/token) with the kernel's own bound; ``t`` ([B]) is used by the CTMC NELBO."""
    if is_markov(kernel):
        return ctmc_nelbo(denoise, kernel, x0, t, generator)
    if prior is None:
        raise ValueError(f"the coupling bound of kernel {kernel.name!r} needs prior_kl per token")
    return coupling_bound(denoise, kernel, x0, grid_steps, prior, generator)


def token_prior_kl(kernel: Kernel, x0_prior: torch.Tensor) -> torch.Tensor | None:
    """What ``validation_nelbo`` needs besides the data: ``prior_kl`` per token for the coupling bound (a chunked
    O(V^2)-time pass; compute it once per run), None for the Markov kernels."""
    return None if is_markov(kernel) else prior_kl(kernel, x0_prior)


def validation_nelbo(denoise: Denoise, kernel: Kernel, data: torch.Tensor, batch_size: int, batches: int,
                     seed: int, grid_steps: int = 64, prior: torch.Tensor | None = None, repeats: int = 1) -> float:
    """Mean bound (nats/token) over the first ``batches * batch_size`` sequences, each scored ``repeats`` times
    at independent stratified t, with a fixed seed; ``prior`` from ``token_prior_kl``."""
    gen = torch.Generator().manual_seed(seed + 1)
    total, n = 0.0, 0
    for _ in range(repeats):
        for start in range(0, min(len(data), batches * batch_size), batch_size):
            x0 = data[start : start + batch_size]
            t = stratified_times(len(x0), 0.0, gen)
            total += float(sequence_nelbo(denoise, kernel, x0, t, gen, grid_steps, prior).sum())
            n += len(x0)
    return total / n
