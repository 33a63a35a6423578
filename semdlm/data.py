"""Document split, sequence packing and the compact vocabulary (pure functions over arrays)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # bert-base-uncased's, first in a compact vocabulary


def split_documents(n_docs: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split by document: (train indices, validation indices), each sorted; both non-empty when n_docs >= 2."""
    if n_docs < 2:
        raise ValueError(f"need at least 2 documents to split train/validation, got {n_docs}")
    order = np.random.default_rng(seed).permutation(n_docs)
    n_valid = min(max(1, round(n_docs * validation_fraction)), n_docs - 1)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


class Packer:
    """Streaming packing into rows of ``seq_len``, in one of two layouts (``data.packing``).

    - ``cls_sep``: [CLS] doc [SEP] [CLS] doc [SEP] ... cut into rows of ``seq_len``.
    - ``wrap`` (BD3-LM's LM1B wrap): every document followed by one ``eos``, the stream cut into pieces of
      ``seq_len - 2`` and each row framed as ``[bos] + piece + [eos]``. BD3-LM gets both ids from
      ``tokenizer.encode(token)[0]``, which for bert-base-uncased is [CLS] for bos *and* eos.

    The tail that does not fill a row is carried into the next ``push``, so the rows do not depend on how the
    documents were chunked; the tail left at the end is dropped.
    """

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, packing: str = "cls_sep") -> None:
        if packing not in ("cls_sep", "wrap"):
            raise ValueError(f"unknown packing {packing!r}; use 'cls_sep' or 'wrap'")
        self.seq_len, self.packing = seq_len, packing
        self._cls, self._sep = np.array([cls_id], dtype=np.int32), np.array([sep_id], dtype=np.int32)
        self._piece = seq_len - 2 if packing == "wrap" else seq_len
        self._tail = np.zeros(0, dtype=np.int32)

    def push(self, docs: Sequence[np.ndarray]) -> np.ndarray:
        """Rows ([n, seq_len] int32) completed by these documents."""
        if self.packing == "wrap":  # BD3-LM: doc + eos, with eos = [CLS] (see the class docstring)
            pieces = [self._tail, *(p for d in docs for p in (np.asarray(d, dtype=np.int32), self._cls))]
        else:
            pieces = [self._tail, *(p for d in docs for p in (self._cls, np.asarray(d, dtype=np.int32), self._sep))]
        stream = np.concatenate(pieces)
        n = len(stream) // self._piece
        self._tail = stream[n * self._piece :]
        rows = stream[: n * self._piece].reshape(n, self._piece)
        if self.packing == "wrap":
            frame = np.broadcast_to(self._cls, (n, 1))
            rows = np.concatenate([frame, rows, frame], axis=1)
        return rows


def pack(docs: Sequence[np.ndarray], seq_len: int, cls_id: int, sep_id: int, packing: str = "cls_sep") -> np.ndarray:
    """All rows of ``docs`` packed in one go (see ``Packer``; the tail is dropped)."""
    return Packer(seq_len, cls_id, sep_id, packing).push(docs)


_LM1B_RULES = (  # LM1B is distributed tokenised ("it 's here , he said ."): rejoin what the tokeniser split
    (re.compile(r"(https?) : / / "), r"\1://"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'m|'d)\b", re.IGNORECASE), r"\1"),
    (re.compile(r" ([.,;:?!%])(?= |$)"), r"\1"),
    (re.compile(r"([$£(\[]) "), r"\1"),
    (re.compile(r" ([)\]])"), r"\1"),
    (re.compile(r'" ([^"]*?) "'), r'"\1"'),
    (re.compile(r" / "), "/"),
)


def lm1b_detokenize(text: str) -> str:
    """Undo LM1B's whitespace tokenisation around punctuation, clitics, brackets, quotes and URLs (``cls_sep``)."""
    for pattern, repl in _LM1B_RULES:
        text = pattern.sub(repl, text)
    return text


_BD3LM_LM1B_RULES = (  # BD3-LM's lm1b_detokenizer, rule for rule and in its order ("n't" stays apart there)
    (re.compile(r"(https?) : / / "), r"\1://"),
    (re.compile(r" '(\w+)"), r"'\1"),
    (re.compile(r" (\w+) \. "), r" \1. "),
    (re.compile(r" (\w+) \.$"), r" \1."),
    (re.compile(r" \? "), "? "),
    (re.compile(r" \?$"), "?"),
    (re.compile(r" ! "), "! "),
    (re.compile(r" !$"), "!"),
    (re.compile(r" , "), ", "),
    (re.compile(r" : "), ": "),
    (re.compile(r" ; "), "; "),
    (re.compile(r" / "), "/"),
    (re.compile(r'" ([^"]+) "'), r'"\1"'),
    (re.compile(r"' ([^']+) '"), r"'\1'"),
    (re.compile(r"\( ([^()]+) \)"), r"(\1)"),
    (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    (re.compile(r"\$ "), "$"),
    (re.compile(r"£ "), "£"),
)


def bd3lm_lm1b_detokenize(text: str) -> str:
    """LM1B clean-up exactly as BD3-LM's ``wrap`` data applies it before tokenising (``data.packing: wrap``)."""
    for pattern, repl in _BD3LM_LM1B_RULES:
        text = pattern.sub(repl, text)
    return text


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
