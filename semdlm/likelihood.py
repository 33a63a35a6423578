"""Likelihood bounds (validation NELBO, the "test PPL" of Table 2). Derivations: docs/likelihood.md.

- ``latent_bound``: the ELBO of the latent-state model (the default, ``model.latent_state: true``) on a T-step
  grid, for every kernel. It describes exactly the chain that the samplers draw from with T steps; for the
  absorbing kernel it is MDLM's discrete-time bound. Per position and step it costs O(V) per state the token
  can enter, because the reverse law of the state does not depend on x_0 (``semdlm.latent``).
- ``marginal_bound``: the D3PM-style ELBO of the paper's model (the denoiser sees x_t only; the samplers
  marginalise the state at every step), on the same grid. Valid, O(V k_max) per position, looser.
- ``ctmc_nelbo``: the exact continuous-time NELBO of the Markov kernels (mask, uniform) as CTMCs: the model
  that ``samplers.tau_leaping`` discretises in the paper's model of uniform.
"""

from __future__ import annotations

import torch

from semdlm.ctmc import model_ratio, rate
from semdlm.kernels import CLEAN, GLOBAL, NEIGHBOUR, Kernel
from semdlm.latent import reverse_probs
from semdlm.loss import stratified_times
from semdlm.samplers import Denoise

MAX_CHUNK_ELEMS = 2**24  # elements of a [positions, V(, k)] float64 work tensor in the bounds (128 MB)
TINY = 1e-300


def bound_name(latent: bool) -> str:
    if latent:
        return "latent-state ELBO (discrete time, the sampled model)"
    return "state-marginalised ELBO (discrete time, the paper's model)"


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


def latent_prior_kl(kernel: Kernel, m: torch.Tensor) -> torch.Tensor:
    """Per token id x_0 ([V]): KL(q(state_1, x_1 | x_0) || p(state_1, x_1)), p the t=1 law of the state with
    x_0 ~ m: alpha_1 (-log m(x_0)) + sum_r m_1(r) (-log M_r(N(x_0)[r])), M_r the law of N(y)[r] under y ~ m
    (a GLOBAL token is a nu draw under both)."""
    m = m.to(kernel.nu.device, torch.float64)
    m1 = kernel.state_probs(torch.ones(1, dtype=torch.float64, device=m.device))[0]
    out = m1[CLEAN] * -m.clamp_min(TINY).log() if m1[CLEAN] > 0 else torch.zeros_like(m)
    for r in range(kernel.num_states - NEIGHBOUR):
        if m1[NEIGHBOUR + r] > 0:
            column = kernel.neighbours[:, r]
            law = torch.zeros_like(m).index_add_(0, column, m)
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


