"""The Markov kernels (mask, uniform): q_t = alpha_t delta_{x_0} + (1 - alpha_t) nu is the marginal of a jump
process with rates R_t(x -> y) = lambda_t nu(y), lambda_t = -alpha'_t / alpha_t. Its reverse rates given x_0
are lambda_t nu(x) q_t(y | x_0) / q_t(x | x_0); the model averages the ratio over p_theta(x_0 | x_t)."""

from __future__ import annotations

import torch

from semdlm.kernels import Kernel


def is_markov(kernel: Kernel) -> bool:
    """alpha_t = 1 - t, beta_t = 1 - alpha_t and no neighbour branch (the form this module assumes)."""
    s = kernel.schedule
    return not kernel.uses_neighbours and s.alpha_min == 0.0 and s.beta_max == 1.0 and s.eta == s.beta == 1.0


def rate(kernel: Kernel, t: torch.Tensor) -> torch.Tensor:
    """lambda_t = -alpha'_t / alpha_t."""
    return -kernel.schedule.dalpha(t) / kernel.schedule.alpha(t).clamp_min(1e-12)


def model_ratio(p: torch.Tensor, xt: torch.Tensor, kernel: Kernel, a: torch.Tensor) -> torch.Tensor:
    """s(y) = sum_x0' p(x_0') q_t(y | x_0') / q_t(x | x_0') for y != x = x_t, in closed form ([..., V], float64):

    a p(y) / ((1 - a) nu(x)) + (1 - a) nu(y) Z,   Z = p(x) / (a + (1 - a) nu(x)) + (1 - p(x)) / ((1 - a) nu(x)).
    ``a`` = alpha_t broadcastable to p[..., :1]. Meaningless where nu(x) = 0 (no reverse jump leaves x).
    """
    c = 1.0 - a
    nu_x = kernel.nu[xt][..., None].clamp_min(1e-300)
    p_x = p.gather(-1, xt[..., None])
    z = p_x / (a + c * nu_x) + (1.0 - p_x) / (c * nu_x)
    return a * p / (c * nu_x) + c * kernel.nu * z
