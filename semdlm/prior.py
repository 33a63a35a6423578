"""Unigram statistics: the valid-vocabulary mask and the global-jump distribution nu (Eq. 119)."""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np

_PUNCT = set(string.punctuation) | set("“”‘’«»–—…·•")


def is_valid_token(token: str) -> bool:
    """Not a special symbol ([CLS], [unused3], ...), not a ## continuation piece, not punctuation only."""
    if token.startswith("[") and token.endswith("]"):
        return False
    if token.startswith("##"):
        return False
    return not all(ch in _PUNCT for ch in token)


def valid_mask(tokens: Sequence[str], counts: np.ndarray, min_count: int) -> np.ndarray:
    """V_valid of Eq. 119: valid token string and count >= min_count."""
    ok = np.array([is_valid_token(t) for t in tokens], dtype=bool)
    return ok & (counts >= min_count)


def smoothed_unigram(counts: np.ndarray, exclude: int) -> np.ndarray:
    """Add-one smoothed unigram over all ids but ``exclude`` ([MASK]): the x_0 law m of the references,
    of the bounds' t=1 term and of the model's initial output bias."""
    c = counts.astype(np.float64) + 1.0
    c[exclude] = 0.0
    return c / c.sum()


def global_jump(counts: np.ndarray, valid: np.ndarray, tau: float) -> np.ndarray:
    """nu_tau(j) = 1[j valid] count(j)^tau / sum_k 1[k valid] count(k)^tau (Eq. 119); tau=0 -> uniform."""
    if not valid.any():
        raise ValueError("no valid token: lower prior.min_count or check the corpus")
    w = np.where(valid, np.power(counts.astype(np.float64), tau, where=valid, out=np.zeros(len(counts))), 0.0)
    return w / w.sum()
