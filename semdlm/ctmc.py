"""The Markov kernels (mask, uniform: ``Kernel.is_markov``, beta_t = 1 - alpha_t, no neighbour branch) as Markov
chains in x_t, the paper's model of uniform (D3PM, UDLM, Duo).

Forward, for s < t: q_{t|s} = (alpha_t / alpha_s) I + (1 - alpha_t / alpha_s) 1 nu^T, whose marginals are exactly
Eq. 5 / 6, q_t(. | x_0) = alpha_t delta_{x_0} + (1 - alpha_t) nu. Its exact posterior (Bayes on that chain)

    q(x_s = y | x_t = x, x_0) = [r delta_xy + (1 - r) nu(x)] [alpha_s delta_{y x_0} + (1 - alpha_s) nu(y)] / q_t(x|x_0),

r = alpha_t / alpha_s, is a three-way mixture: stay at x, go to x_0, or a fresh nu draw (``posterior_branches``). The
model's reverse step sum_{x_0} p_theta(x_0 | x_t) q(x_s | x_t, x_0) and its KL from the truth have closed forms in
O(V) per position (``step_kl``).
In continuous time the chain jumps x -> y at rate lambda_t nu(y), lambda_t = -alpha'_t / alpha_t; its reverse rates
given x_0 are lambda_t nu(x) q_t(y | x_0) / q_t(x | x_0), and the model averages the ratio over p_theta(x_0 | x_t)
(Campbell et al.'s tau-leaping, ``likelihood.ctmc_nelbo``). For mask this chain is MDLM's.
"""

from __future__ import annotations

import torch

from semdlm.kernels import Kernel
from semdlm.latent import TINY, draw


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


def _levels(kernel: Kernel, t: float | torch.Tensor, s: float | torch.Tensor,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, alpha_s) as float64 columns ([n, 1] or [1, 1]) for scalar or per-position times."""
    t, s = (torch.as_tensor(v, dtype=torch.float64, device=device).reshape(-1, 1) for v in (t, s))
    return kernel.schedule.alpha(t), kernel.schedule.alpha(s)


def posterior_branches(kernel: Kernel, x: torch.Tensor, x0: torch.Tensor, t: float | torch.Tensor,
                       s: float | torch.Tensor) -> torch.Tensor:
    """Unnormalised q(x_s | x_t = x, x_0) by branch ([n, 3]: stay at x, go to x_0, a fresh nu draw); the row sums
    to q_t(x | x_0), 0 where x is impossible given x_0."""
    a_t, a_s = _levels(kernel, t, s, x.device)
    r, nu_x = (a_t / a_s)[:, 0], kernel.nu[x]
    stay = r * (a_s[:, 0] * (x == x0) + (1 - a_s[:, 0]) * nu_x)
    return torch.stack([stay, (1 - r) * nu_x * a_s[:, 0], (1 - r) * nu_x * (1 - a_s[:, 0])], 1)


def reverse_step(kernel: Kernel, x: torch.Tensor, x0: torch.Tensor, t: float, s: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """x_s ~ q(. | x_t = x, x_0) of the Markov chain, s < t ([n] positions); the token stays where x is impossible
    given x_0."""
    w = posterior_branches(kernel, x, x0, t, s)
    branch = draw(w, generator)
    out = torch.where(branch == 1, x0, x)
    fresh = (branch == 2) & (w.sum(1) > 0)
    if fresh.any():
        out[fresh] = kernel.sample_nu((int(fresh.sum()),), generator)
    return out


def forward_step(kernel: Kernel, x: torch.Tensor, s: float, t: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t ~ q_{t|s}(. | x_s = x), s < t: keep the token with probability alpha_t / alpha_s, else a fresh nu draw
    (x_0 plays no part: the chain is Markov in x_t)."""
    a_t, a_s = _levels(kernel, t, s, x.device)
    u = torch.rand(x.shape, dtype=torch.float64, generator=generator, device=x.device)
    jump = u >= (a_t / a_s)[:, 0]
    out = x.clone()
    if jump.any():
        out[jump] = kernel.sample_nu((int(jump.sum()),), generator)
    return out


def step_kl(kernel: Kernel, p: torch.Tensor, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
            s: torch.Tensor) -> torch.Tensor:
    """KL(q(x_s | x_t = x, x_0) || sum_v p(v) q(x_s | x_t = x, v)) per position ([n]; p [n, V], times [n]), O(V).

    Both laws are f(y) times a term (``posterior_branches``): the truth f(y) T(y) / Z, T(y) = alpha_s delta_{y x_0}
    + (1 - alpha_s) nu(y), Z = q_t(x | x_0); the model f(y) M(y), M(y) = alpha_s w(y) + (1 - alpha_s) nu(y) sum w,
    w(v) = p(v) / q_t(x | v). With sum_y f T = Z,

        KL = [(1 - r) nu(x) sum_y T log(T / M) + r T(x) log(T(x) / M(x))] / Z - log Z,

    one dense pass over y (sum_y nu(y) log M(y)) and a few gathers. Where nu(x) = 0 (an unmasked token of mask) the
    token stays under both laws: 0."""
    a_t, a_s = (kernel.schedule.alpha(v.to(torch.float64)) for v in (t, s))
    r, c, nu_x = a_t / a_s, 1.0 - a_s, kernel.nu[x]
    q0, q1 = (1.0 - a_t) * nu_x, a_t + (1.0 - a_t) * nu_x  # q_t(x | v) for v != x, v = x
    p_x, p_0 = p.gather(1, x[:, None])[:, 0], p.gather(1, x0[:, None])[:, 0]
    ok = q0 > 0
    q0c = q0.clamp_min(TINY)
    W = (p.sum(1) - p_x) / q0c + p_x / q1.clamp_min(TINY)
    dense = (a_s / q0c)[:, None] * p + (c * W)[:, None] * kernel.nu  # M(y) for y != x
    nu_log_m = torch.where(kernel.nu > 0, kernel.nu * dense.clamp_min(TINY).log(), torch.zeros_like(dense)).sum(1)

    def m_at(y: torch.Tensor, p_y: torch.Tensor) -> torch.Tensor:  # M(y) at one token per position
        return a_s * p_y / torch.where(y == x, q1, q0c) + c * kernel.nu[y] * W

    def xlogy(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.where(u > 0, u * v.clamp_min(TINY).log(), torch.zeros_like(u))

    m_x, m_0 = m_at(x, p_x), m_at(x0, p_0)
    nu_log_m = nu_log_m + nu_x * (m_x.clamp_min(TINY).log() - dense.gather(1, x[:, None])[:, 0].clamp_min(TINY).log())
    t_0, t_x = c * kernel.nu[x0] + a_s, c * nu_x + a_s * (x == x0)  # T(x_0), T(x)
    t_log_t = xlogy(c, c) + c * float(xlogy(kernel.nu, kernel.nu).sum()) - xlogy(c * kernel.nu[x0], c * kernel.nu[x0])
    t_log_t = t_log_t + xlogy(t_0, t_0)
    t_log_m = c * nu_log_m + xlogy(a_s, m_0)
    z = torch.where(x == x0, q1, q0)
    kl = ((1 - r) * nu_x * (t_log_t - t_log_m) + r * (xlogy(t_x, t_x) - xlogy(t_x, m_x))) / z.clamp_min(TINY) - z.log()
    return torch.where(ok, kl, torch.zeros_like(kl))
