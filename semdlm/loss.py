"""Training loss (change-aware weighted cross-entropy, Eq. 120) and the masking kernel's NELBO.

Per position i the loss term is omega(t) * CE_i with CE_i = -log p_theta(x_0^i | x_t), and

    L_train = sum_i w_i omega(t) CE_i / sum_i w_i,   w_i = lambda_chg 1[x_t^i != x_0^i] + lambda_same 1[x_t^i = x_0^i]

(Eq. 120). ``omega(t) = -alpha'_t / (1 - alpha_t)`` with ``time_weight="elbo"``, else 1 (Eq. 3). For the masking
kernel p_theta copies unmasked tokens (carry-over, ``Kernel.constrain``), and so does the latent-state model at clean
positions, so their CE is 0; with lambda_chg = lambda_same = 1 and the
ELBO weight, L_train is exactly the MDLM continuous-time NELBO per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semdlm.kernels import NEIGHBOUR, Kernel


def stratified_times(batch: int, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Low-discrepancy t in [eps, 1]: t_b = eps + (1 - eps) * ((u + b / B) mod 1), one uniform u per batch."""
    device = generator.device if generator is not None else None
    u = torch.rand((), generator=generator, dtype=torch.float64, device=device)
    return eps + (1 - eps) * torch.remainder(u + torch.arange(batch, dtype=torch.float64, device=device) / batch, 1.0)


def time_weight(kernel: Kernel, t: torch.Tensor) -> torch.Tensor:
    """omega(t) = -alpha'_t / (1 - alpha_t): the continuous-time NELBO weight of the absorbing kernel."""
    s = kernel.schedule
    return -s.dalpha(t) / (1.0 - s.alpha(t)).clamp_min(1e-12)


def token_ce(logits: torch.Tensor, x0: torch.Tensor, kernel: Kernel, xt: torch.Tensor,
             state: torch.Tensor | None) -> torch.Tensor:
    """-log p_theta(x_0^i | x_t, state) per position ([B, L]) under ``Kernel.constrain``, without copying the
    [B, L, V] logits: 0 at the known (carried-over) positions; at a neighbour slot the normaliser runs over the
    slot's preimage list alone (``Kernel.preimage_logsumexp``). The model's own logits must already exclude
    [MASK] (``Denoiser`` does). Flat [B * L, V] layout: the [B, V, L] one runs a spatial softmax several times
    slower."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x0.reshape(-1), reduction="none").view_as(x0)
    known = kernel.known(xt, state)
    if known is not None:
        ce = ce.masked_fill(known, 0.0)
    if state is not None and kernel.num_states > NEIGHBOUR and bool((slot := state >= NEIGHBOUR).any()):
        at = slot.nonzero(as_tuple=True)  # x_0 lies in the slot's preimage {y : N(y)[r] = x_t}, its normaliser
        logz = kernel.preimage_logsumexp(logits, at, xt[at], state[at] - NEIGHBOUR)
        ce = ce.index_put(at, (logz - logits[(*at, x0[at])]).to(ce.dtype))
    return ce


def change_aware_loss(
    ce: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    omega: torch.Tensor,
    lambda_chg: float,
    lambda_same: float,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 120 with per-sequence time weight ``omega`` ([B]): sum_i w_i omega CE_i / sum_i w_i.

    ``norm`` replaces sum_i w_i when ``ce`` covers a shard of a larger batch (devices, accumulation), so that the
    shards' losses add up to the loss of the whole batch.
    """
    w = change_weights(x0, xt, lambda_chg, lambda_same, ce.dtype)
    return (w * omega.to(ce.dtype)[:, None] * ce).sum() / (w.sum() if norm is None else norm).clamp_min(1e-12)


def change_weights(x0: torch.Tensor, xt: torch.Tensor, lambda_chg: float, lambda_same: float,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_i of Eq. 120: lambda_chg where the kernel changed the token, lambda_same where it did not."""
    changed = (xt != x0).to(dtype)
    return lambda_chg * changed + lambda_same * (1.0 - changed)

