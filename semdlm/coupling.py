"""Reverse coupling q(x_s | x_t, x_0), s < t, for any kernel of the form of Eq. 117.

Write the kernel as q_t(. | x_0) = alpha_t delta_{x_0} + (1 - alpha_t) r_t(. | x_0) with the corruption law

    r_t(j | x_0) = b_t nu(j) + h_t 1[j in N_{k_t}(x_0)],   b_t = beta_t / (1 - alpha_t),  h_t = g_t / (1 - alpha_t),

g_t = (1 - alpha_t - beta_t) / k_t. A latent flag z says whether a token is still clean. Going from t to s:

- a clean token stays clean (z_s = 1, x_s = x_0);
- a corrupted one becomes clean with probability pi = (alpha_s - alpha_t) / (1 - alpha_t), else it stays
  corrupted and moves by the maximal coupling M(. | x_t) of r_t(. | x_0) and r_s(. | x_0): it keeps x_t with
  probability c = min(1, r_s(x_t) / r_t(x_t)), else it is drawn from the residual (r_s - r_t)_+ / TV.

The marginals are exactly q_s(. | x_0) at every s (docs/likelihood.md). The kernels here are not Markov
processes in general (kNN neighbourhoods that grow with t), so this coupling is what defines both the
reverse sampler for those kernels and their likelihood bound. Everything is O(N * k_max): the residual of a
token lives on its neighbour slots plus a nu-shaped global part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from semdlm.kernels import Kernel


@dataclass
class Coef:
    """Per-position coefficients of r_t at one time: all tensors broadcast against the positions ([N])."""

    alpha: torch.Tensor
    b: torch.Tensor
    h: torch.Tensor
    k: torch.Tensor  # long


def coef(kernel: Kernel, t: torch.Tensor) -> Coef:
    a, beta, mass, k = kernel.coefficients(t)  # mass = 1 - alpha_t - beta_t, spread over k_t neighbours
    corrupted = (1.0 - a).clamp_min(1e-300)
    return Coef(a, beta / corrupted, mass / k / corrupted, k)


def _ranks(n: int, kmax: int) -> torch.Tensor:
    return torch.arange(kmax).expand(n, kmax)


def select(c: Coef, sel: torch.Tensor) -> Coef:
    """The coefficients of the positions picked by ``sel`` (a mask or index tensor)."""
    return Coef(c.alpha[sel], c.b[sel], c.h[sel], c.k[sel])


def corruption_prob(kernel: Kernel, x: torch.Tensor, x0: torch.Tensor, c: Coef) -> torch.Tensor:
    """r_t(x | x_0) for paired positions ([N])."""
    p = c.b * kernel.nu[x]
    if kernel.neighbours is not None and kernel.uses_neighbours:
        nb = kernel.neighbours[x0]  # [N, k_max]
        member = ((nb == x[:, None]) & (_ranks(len(x), nb.shape[1]) < c.k[:, None])).any(1)
        p = p + c.h * member
    return p


def residual_slots(kernel: Kernel, x0: torch.Tensor, c_from: Coef, c_to: Coef) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual (r_to - r_from)_+ of a maximal coupling, split into its neighbour slots and its nu part.

    Returns the residual on the neighbour slots of x_0 inside N_K, K = max(k_from, k_to) ([N, k_max], zero
    beyond K), and its mass outside N_K, which is (b_to - b_from)_+ nu(j) there ([N])."""
    db = c_to.b - c_from.b
    if kernel.neighbours is None or not kernel.uses_neighbours:
        return torch.zeros(len(x0), 0, dtype=torch.float64), db.clamp_min(0.0).expand(len(x0)).clone()
    nb = kernel.neighbours[x0]
    ranks = _ranks(len(x0), nb.shape[1])
    inside = ranks < torch.maximum(c_from.k, c_to.k)[:, None]
    diff = db[:, None] * kernel.nu[nb] + c_to.h[:, None] * (ranks < c_to.k[:, None]) \
        - c_from.h[:, None] * (ranks < c_from.k[:, None])
    slots = torch.where(inside, diff.clamp_min(0.0), torch.zeros_like(diff))
    outside = db.clamp_min(0.0) * (1.0 - (kernel.nu[nb] * inside).sum(1))
    return slots, outside


def keep_prob(kernel: Kernel, x: torch.Tensor, x0: torch.Tensor, c_from: Coef, c_to: Coef) -> torch.Tensor:
    """min(1, r_to(x | x_0) / r_from(x | x_0)); 1 where x cannot be a corruption of x_0 under r_from."""
    r_from = corruption_prob(kernel, x, x0, c_from)
    r_to = corruption_prob(kernel, x, x0, c_to)
    return torch.where(r_from > 0, (r_to / r_from.clamp_min(1e-300)).clamp_max(1.0), torch.ones_like(r_from))