def step_law(kernel: Kernel, p: torch.Tensor, xt: torch.Tensor, R: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    """sum_{x_0'} p(x_0') q(x_s = . | x_t, x_0') with the state marginalised ([n, V] dense; p [n, V], x_t [n],
    R the reverse state law t -> s per row [n, S, S], m_t the state law at t [n, S])."""
    n, V = p.shape
    slots = kernel.num_states - NEIGHBOUR
    ids = torch.arange(V, device=p.device)
    like = torch.zeros(n, V, kernel.num_states, dtype=torch.float64, device=p.device)
    like[..., CLEAN] = (ids[None] == xt[:, None]).double()
    like[..., GLOBAL] = kernel.nu[xt][:, None]
    if slots:
        like[..., NEIGHBOUR:] = (kernel.neighbours[:, :slots][None] == xt[:, None, None]).double()
    post = m_t[:, None] * like
    possible = post.sum(-1)
    post = post / possible.clamp_min(TINY)[..., None]  # q(state_t | x_t, x_0') for every x_0' ([n, V, S])
    diag = R.diagonal(dim1=1, dim2=2)  # staying keeps x_t, and so does an x_0' under which x_t is impossible
    leave = R - torch.diag_embed(diag)
    stay = torch.where(possible > 0, (post * diag[:, None]).sum(-1), torch.ones_like(possible))
    law = torch.zeros(n, V, dtype=torch.float64, device=p.device)
    law[torch.arange(n, device=p.device), xt] = (p * stay).sum(1)
    law += p * (post * leave[:, None, :, CLEAN]).sum(-1)  # x_s = x_0'
    if slots:
        enter = torch.einsum("nvs,nsr->nvr", post, leave[:, :, NEIGHBOUR:])  # x_s = N(x_0')[r]
        law.scatter_add_(1, kernel.neighbours[:, :slots].reshape(1, -1).expand(n, -1),
                         (p[..., None] * enter).reshape(n, -1))
    return law


def marginal_prior_kl(kernel: Kernel, m: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Per token id x_0 ([V]): KL(q_1(x_1 | x_0) || sum_y m(y) q_1(x_1 | y)), the tokens only (chunked O(V^2)
    time, O(chunk V) memory; 0 when q_1 does not depend on x_0, as for mask, uniform and SemDLM+ with beta_1 = 1)."""
    m = m.to(kernel.nu.device, torch.float64)
    V = kernel.vocab_size
    mix = torch.zeros(V, dtype=torch.float64, device=m.device)
    for start in range(0, V, chunk):
        ids = torch.arange(start, min(start + chunk, V), device=m.device)
        mix += (m[ids, None] * kernel.probs(ids, 1.0)).sum(0)
    out = torch.zeros(V, dtype=torch.float64, device=m.device)
    for start in range(0, V, chunk):
        ids = torch.arange(start, min(start + chunk, V), device=m.device)
        out[ids] = _xlogy_ratio(kernel.probs(ids, 1.0), mix[None]).sum(1)
    return out


def marginal_bound(denoise: Denoise, kernel: Kernel, x0: torch.Tensor, grid_steps: int, prior: torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
    """One-sample estimate per sequence (nats/token) of the paper's model's ELBO on the grid t_k = k / T:
    sum_i [ prior(x_0^i) + T E_k KL(q(x_s | x_t, x_0) || sum_{x_0'} p_theta(x_0' | x_t) q(x_s | x_t, x_0')) ],
    the state marginalised on both sides (``step_law``); ``prior`` from ``marginal_prior_kl``."""
    B, L = x0.shape
    t, s = _grid(B, grid_steps, generator)
    xt, _ = kernel.corrupt(x0, t, generator)
    p = torch.softmax(kernel.constrain(denoise(xt, t.float(), None), xt, None).double(), dim=-1)
    R, m_t = reverse_probs(kernel, t, s), kernel.state_probs(t)
    b = torch.arange(B, device=x0.device)[:, None].expand(B, L).reshape(-1)
    flat_x0, flat_xt, flat_p = x0.reshape(-1), xt.reshape(-1), p.reshape(B * L, -1)
    kl = torch.empty(B * L, dtype=torch.float64, device=x0.device)
    width = kernel.vocab_size * kernel.num_states
    for c in _chunks(B * L, width):
        args = (flat_xt[c], R[b[c]], m_t[b[c]])
        truth = torch.zeros_like(flat_p[c]).scatter_(1, flat_x0[c, None], 1.0)
        kl[c] = _xlogy_ratio(step_law(kernel, truth, *args), step_law(kernel, flat_p[c], *args)).sum(1)
    return (prior[x0].sum(1) + grid_steps * kl.view(B, L).sum(1)) / L


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


def token_prior_kl(kernel: Kernel, x0_prior: torch.Tensor, latent: bool) -> torch.Tensor:
    """What ``validation_nelbo`` needs besides the data: the prior term per token id (compute it once per run)."""
    return latent_prior_kl(kernel, x0_prior) if latent else marginal_prior_kl(kernel, x0_prior)


def validation_nelbo(denoise: Denoise, kernel: Kernel, data: torch.Tensor, batch_size: int, batches: int,
                     seed: int, grid_steps: int, prior: torch.Tensor, repeats: int = 1, latent: bool = True) -> float:
    """Mean bound (nats/token) over the first ``batches * batch_size`` sequences, each scored ``repeats`` times
    at independent stratified grid steps, with a fixed seed; ``prior`` from ``token_prior_kl``. Runs on the
    device of ``data`` and ``kernel``."""
    bound = latent_bound if latent else marginal_bound
    device = data.device
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for _ in range(repeats):
        for start in range(0, min(len(data), batches * batch_size), batch_size):
            x0 = data[start : start + batch_size]
            total += bound(denoise, kernel, x0, grid_steps, prior, gen).sum()
            n += len(x0)
    return float(total) / n
