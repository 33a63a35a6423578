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


def residual_slots(kernel: Kernel, x0: torch.Tensor, ct: Coef, cs: Coef) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_s - r_t)_+ on the neighbour slots of x_0 that are inside N_{k_t} ([N, k_max]), and the mass of the
    residual outside N_{k_t}(x_0), which is (b_s - b_t)_+ nu(j) there ([N])."""
    db = cs.b - ct.b
    if kernel.neighbours is None or not kernel.uses_neighbours:
        return torch.zeros(len(x0), 0, dtype=torch.float64), db.clamp_min(0.0).expand(len(x0)).clone()
    nb = kernel.neighbours[x0]
    ranks = _ranks(len(x0), nb.shape[1])
    inside_t, inside_s = ranks < ct.k[:, None], ranks < cs.k[:, None]
    diff = db[:, None] * kernel.nu[nb] + cs.h[:, None] * inside_s - ct.h[:, None] * inside_t
    slots = torch.where(inside_t, diff.clamp_min(0.0), torch.zeros_like(diff))
    outside = db.clamp_min(0.0) * (1.0 - (kernel.nu[nb] * inside_t).sum(1))
    return slots, outside


def keep_prob(kernel: Kernel, xt: torch.Tensor, x0: torch.Tensor, ct: Coef, cs: Coef) -> torch.Tensor:
    """c = min(1, r_s(x_t | x_0) / r_t(x_t | x_0)); 1 where x_t cannot be a corruption of x_0 at t."""
    rt = corruption_prob(kernel, xt, x0, ct)
    rs = corruption_prob(kernel, xt, x0, cs)
    return torch.where(rt > 0, (rs / rt.clamp_min(1e-300)).clamp_max(1.0), torch.ones_like(rt))


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


def reverse_step(
    kernel: Kernel, xt: torch.Tensor, x0: torch.Tensor, t: float, s: float, gen: torch.Generator | None = None
) -> torch.Tensor:
    """x_s ~ q(. | x_t, x_0) with the latent flag z marginalised out ([N] positions, scalar times)."""
    n = len(xt)
    ct = coef(kernel, torch.full((n,), t, dtype=torch.float64))
    cs = coef(kernel, torch.full((n,), s, dtype=torch.float64))
    q_t = ct.alpha * (xt == x0) + (1 - ct.alpha) * corruption_prob(kernel, xt, x0, ct)
    clean = ct.alpha * (xt == x0) / q_t.clamp_min(1e-300)  # P(z_t = 1 | x_t, x_0)
    pi = (cs.alpha - ct.alpha) / (1 - ct.alpha).clamp_min(1e-300)
    u = torch.rand(n, 2, dtype=torch.float64, generator=gen)
    to_clean = u[:, 0] < clean + (1 - clean) * pi
    keep = u[:, 1] < keep_prob(kernel, xt, x0, ct, cs)
    out = torch.where(to_clean, x0, xt)
    move = ~to_clean & ~keep
    if move.any():
        ct_m, cs_m = select(ct, move), select(cs, move)
        slots, outside = residual_slots(kernel, x0[move], ct_m, cs_m)
        w = torch.cat([slots, outside[:, None]], dim=1)
        pick = torch.multinomial(w / w.sum(1, keepdim=True), 1, generator=gen).squeeze(1)
        new = _sample_nu_outside(kernel, x0[move], ct_m.k, gen)
        if slots.shape[1]:
            from_slot = pick < slots.shape[1]
            nb = kernel.neighbours[x0[move]]
            new = torch.where(from_slot, nb.gather(1, pick.clamp_max(slots.shape[1] - 1)[:, None]).squeeze(1), new)
        out[move] = new
    return out

