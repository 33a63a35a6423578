"""Goodness-of-fit helpers shared by the kernel and latent-state tests."""

from __future__ import annotations

import math

import torch


def assert_frequencies_match(samples: torch.Tensor, expected_probs: torch.Tensor) -> None:
    """Pearson chi-square of the token counts of ``samples`` against ``expected_probs`` ([V]), with a
    threshold of dof + 6 sd (+10): a wrong law of a few percent fails, sampling noise does not."""
    counts = torch.bincount(samples.reshape(-1), minlength=len(expected_probs)).double()
    expected = expected_probs * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token outside the support"
    chi2 = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * max(dof, 1)) + 10, f"chi2={chi2:.1f} with {dof} dof"