def _sample_nu_outside(kernel: Kernel, x0: torch.Tensor, k: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Draw from nu restricted to tokens outside N_k(x_0), by rejection (the excluded set is tiny)."""
    out = kernel.sample_nu((len(x0),), gen)
    if kernel.neighbours is None or not kernel.uses_neighbours:
        return out
    nb = kernel.neighbours[x0]
    ranks = _ranks(len(x0), nb.shape[1])
    for _ in range(1000):
        bad = ((nb == out[:, None]) & (ranks < k[:, None])).any(1)
        if not bad.any():
            return out
        out[bad] = kernel.sample_nu((int(bad.sum()),), gen)
    raise RuntimeError("nu puts (almost) all its mass on the neighbourhood; cannot sample its complement")


def _from_residual(kernel: Kernel, x0: torch.Tensor, c_from: Coef, c_to: Coef, gen: torch.Generator | None):
    """One draw per position from the normalised residual (r_to - r_from)_+ / TV."""
    slots, outside = residual_slots(kernel, x0, c_from, c_to)
    w = torch.cat([slots, outside[:, None]], dim=1)
    pick = torch.multinomial(w / w.sum(1, keepdim=True), 1, generator=gen).squeeze(1)
    new = _sample_nu_outside(kernel, x0, torch.maximum(c_from.k, c_to.k), gen)
    if slots.shape[1]:
        nb = kernel.neighbours[x0]
        from_slot = nb.gather(1, pick.clamp_max(slots.shape[1] - 1)[:, None]).squeeze(1)
        new = torch.where(pick < slots.shape[1], from_slot, new)
    return new


def _couple(kernel: Kernel, x: torch.Tensor, x0: torch.Tensor, c_from: Coef, c_to: Coef, u: torch.Tensor,
            corrupted: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Move the ``corrupted`` tokens x ~ r_from(.|x_0) by the maximal coupling to r_to(.|x_0): keep x with
    probability min(1, r_to(x) / r_from(x)) (``u`` the uniforms), else draw from the residual."""
    move = corrupted & (u >= keep_prob(kernel, x, x0, c_from, c_to))
    out = x.clone()
    if move.any():
        out[move] = _from_residual(kernel, x0[move], select(c_from, move), select(c_to, move), gen)
    return out


def _levels(kernel: Kernel, n: int, *times: float) -> list[Coef]:
    return [coef(kernel, torch.full((n,), t, dtype=torch.float64)) for t in times]


def clean_prob(kernel: Kernel, x: torch.Tensor, x0: torch.Tensor, c: Coef) -> torch.Tensor:
    """P(z = clean | x, x_0) = alpha delta_{x, x_0} / q(x | x_0) at the level of ``c``."""
    q = c.alpha * (x == x0) + (1 - c.alpha) * corruption_prob(kernel, x, x0, c)
    return c.alpha * (x == x0) / q.clamp_min(1e-300)


def reverse_step(
    kernel: Kernel, xt: torch.Tensor, x0: torch.Tensor, t: float, s: float, gen: torch.Generator | None = None
) -> torch.Tensor:
    """x_s ~ q(. | x_t, x_0), s < t, with the latent flag z marginalised out ([N] positions, scalar times).

    A corrupted token turns clean with probability (alpha_s - alpha_t) / (1 - alpha_t), else it moves by the
    maximal coupling of r_t and r_s."""
    ct, cs = _levels(kernel, len(xt), t, s)
    clean = clean_prob(kernel, xt, x0, ct)
    pi = (cs.alpha - ct.alpha) / (1 - ct.alpha).clamp_min(1e-300)
    u = torch.rand(len(xt), 2, dtype=torch.float64, generator=gen)
    to_clean = u[:, 0] < clean + (1 - clean) * pi
    return torch.where(to_clean, x0, _couple(kernel, xt, x0, ct, cs, u[:, 1], ~to_clean, gen))


def sample_corruption(kernel: Kernel, x0: torch.Tensor, c: Coef, gen: torch.Generator | None = None) -> torch.Tensor:
    """x ~ r(. | x_0) = b nu + h 1[N_k(x_0)] at the level of ``c`` ([N] positions)."""
    u = torch.rand(len(x0), 2, dtype=torch.float64, generator=gen)
    out = kernel.sample_nu((len(x0),), gen)
    if kernel.neighbours is not None and kernel.uses_neighbours:
        rank = torch.floor(u[:, 1] * c.k).long().clamp_max(c.k - 1)  # uniform over the top-k
        out = torch.where(u[:, 0] >= c.b, kernel.neighbours[x0, rank], out)
    return out


def forward_step(
    kernel: Kernel, xs: torch.Tensor, x0: torch.Tensor, s: float, t: float, gen: torch.Generator | None = None
) -> torch.Tensor:
    """x_t ~ q(. | x_s, x_0), s < t: the forward move of the same latent-flag process that ``reverse_step``
    reverses. A clean token is corrupted with probability 1 - alpha_t / alpha_s (then x_t ~ r_t(. | x_0)); a
    corrupted one moves by the maximal coupling of r_s and r_t. Marginals go from q_s(.|x_0) to q_t(.|x_0)."""
    cs, ct = _levels(kernel, len(xs), s, t)
    clean = clean_prob(kernel, xs, x0, cs)
    u = torch.rand(len(xs), 3, dtype=torch.float64, generator=gen)
    is_clean = u[:, 0] < clean
    stays = u[:, 1] < ct.alpha / cs.alpha.clamp_min(1e-300)
    out = _couple(kernel, xs, x0, cs, ct, u[:, 2], ~is_clean, gen)
    fresh = is_clean & ~stays
    if fresh.any():
        out[fresh] = sample_corruption(kernel, x0[fresh], select(ct, fresh), gen)
    return out
