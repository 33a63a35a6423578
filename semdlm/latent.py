"""The latent-state process that every kernel of Eq. 117 is the marginal of, and its reverse.

Each token carries a state: CLEAN (x_t = x_0), GLOBAL (x_t a draw from nu, kept while the state lasts) or the
neighbour slot r (x_t = N(x_0)[r]). At time t the state has law m_t = (alpha_t, beta_t, g_t 1[r < k_t]),
g_t = (1 - alpha_t - beta_t) / k_t (``Kernel.state_probs``), so x_t has exactly the marginal q_t(. | x_0).

The state moves on its own, independently of x_0 (docs/likelihood.md, "latent-state model"). Between two times
s < t, what a state loses (m_s - m_t)_+ goes to the states that gain (m_t - m_s)_+, in this order:
a slot's loss goes to GLOBAL first (a nu draw: no x_0 needed), CLEAN's loss fills the gaining slots first, and
only what is left moves slot to slot (when k_t grows: the one move that needs x_0 beyond the current token).
The reverse of that flow, R_{t->s}, does not depend on x_0 either, so a sampler decides which positions change
state before it calls the network, and the likelihood bound needs only p_theta at the states a token can enter.
"""

from __future__ import annotations

import torch

from semdlm.kernels import CLEAN, GLOBAL, NEIGHBOUR, Kernel

TINY = 1e-300


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of (unnormalised) float64 ``probs`` ([N, n]) by inverse CDF."""
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[1] - 1)


def _times(t: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64, device=device).reshape(-1)


def flows(kernel: Kernel, s: float | torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Mass moved from each state at s to each state at t > s ([B, n, n]; rows sum to m_s, columns to m_t)."""
    device = kernel.nu.device
    a, b = kernel.state_probs(_times(s, device)), kernel.state_probs(_times(t, device))
    lose, gain = (a - b).clamp_min(0.0), (b - a).clamp_min(0.0)
    f = torch.diag_embed(torch.minimum(a, b))
    slot_loss, slot_gain = lose[:, NEIGHBOUR:], gain[:, NEIGHBOUR:]
    total_loss, total_gain = slot_loss.sum(1), slot_gain.sum(1)
    to_global = torch.minimum(total_loss, gain[:, GLOBAL])  # slots -> GLOBAL first
    slot_to_slot = total_loss - to_global
    from_clean = (total_gain - slot_to_slot).clamp_min(0.0)
    out_share = slot_loss / total_loss.clamp_min(TINY)[:, None]
    in_share = slot_gain / total_gain.clamp_min(TINY)[:, None]
    f[:, CLEAN, GLOBAL] += (gain[:, GLOBAL] - to_global).clamp_min(0.0)
    f[:, CLEAN, NEIGHBOUR:] += from_clean[:, None] * in_share
    f[:, NEIGHBOUR:, GLOBAL] += to_global[:, None] * out_share
    f[:, NEIGHBOUR:, NEIGHBOUR:] += slot_to_slot[:, None, None] * out_share[:, :, None] * in_share[:, None, :]
    return f


def forward_probs(kernel: Kernel, s: float | torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """P(state_t = j | state_s = i) ([B, n, n]; identity rows for states of zero mass at s)."""
    return _conditional(flows(kernel, s, t))


def reverse_probs(kernel: Kernel, t: float | torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """R_{t->s}(i | j) = P(state_s = i | state_t = j) ([B, n_t, n_s]; identity rows for states of zero mass at t)."""
    return _conditional(flows(kernel, s, t).transpose(1, 2))


def _conditional(f: torch.Tensor) -> torch.Tensor:
    """Rows of a flow matrix ([B, n, n]) normalised to conditional laws; identity rows where a row has no mass."""
    mass = f.sum(2, keepdim=True)
    eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device).expand_as(f)
    return torch.where(mass > 0, f / mass.clamp_min(TINY), eye)


def reverse_states(kernel: Kernel, state: torch.Tensor, t: float, s: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """state_s ~ R_{t->s}(. | state_t) per position ([N]); x_0 plays no part."""
    return draw(reverse_probs(kernel, t, s)[0][state], generator)


def move(kernel: Kernel, x: torch.Tensor, state: torch.Tensor, new: torch.Tensor, x0: torch.Tensor,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """The token of each position after its state changes from ``state`` to ``new`` given x_0 ([N]): unchanged
    where the state stays, a fresh nu draw on entering GLOBAL, else ``Kernel.token_of``."""
    out = torch.where(new == state, x, kernel.token_of(new, x0))
    fresh = (new == GLOBAL) & (state != GLOBAL)
    if fresh.any():
        out[fresh] = kernel.sample_nu((int(fresh.sum()),), generator)
    return out


def reverse_step(kernel: Kernel, x: torch.Tensor, state: torch.Tensor, x0: torch.Tensor, t: float, s: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_s, state_s) ~ q(. | x_t, state_t, x_0), s < t ([N] positions, scalar times)."""
    new = reverse_states(kernel, state, t, s, generator)
    return move(kernel, x, state, new, x0, generator), new


def forward_step(kernel: Kernel, x: torch.Tensor, state: torch.Tensor, x0: torch.Tensor, s: float, t: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, state_t) ~ q(. | x_s, state_s, x_0), s < t: the forward move that ``reverse_step`` reverses."""
    new = draw(forward_probs(kernel, s, t)[0][state], generator)
    return move(kernel, x, state, new, x0, generator), new


def state_posterior(kernel: Kernel, x: torch.Tensor, x0: torch.Tensor, t: float) -> torch.Tensor:
    """q(state_t | x_t, x_0) per position ([N, n]): m_t(state) times the chance that state shows x_t; a zero row
    where x_t is impossible given x_0."""
    m = kernel.state_probs(_times(t, x.device))  # [1, n]
    like = torch.zeros(len(x), kernel.num_states, dtype=torch.float64, device=x.device)
    like[:, CLEAN] = (x == x0).double()
    like[:, GLOBAL] = kernel.nu[x]
    if kernel.num_states > NEIGHBOUR:
        like[:, NEIGHBOUR:] = (kernel.neighbours[x0, : kernel.num_states - NEIGHBOUR] == x[:, None]).double()
    w = m * like
    return w / w.sum(1, keepdim=True).clamp_min(TINY)


def marginal_reverse_step(kernel: Kernel, x: torch.Tensor, x0: torch.Tensor, t: float, s: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """x_s ~ q(. | x_t, x_0) with the state marginalised: the step of the paper's model, whose denoiser sees x_t
    only (the state is drawn from ``state_posterior``, moved, and forgotten). Where x_t is impossible given the
    proposed x_0, the token stays."""
    post = state_posterior(kernel, x, x0, t)
    moved = reverse_step(kernel, x, draw(post, generator), x0, t, s, generator)[0]
    return torch.where(post.sum(1) > 0, moved, x)


def marginal_forward_step(kernel: Kernel, x: torch.Tensor, x0: torch.Tensor, s: float, t: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t ~ q(. | x_s, x_0) with the state marginalised (the corrector's forward half in the paper's model); the
    token stays where x_s is impossible given x_0."""
    post = state_posterior(kernel, x, x0, s)
    moved = forward_step(kernel, x, draw(post, generator), x0, s, t, generator)[0]
    return torch.where(post.sum(1) > 0, moved, x)
