"""Cosine k-nearest-neighbour table over token embeddings, computed in row chunks (memory O(V * chunk))."""

from __future__ import annotations

import torch


def knn_table(
    emb: torch.Tensor, k: int, chunk_size: int = 1024, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row, the ``k`` most cosine-similar other rows: ([V, k] long ids, [V, k] float sims).

    Self is never a neighbour. Rows marked invalid (``valid[j] == False``) are never chosen as neighbours;
    an invalid row still gets neighbours of its own. Rows are sorted by decreasing similarity.
    """
    V = emb.shape[0]
    if not 1 <= k < V:
        raise ValueError(f"k={k} must be in [1, V-1] for V={V} embeddings")
    e = torch.nn.functional.normalize(emb.float(), dim=1)
    ids = torch.empty(V, k, dtype=torch.long)
    sims = torch.empty(V, k, dtype=torch.float32)
    banned = None if valid is None else ~valid.bool()
    for start in range(0, V, chunk_size):
        stop = min(start + chunk_size, V)
        s = e[start:stop] @ e.T  # [chunk, V]
        s[torch.arange(stop - start), torch.arange(start, stop)] = float("-inf")
        if banned is not None:
            s[:, banned] = float("-inf")
        top = torch.topk(s, k, dim=1)
        ids[start:stop], sims[start:stop] = top.indices, top.values
    return ids, sims
