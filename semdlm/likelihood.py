"""Likelihood bounds of held-out text under the model the samplers draw from, and the paper's Table 2 metric beside
them. Derivations and the toy numbers: docs/likelihood.md. Each estimator is one sample per sequence (nats/token) on
the T-step grid t_k = k / T (one stratified grid step per sequence, times T).

The paper's model (the denoiser sees x_t only; every default kernel entry):
- ``markov_bound``: the D3PM ELBO of a Markov kernel (mask, uniform) as the Markov chain in x_t (``semdlm.ctmc``),
  O(V) per position; for mask it is MDLM's discrete-time bound. It tightens to the NLL as T grows.
- ``ctmc_nelbo``: the continuous-time NELBO of the same chain (UDLM / Duo; MDLM's for mask): its T -> oo limit and
  the model that ``samplers.tau_leaping`` discretises for uniform.
- ``marginal_bound``: knn and SemDLM+, whose samplers marginalise the latent state at every step; valid, O(k_max^2)
  per position, but not tight: no Markov chain in x_t has Eq. 117's marginals, so the bound keeps a gap.
The latent-state model (ours, ``kernels.<name>.latent_state``):
- ``latent_bound``: its ELBO for every kernel, O(V) per position and entered state; tight.
Beside every bound:
- ``denoising_ce``: E_t mean_i -log p_theta(x_0^i | x_t), t ~ U(0, 1): Eq. 3 with no time weight, whose exp is the
  "denoising PPL", the paper's Table 2 metric as we read it; not a likelihood bound.
``estimates`` names those that apply to a kernel and model, ``validation_estimates`` averages them over data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from semdlm import ctmc
from semdlm.ctmc import model_ratio, rate
from semdlm.kernels import CLEAN, GLOBAL, NEIGHBOUR, Kernel
from semdlm.latent import reverse_probs, state_posterior
from semdlm.loss import stratified_times, token_ce
from semdlm.samplers import Denoise

MAX_CHUNK_ELEMS = 2**24  # elements of a [positions, V(, k)] float64 work tensor in the bounds (128 MB)
TINY = 1e-300


def _xlogy_ratio(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """q log(q / p) with 0 where q = 0."""
    return torch.where(q > 0, q * (q.clamp_min(TINY).log() - p.clamp_min(TINY).log()), torch.zeros_like(q))


def _chunks(n: int, width: int):
    step = max(1, MAX_CHUNK_ELEMS // max(1, width))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _grid(B: int, T: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified grid steps t_k -> t_{k-1}, one per sequence: (t, s) ([B] each)."""
    u = stratified_times(B, 0.0, generator)
    k = (u * T).long().clamp(0, T - 1) + 1
    return k.double() / T, (k - 1).double() / T


