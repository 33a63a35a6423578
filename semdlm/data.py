"""Document split, sequence packing and the compact vocabulary (pure functions over arrays)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def split_documents(n_docs: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split by document: (train indices, valid indices), each sorted; both non-empty when n_docs >= 2."""
    if n_docs < 2:
        raise ValueError(f"need at least 2 documents to split train/valid, got {n_docs}")
    order = np.random.default_rng(seed).permutation(n_docs)
    n_valid = min(max(1, round(n_docs * valid_fraction)), n_docs - 1)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def pack(docs: Sequence[np.ndarray], seq_len: int, cls_id: int, sep_id: int) -> np.ndarray:
    """LM1B-"wrap" packing: [CLS] doc [SEP] [CLS] doc [SEP] ... cut into rows of ``seq_len`` (tail dropped)."""
    if not docs:
        return np.zeros((0, seq_len), dtype=np.int32)
    cls, sep = np.array([cls_id], dtype=np.int32), np.array([sep_id], dtype=np.int32)
    stream = np.concatenate([piece for d in docs for piece in (cls, np.asarray(d, dtype=np.int32), sep)])
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def compact_vocab(counts: np.ndarray, min_count: int, special_ids: Sequence[int]) -> np.ndarray:
    """Original ids kept by the compact vocabulary (specials first, then ids with count >= min_count)."""
    special = list(dict.fromkeys(int(i) for i in special_ids))
    frequent = [int(i) for i in np.flatnonzero(counts >= min_count) if int(i) not in special]
    return np.array(special + frequent, dtype=np.int64)


def lookup_table(kept: np.ndarray, full_size: int, unk_compact: int) -> np.ndarray:
    """Map full ids -> compact ids (ids outside the compact vocabulary go to ``unk_compact``)."""
    table = np.full(full_size, unk_compact, dtype=np.int32)
    table[kept] = np.arange(len(kept), dtype=np.int32)
    return table
