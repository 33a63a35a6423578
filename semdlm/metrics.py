"""Generation metrics: generative perplexity under a causal evaluator LM ("retokenize" protocol) and
per-sample unigram entropy / distinct-n on the model's own token ids."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class GenPPL:
    ppl: float
    nll: float  # mean nats per scored evaluator token
    tokens: int  # scored evaluator tokens
    per_text_nll: list[float]  # mean nats per token, one per text


def retokenize(texts: Sequence[str], encode: Callable[[str], list[int]], bos_id: int | None, eos_id: int | None,
               context: int) -> list[list[int]]:
    """Evaluator-token chunks of at most ``context`` tokens: [BOS] text [EOS], split into consecutive windows.

    With a BOS every text token is scored (the BOS itself is only conditioned on); the first EOS is scored.
    """
    chunks = []
    for text in texts:
        ids = ([bos_id] if bos_id is not None else []) + encode(text) + ([eos_id] if eos_id is not None else [])
        chunks += [ids[i : i + context] for i in range(0, max(len(ids) - 1, 1), context - 1)]
    return [c for c in chunks if len(c) >= 2]


@torch.no_grad()
def gen_ppl(
    chunks: Sequence[Sequence[int]],
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int,
    pad_id: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> GenPPL:
    """Token-weighted NLL of every chunk's tokens 2..n given the previous ones; PPL = exp(sum NLL / #tokens).

    ``logits_fn(ids [B, T], attention_mask [B, T]) -> logits [B, T, V]`` on any device (the NLL is computed there).
    """
    if not chunks:
        raise ValueError("no text to score: every sample decoded to fewer than 2 evaluator tokens")
    total, count, per_text = 0.0, 0, []
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        T = max(len(c) for c in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(batch), T), dtype=torch.long)
        for i, c in enumerate(batch):
            ids[i, : len(c)] = torch.tensor(c)
            att[i, : len(c)] = 1
        logits = logits_fn(ids, att).float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(logits.device), reduction="none").cpu()
        scored = att[:, 1:].float()
        total += float((nll * scored).sum())
        count += int(scored.sum())
        per_text += ((nll * scored).sum(1) / scored.sum(1)).tolist()
        if on_batch is not None:
            on_batch()
    return GenPPL(math.exp(total / count), total / count, count, per_text)


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the empirical token distribution of one sample."""
    counts = np.array(list(Counter(int(i) for i in ids).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def ngrams(ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over samples."""
    grams = [g for s in samples for g in ngrams(list(s), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(ids: Sequence[int], n: int) -> float:
    """Share of a sample's n-grams that occur more than once in it."""
    grams = ngrams(list(ids), n)
    if not grams:
        return 0.0
    c = Counter(grams)
    return sum(v for v in c.values() if v > 1) / len(grams)


def diversity(samples: Sequence[Sequence[int]]) -> dict[str, float]:
    """Mean per-sample unigram entropy, distinct-1/2/3 and mean repeated-4-gram share."""
    return {
        "entropy": float(np.mean([unigram_entropy(s) for s in samples])),
        "distinct_1": distinct_n(samples, 1),
        "distinct_2": distinct_n(samples, 2),
        "distinct_3": distinct_n(samples, 3),
        "repeated_4gram": float(np.mean([repeated_ngram_share(s, 4) for s in samples])),
    }