def slot_cost(kernel: Kernel, p: torch.Tensor, x0: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """-log sum_{x_0'} p(x_0') 1[N(x_0')[r] = N(x_0)[r]] for n (row of p, x_0, slot r) triples ([n]): the cost of
    entering neighbour slot r in the reverse process when the model knows x_0 only through p ([n, V])."""
    out = torch.empty(len(x0), dtype=torch.float64, device=p.device)
    columns = kernel.neighbours.T  # [k_max, V]: column r holds N(y)[r] for every y
    for c in _chunks(len(x0), p.shape[1]):
        hit = columns[slot[c]] == kernel.neighbours[x0[c], slot[c]][:, None]
        out[c] = -(p[c] * hit).sum(1).clamp_min(TINY).log()
    return out


def latent_prior_kl(kernel: Kernel, unigram: torch.Tensor) -> torch.Tensor:
    """Per token id x_0 ([V]): KL(q(state_1, x_1 | x_0) || p(state_1, x_1)), p the t=1 law of the state with
    x_0 ~ m = ``unigram``: alpha_1 (-log m(x_0)) + sum_r m_1(r) (-log M_r(N(x_0)[r])), M_r the law of N(y)[r] under
    y ~ m (a GLOBAL token is a nu draw under both)."""
    unigram = unigram.to(kernel.nu.device, torch.float64)
    m1 = kernel.state_probs(torch.ones(1, dtype=torch.float64, device=unigram.device))[0]
    out = m1[CLEAN] * -unigram.clamp_min(TINY).log() if m1[CLEAN] > 0 else torch.zeros_like(unigram)
    for r in range(kernel.num_states - NEIGHBOUR):
        if m1[NEIGHBOUR + r] > 0:
            column = kernel.neighbours[:, r]
            law = torch.zeros_like(unigram).index_add_(0, column, unigram)
            out = out + m1[NEIGHBOUR + r] * -law[column].clamp_min(TINY).log()
    return out


def latent_bound(denoise: Denoise, kernel: Kernel, x0: torch.Tensor, grid_steps: int, prior: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    """One-sample estimate per sequence (nats/token) of the latent-state ELBO on the grid t_k = k / T:

        sum_i [ prior(x_0^i) + T E_{k ~ U{1..T}} sum_{j != state_t^i} R_{t_k -> t_{k-1}}(j | state_t^i) cost_j ]

    with cost_CLEAN = -log p_theta(x_0^i | x_t, state_t) and cost_{slot r} = ``slot_cost`` (a GLOBAL token is never
    entered from another state in reverse, and a state that stays costs nothing); ``prior`` from
    ``latent_prior_kl``."""
    B, L = x0.shape
    t, s = _grid(B, grid_steps, generator)
    xt, state = kernel.corrupt(x0, t, generator)
    logp = torch.log_softmax(kernel.constrain(denoise(xt, t.float(), state), xt, state).double(), dim=-1)
    rows = reverse_probs(kernel, t, s)[torch.arange(B, device=x0.device)[:, None], state]  # [B, L, n]
    return (prior[x0].sum(1) + grid_steps * latent_step_kl(kernel, logp, x0, state, rows).sum(1)) / L


def latent_step_kl(kernel: Kernel, logp: torch.Tensor, x0: torch.Tensor, state: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
    """KL(q(state_s, x_s | state_t, x_t, x_0) || p_theta(state_s, x_s | state_t, x_t)) per position ([B, L]) from
    the model's log p_theta(x_0 | .) ([B, L, V]) and the reverse state law out of each position's state ([B, L, n]):
    sum over entered states j != state_t of R(j) cost_j (the state law itself is the same on both sides)."""
    enter = rows.scatter(-1, state[..., None], 0.0)  # staying costs nothing
    ce = -logp.gather(-1, x0[..., None]).squeeze(-1)
    kl = torch.where(enter[..., CLEAN] > 0, enter[..., CLEAN] * ce, torch.zeros_like(ce))
    if kernel.num_states > NEIGHBOUR:
        b, i, r = (enter[..., NEIGHBOUR:] > 0).nonzero(as_tuple=True)
        if len(b):
            cost = slot_cost(kernel, logp[b, i].exp(), x0[b, i], r)
            kl = kl.index_put((b, i), enter[b, i, NEIGHBOUR + r] * cost, accumulate=True)
    return kl


def marginal_prior_kl(kernel: Kernel, unigram: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Per token id x_0 ([V]): KL(q_1(x_1 | x_0) || sum_y m(y) q_1(x_1 | y)), m = ``unigram``, the tokens only
    (chunked O(V^2) time, O(chunk V) memory); 0 without work when q_1 does not depend on x_0 (alpha_1 = 0 and no
    neighbour mass at t = 1: mask, uniform, SemDLM+ with beta_1 = 1)."""
    unigram = unigram.to(kernel.nu.device, torch.float64)
    V = kernel.vocab_size
    a, _, c, _ = kernel.coefficients(torch.ones(1, dtype=torch.float64, device=unigram.device))
    if float(a) == 0.0 and float(c) == 0.0:
        return torch.zeros(V, dtype=torch.float64, device=unigram.device)
    mix = torch.zeros(V, dtype=torch.float64, device=unigram.device)
    for start in range(0, V, chunk):
        ids = torch.arange(start, min(start + chunk, V), device=unigram.device)
        mix += (unigram[ids, None] * kernel.probs(ids, 1.0)).sum(0)
    out = torch.zeros(V, dtype=torch.float64, device=unigram.device)
    for start in range(0, V, chunk):
        ids = torch.arange(start, min(start + chunk, V), device=unigram.device)
        out[ids] = _xlogy_ratio(kernel.probs(ids, 1.0), mix[None]).sum(1)
    return out


StepKL = Callable[[Kernel, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _grid_bound(denoise: Denoise, kernel: Kernel, x0: torch.Tensor, grid_steps: int, prior: torch.Tensor,
                generator: torch.Generator | None, step_kl: StepKL) -> torch.Tensor:
    """One-sample estimate per sequence (nats/token) of the x_t-only model's ELBO on the grid t_k = k / T:
    sum_i [ prior(x_0^i) + T E_k KL(q(x_s | x_t, x_0) || sum_{x_0'} p_theta(x_0' | x_t) q(x_s | x_t, x_0')) ]
    with the step KL of the chain (``step_kl(kernel, p, x_0, x_t, t, s)`` per position); the last step (s = 0)
    is the reconstruction term -log p_theta(x_0 | x_t)."""
    B, L = x0.shape
    t, s = _grid(B, grid_steps, generator)
    xt = kernel.sample_xt(x0, t, generator)
    p = torch.softmax(kernel.constrain(denoise(xt, t.float(), None), xt, None).double(), dim=-1)
    b = torch.arange(B, device=x0.device)[:, None].expand(B, L).reshape(-1)
    kl = step_kl(kernel, p.reshape(B * L, -1), x0.reshape(-1), xt.reshape(-1), t[b], s[b])
    return (prior[x0].sum(1) + grid_steps * kl.view(B, L).sum(1)) / L


def markov_step_kl(kernel: Kernel, p: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                   s: torch.Tensor) -> torch.Tensor:
    """KL(q(x_s | x_t, x_0) || sum_{x_0'} p(x_0') q(x_s | x_t, x_0')) of the Markov chain per position ([n]; p [n, V],
    times [n]): ``ctmc.step_kl``, O(V) per position, chunked."""
    out = torch.empty(len(x0), dtype=torch.float64, device=p.device)
    for c in _chunks(len(x0), p.shape[1]):
        out[c] = ctmc.step_kl(kernel, p[c], x0[c], xt[c], t[c], s[c])
    return out


def markov_bound(denoise: Denoise, kernel: Kernel, x0: torch.Tensor, grid_steps: int, prior: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    """The D3PM ELBO of a Markov kernel (mask, uniform) as the Markov chain in x_t, per sequence (nats/token), on
    the grid t_k = k / T; ``prior`` from ``marginal_prior_kl``. For mask it is MDLM's discrete-time bound."""
    if not kernel.is_markov:
        raise ValueError(f"kernel {kernel.name!r} has a neighbour branch: no Markov chain in x_t has its marginals")
    return _grid_bound(denoise, kernel, x0, grid_steps, prior, generator, markov_step_kl)


def marginal_step_kl(kernel: Kernel, p: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                     s: torch.Tensor) -> torch.Tensor:
    """KL(q(x_s | x_t, x_0) || sum_v p(v) q(x_s | x_t, v)) per position ([n]; p [n, V], times [n]), the latent
    state marginalised on both sides: q(. | x_t, v) draws the state from q(state_t | x_t, v)
    (``latent.state_posterior``), moves it by R_{t->s}, and stays at x_t, enters CLEAN (token v) or slot r (token
    N(v)[r]).

    Both laws are read on the truth's support Y = {x_t, x_0, N(x_0)[r]} only. The model's mass at y in Y comes
    from v = y (CLEAN), the preimages {v : N(v)[r] = y} (slot r), and, when y = x_t, from every v that stays: a v
    that is neither x_t nor in a preimage of x_t can only be in GLOBAL, so it stays with R(GLOBAL | GLOBAL) (for
    sure where x_t is impossible given v). So the cost is O(k_max^2 + in-degrees) per position, never O(V k_max)."""
    n, V = p.shape
    K = kernel.num_states - NEIGHBOUR
    out = torch.empty(n, dtype=torch.float64, device=p.device)
    for c in _chunks(n, (2 + K) * max(K, 1) * kernel.num_states):
        out[c] = _marginal_step_kl(kernel, p[c], x0[c], xt[c], t[c], s[c])
    return out


def _marginal_step_kl(kernel: Kernel, p: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                      s: torch.Tensor) -> torch.Tensor:
    n, V = p.shape
    K = kernel.num_states - NEIGHBOUR
    pos = torch.arange(n, device=p.device)
    R = reverse_probs(kernel, t, s)  # [n, S, S]
    diag = R.diagonal(dim1=1, dim2=2)
    leave = R - torch.diag_embed(diag)

    def post(rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # q(state_t | x_t, x_0 = v) ([m, S])
        return state_posterior(kernel, xt[rows], v, t[rows])

    def stays(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # the token stays (for sure where impossible)
        return torch.where(w.sum(1) > 0, (w * diag[rows]).sum(1), torch.ones_like(w[:, 0]))

    def enters(w: torch.Tensor, rows: torch.Tensor, j: torch.Tensor) -> torch.Tensor:  # the state enters j at s
        return (w * leave[rows, :, j]).sum(1)

    Y = torch.cat([xt[:, None], x0[:, None], kernel.neighbours[x0, :K] if K else xt.new_empty(n, 0)], 1)  # [n, J]
    J = Y.shape[1]
    w0 = post(pos, x0)
    states = torch.arange(NEIGHBOUR, NEIGHBOUR + K, device=p.device)
    truth = torch.cat([stays(w0, pos)[:, None], enters(w0, pos, torch.full_like(pos, CLEAN))[:, None],
                       (w0[:, :, None] * leave[pos[:, None], :, states].transpose(1, 2)).sum(1)], 1)
    # the model: staying at x_t (every v; the generic one through GLOBAL), CLEAN at y (v = y), slot r at y
    generic = torch.where(kernel.state_probs(t)[:, GLOBAL] * kernel.nu[xt] > 0, diag[:, GLOBAL], torch.ones_like(t))
    rows, v = pos, xt
    if K:
        q_rows, q_slot = pos.repeat_interleave(K), torch.arange(K, device=p.device).repeat(n)
        i, pre = kernel.preimage_entries(xt[q_rows], q_slot)
        rows, v = torch.cat([pos, q_rows[i]]), torch.cat([xt, pre])
    key = torch.unique(rows * V + v)  # each candidate v of a position once
    rows, v = key // V, key % V
    stay = generic.index_add(0, rows, p[rows, v] * (stays(post(rows, v), rows) - generic[rows]))
    model = (xt[:, None] == Y) * stay[:, None]
    rows, y = pos.repeat_interleave(J), Y.reshape(-1)
    model = model + (p[rows, y] * enters(post(rows, y), rows, torch.full_like(y, CLEAN))).view(n, J)
    if K:
        q_rows, q_y, q_slot = rows.repeat_interleave(K), y.repeat_interleave(K), torch.arange(K, device=p.device)
        q_slot = q_slot.repeat(n * J)
        i, pre = kernel.preimage_entries(q_y, q_slot)
        r = q_rows[i]
        into = p[r, pre] * enters(post(r, pre), r, NEIGHBOUR + q_slot[i])
        model = model + torch.zeros(n * J, dtype=p.dtype, device=p.device).index_add(0, i // K, into).view(n, J)
    same = Y[:, :, None] == Y[:, None, :]  # a token listed twice in Y: its truth summed, counted once
    earlier = torch.ones(J, J, dtype=torch.bool, device=p.device).tril(-1)
    first = ~(same & earlier).any(2)
    mass = (same * truth[:, None, :]).sum(2)
    return torch.where(first, _xlogy_ratio(mass, model), torch.zeros_like(mass)).sum(1)


def marginal_bound(denoise: Denoise, kernel: Kernel, x0: torch.Tensor, grid_steps: int, prior: torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
    """One-sample estimate per sequence (nats/token) of the state-marginalised ELBO on the grid t_k = k / T, the
    paper's model of knn and SemDLM+ (``marginal_step_kl``); ``prior`` from ``marginal_prior_kl``."""
    return _grid_bound(denoise, kernel, x0, grid_steps, prior, generator, marginal_step_kl)


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
    onehot_x0 = torch.zeros_like(p).scatter_(-1, x0[..., None], 1.0)
    r = (a * onehot_x0 + c * nu) / (a * (xt == x0)[..., None] + c * nu_x)
    not_x = torch.ones_like(p).scatter_(-1, xt[..., None], 0.0)
    terms = ((s - r + _xlogy_ratio(r, s)) * not_x).sum(-1, keepdim=True)
    return (lam * nu_x * terms).squeeze(-1).where(nu_x.squeeze(-1) > 0, torch.zeros_like(nu_x.squeeze(-1)))


def ctmc_nelbo(denoise: Denoise, kernel: Kernel, x0: torch.Tensor, t: torch.Tensor,
               generator: torch.Generator | None) -> torch.Tensor:
    """One-sample estimate per sequence (nats/token) of int_0^1 E_{x_t}[integrand] dt, at times t ([B])."""
    t = t.clamp(1e-6, 1 - 1e-6)
    xt = kernel.sample_xt(x0, t, generator)
    logits = kernel.constrain(denoise(xt, t.float(), None), xt, None)
    return ctmc_nelbo_terms(logits, x0, xt, kernel, t).sum(1) / x0.shape[1]


def denoising_ce(denoise: Denoise, kernel: Kernel, x0: torch.Tensor, generator: torch.Generator | None,
                 latent: bool = False) -> torch.Tensor:
    """One-sample estimate per sequence of mean_i -log p_theta(x_0^i | x_t) at t ~ U(0, 1) (stratified), under
    ``Kernel.constrain`` (0 at carried-over positions): Eq. 3 with no time weight. exp of its mean over data is the
    "denoising PPL", the paper's Table 2 metric as we read it; not a likelihood bound. ``latent``: the model sees
    the latent state."""
    t = stratified_times(len(x0), 0.0, generator)
    xt, state = kernel.corrupt(x0, t, generator)
    seen = state if latent else None
    logits = kernel.constrain(denoise(xt, t.float(), seen), xt, seen)
    return token_ce(logits, x0, kernel, xt, seen).double().mean(1)


Estimator = Callable[[Denoise, Kernel, torch.Tensor, torch.Generator | None], torch.Tensor]  # x_0 [B, L] -> [B]
DENOISING = "the paper's Table 2 metric as we read it; not a likelihood bound"


@dataclass(frozen=True)
class Estimate:
    """One number of train.json (nats/token, mean over validation sequences): its key, what it is, how to read it."""

    key: str
    name: str
    label: str
    fn: Estimator


def estimates(kernel: Kernel, latent: bool, grid_steps: int, unigram: torch.Tensor) -> list[Estimate]:
    """What is reported for ``kernel`` in its model (``latent``: the kernel entry's ``latent_state``): the primary
    bound first (``val_nelbo``), the continuous-time NELBO of a Markov kernel, then the denoising CE. ``unigram``:
    the x_0 law of the model at t = 1 (the train unigram); the prior terms are computed here, once."""
    T = grid_steps
    ce = Estimate("val_denoising_ce", "denoising CE: E_t mean_i -log p_theta(x_0^i | x_t), t ~ U(0, 1) (Eq. 3)",
                  DENOISING, lambda d, k, x0, g: denoising_ce(d, k, x0, g, latent))
    if latent:
        prior = latent_prior_kl(kernel, unigram)
        return [Estimate("val_nelbo", f"latent-state ELBO (discrete time, T = {T})",
                         "bound on the NLL of the sampled latent-state model (ours), tight",
                         lambda d, k, x0, g: latent_bound(d, k, x0, T, prior, g)), ce]
    prior = marginal_prior_kl(kernel, unigram)
    if kernel.is_markov:
        mdlm = " = MDLM's" if kernel.is_absorbing else ""
        return [Estimate("val_nelbo", f"D3PM ELBO of the Markov chain{mdlm} (discrete time, T = {T})",
                         "bound on the NLL of the sampled chain; tightens as T grows",
                         lambda d, k, x0, g: markov_bound(d, k, x0, T, prior, g)),
                Estimate("val_nelbo_ctmc", "continuous-time NELBO (" + ("MDLM" if kernel.is_absorbing else "UDLM / Duo")
                         + ")", "bound on the NLL of the chain as T -> infinity",
                         lambda d, k, x0, g: ctmc_nelbo(d, k, x0, stratified_times(len(x0), 0.0, g), g)), ce]
    return [Estimate("val_nelbo", f"state-marginalised ELBO (discrete time, T = {T})",
                     "valid, not tight for this kernel: no Markov x_t chain has Eq. 117's marginals",
                     lambda d, k, x0, g: marginal_bound(d, k, x0, T, prior, g)), ce]


def validation_estimates(denoise: Denoise, kernel: Kernel, data: torch.Tensor, batch_size: int, batches: int,
                         seed: int, chosen: Sequence[Estimate], repeats: int = 1) -> dict[str, float]:
    """Each of ``chosen`` (from ``estimates``) averaged over the first ``batches * batch_size`` sequences, each
    scored ``repeats`` times at independent draws, with a fixed seed (the same draws for every estimate). Runs on
    the device of ``data`` and ``kernel``."""
    device = data.device
    out = {}
    for e in chosen:
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        total, n = torch.zeros((), dtype=torch.float64, device=device), 0
        for _ in range(repeats):
            for start in range(0, min(len(data), batches * batch_size), batch_size):
                x0 = data[start : start + batch_size]
                total += e.fn(denoise, kernel, x0, gen).sum()
                n += len(x0)
        out[e.key] = float(total) / n
    return out
