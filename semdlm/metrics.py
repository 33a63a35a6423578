"""Generation metrics: generative perplexity under a causal evaluator LM, per-sample unigram entropy / distinct-n on
the model's own token ids, and semantic repetition (Sec. 4.1's basin signature) on them and the graph's table.

Two gen PPL protocols (docs/evaluation.md): ``mdlm`` reproduces MDLM's ``compute_generative_perplexity`` (no BOS,
truncation to the model length, right padding with EOS, every non-EOS token and the first EOS scored);
``windows`` scores ``[BOS] text [EOS]`` in windows of the evaluator context.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from semdlm.penalties import window_tokens


@dataclass
class GenPPL:
    ppl: float
    nll: float  # mean nats per scored evaluator token
    tokens: int  # scored evaluator tokens
    per_text_nll: list[float]  # mean nats per token, one per text


def retokenize(texts: Sequence[str], encode: Callable[[str], list[int]], bos_id: int | None, eos_id: int | None,
               context: int) -> list[list[int]]:
    """``windows`` protocol: chunks of at most ``context`` tokens of [BOS] text [EOS], in consecutive windows.

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
    """``windows`` protocol: token-weighted NLL of every chunk's tokens 2..n given the previous ones;
    PPL = exp(sum NLL / #tokens). ``logits_fn(ids [B, T], attention_mask [B, T]) -> logits [B, T, V]``.
    """
    if not chunks:
        raise ValueError("no text to score: every sample decoded to fewer than 2 evaluator tokens")
    total, count, per_text = 0.0, 0, []
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        ids, att = right_pad(batch, max(len(c) for c in batch), pad_id)
        scored = att[:, 1:].float()
        nll = (target_nll(logits_fn, ids, att) * scored).sum(1)
        total += float(nll.sum())
        count += int(scored.sum())
        per_text += (nll / scored.sum(1)).tolist()
        if on_batch is not None:
            on_batch()
    return GenPPL(math.exp(total / count), total / count, count, per_text)


def right_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows cut to ``length`` and right-padded with ``pad_id``: (ids [N, length], attention mask [N, length])."""
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        r = list(r)[:length]
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        att[i, : len(r)] = 1
    return ids, att


def target_nll(logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ids: torch.Tensor,
               att: torch.Tensor) -> torch.Tensor:
    """[B, T-1] NLL (nats, float32 or wider) of ids[:, 1:] given the prefix, unweighted, on the CPU; the logits
    may come from any device (the evaluator's), where the NLL is computed."""
    logits = logits_fn(ids, att).float()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(logits.device), reduction="none").cpu()


def mdlm_rows(encoded: Sequence[Sequence[int]], max_length: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MDLM's ``eval_retokenize``: each text's evaluator ids (the tokenizer's default special tokens, so no BOS for
    GPT-2) truncated to ``max_length`` (the diffusion model's length) and right-padded with EOS (GPT-2 has no pad
    token; MDLM sets pad = EOS) to the longest row of the set: (ids [N, T], attention mask [N, T])."""
    if not encoded:
        raise ValueError("no text to score")
    return right_pad(encoded, min(max_length, max(len(e) for e in encoded)), eos_id)


def mdlm_weights(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """MDLM's scored targets [N, T-1]: every non-EOS token, and the row's first EOS ((EOS count so far == 1) or
    not EOS). So a text shorter than the padded length is also scored on ending (its first pad is an EOS); a text
    cut at ``max_length`` is not; later EOS (padding) never is. The first token is never a target (no BOS)."""
    is_eos = ids == eos_id
    return ((is_eos.cumsum(-1) == 1) | ~is_eos)[:, 1:]


@torch.no_grad()
def gen_ppl_mdlm(
    ids: torch.Tensor,
    att: torch.Tensor,
    eos_id: int,
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int,
    context: int = 1024,
    on_batch: Callable[[], None] | None = None,
) -> GenPPL:
    """MDLM's ``compute_generative_perplexity`` on ``mdlm_rows``: batches of ``batch_size`` rows, each split into
    pieces of ``context`` evaluator positions scored independently; PPL = exp(sum NLL * w / sum w) with
    w = ``mdlm_weights`` of the piece. (MDLM drops the last ``N mod batch_size`` rows; every row is scored here.)"""
    per_nll, per_count = torch.zeros(len(ids), dtype=torch.float64), torch.zeros(len(ids), dtype=torch.float64)
    for start in range(0, len(ids), batch_size):
        rows = slice(start, start + batch_size)
        for piece, piece_att in zip(ids[rows].split(context, -1), att[rows].split(context, -1), strict=True):
            w = mdlm_weights(piece, eos_id)
            nll = torch.where(w, target_nll(logits_fn, piece, piece_att).double(), 0.0)  # an all-pad piece may be NaN
            per_nll[rows] += nll.sum(1)
            per_count[rows] += w.sum(1)
        if on_batch is not None:
            on_batch()
    total, count = float(per_nll.sum()), int(per_count.sum())
    if count == 0:
        raise ValueError("no evaluator token to score: every text is a single token")
    return GenPPL(math.exp(total / count), total / count, count, (per_nll / per_count.clamp(min=1)).tolist())


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


def semantic_repetition(ids: torch.Tensor, neighbours: torch.Tensor, k: int, window: int,
                        rows_per_chunk: int = 256) -> float:
    """Share of tokens that have themselves or one of their first ``k`` nearest neighbours (``neighbours``: the
    graph's [V, k_max] table) elsewhere within ``window`` positions on either side, pooled over the samples
    (``ids`` [N, L]): the semantic basin signature of Sec. 4.1 (Table 1's "bone bone bone ... dies"). O(N L window
    k), chunked by rows."""
    hits, total = 0, 0
    near = neighbours[:, :k].to(ids.device)
    for rows in ids.split(rows_per_chunk):
        B, L = rows.shape
        at = torch.stack(torch.meshgrid(torch.arange(B, device=ids.device), torch.arange(L, device=ids.device),
                                        indexing="ij"), -1).reshape(-1, 2)
        around = window_tokens(rows, at, window)  # [B L, 2 window], -1 = outside the sample
        own = rows.reshape(-1)
        similar = torch.cat([own[:, None], near[own]], 1)  # the token and its k neighbours
        hit = (around[:, :, None] == similar[:, None, :]).any(2).any(1)
        hits, total = hits + int(hit.sum()), total + len(own)
    return hits / total if total else 0.0
