"""prior: unigram counts on train, the valid-vocabulary mask and nu = count^tau / Z (Eq. 119)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pipeline.artifacts import PRIOR, PRIOR_METRICS, iter_split, load_vocab
from pipeline.common import write_json, write_parquet
from semdlm.config import PriorConfig
from semdlm.prior import global_jump, smoothed_unigram, valid_mask


def unigram_cross_entropy(train_counts: np.ndarray, validation_counts: np.ndarray, exclude: int) -> float:
    """Validation cross-entropy (nats/token) of the add-one-smoothed train unigram (``exclude`` = [MASK])."""
    seen = validation_counts > 0
    p = smoothed_unigram(train_counts, exclude)[seen]
    return float(-(validation_counts[seen] * np.log(p)).sum() / validation_counts.sum())


def split_counts(name: str, vocab_size: int) -> np.ndarray:
    """Token counts of a split, read shard by shard."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for rows in iter_split(name):
        counts += np.bincount(rows.ravel(), minlength=vocab_size)
    return counts


def run(cfg: PriorConfig) -> None:
    vocab = load_vocab()
    counts = split_counts("train", vocab.size)
    valid = valid_mask(vocab.tokens, counts, cfg.min_count)
    nu = global_jump(counts, valid, cfg.tau)
    write_parquet(PRIOR, pd.DataFrame({"id": range(vocab.size), "token": vocab.tokens, "count": counts,
                                       "valid": valid, "nu": nu}))
    ce = unigram_cross_entropy(counts, split_counts("validation", vocab.size), vocab.mask)
    write_json(PRIOR_METRICS, {"unigram_validation_ce": ce, "unigram_validation_ppl": math.exp(ce),
                               "valid_tokens": int(valid.sum()), "vocab_size": vocab.size})
