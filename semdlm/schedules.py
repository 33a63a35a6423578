"""Noise schedules of the forward kernels: retention alpha_t, global jump beta_t, neighbourhood size k_t.

All kernels in this package are instances of one marginal (Eq. 117):

    q(x_t = j | x_0 = i) = alpha_t delta_ij + beta_t nu(j) + (1 - alpha_t - beta_t) / k_t * 1[j in N_{k_t}(i)]

so a schedule is the triple (alpha_t, beta_t, k_t) as functions of t in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """alpha_t = a_min + (1 - a_min)(1 - t)^beta, beta_t = b_max t^eta, k_t = 1 + (k_max - 1) t^gamma (Eq. 118).

    The masking and uniform kernels use alpha_min=0, beta=1, beta_max=1, eta=1, so alpha_t = 1 - t and
    beta_t = t; the KNN kernel has beta_max=0 and gamma=0 (k_t = k_max for every t > 0).
    """

    alpha_min: float = 0.0
    beta: float = 1.0
    beta_max: float = 1.0
    eta: float = 1.0
    k_max: int = 1
    gamma: float = 1.0

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.alpha_min + (1.0 - self.alpha_min) * (1.0 - t) ** self.beta  # Eq. 118

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha_t / dt."""
        return -(1.0 - self.alpha_min) * self.beta * (1.0 - t).clamp_min(0.0) ** (self.beta - 1.0)

    def jump_mass(self, t: torch.Tensor) -> torch.Tensor:
        """beta_t of Eq. 117-118: the mass of the global jump to nu (``beta``, by contrast, is alpha_t's exponent)."""
        return self.beta_max * t**self.eta  # Eq. 118

    def k(self, t: torch.Tensor) -> torch.Tensor:
        """Integer neighbourhood size floor(1 + (k_max - 1) t^gamma), in [1, k_max] (Eq. 118)."""
        if self.gamma == 0:
            return torch.full_like(t, self.k_max, dtype=torch.long)
        return torch.floor(1.0 + (self.k_max - 1) * t**self.gamma + 1e-9).long().clamp(1, self.k_max)

    def validate(self, grid: int = 1001) -> None:
        """Raise ValueError when the schedule is not a probability mixture on [0, 1]."""
        if not 0.0 <= self.alpha_min <= 1.0:
            raise ValueError(f"alpha_min={self.alpha_min} is outside [0, 1]; choose a value in [0, 1)")
        if self.beta <= 0 or self.eta <= 0 or self.gamma < 0:
            raise ValueError(
                f"beta={self.beta}, eta={self.eta}, gamma={self.gamma}: beta and eta must be > 0, gamma >= 0"
            )
        if self.beta_max < 0:
            raise ValueError(f"beta_max={self.beta_max} must be >= 0")
        if self.k_max < 1:
            raise ValueError(f"k_max={self.k_max} must be >= 1")
        t = torch.linspace(0, 1, grid, dtype=torch.float64)
        total = self.alpha(t) + self.jump_mass(t)
        worst = int(total.argmax())
        if float(total[worst]) > 1.0 + 1e-9:
            raise ValueError(
                f"alpha_t + beta_t = {float(total[worst]):.4f} > 1 at t={float(t[worst]):.3f} "
                f"(alpha_min={self.alpha_min}, beta_max={self.beta_max}, eta={self.eta}); "
                "lower beta_max or raise eta"
            )
