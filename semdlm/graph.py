"""Cosine k-nearest-neighbour table over token embeddings, computed in row chunks (memory O(V * chunk))."""

from __future__ import annotations

import torch


def knn_table(
    emb: torch.Tensor, k: int, chunk_size: int = 1024, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row, the ``k`` most cosine-similar other rows: ([V, k] long ids, [V, k] float sims).

    Self is never a neighbour. Only rows marked valid (``valid[j] == True``; all when ``valid`` is None) are
    candidates, and only they are compared with (memory O(chunk * #valid)); an invalid row still gets valid
    neighbours of its own. Rows are sorted by decreasing similarity.
    """
    V = emb.shape[0]
    cand = torch.arange(V) if valid is None else torch.nonzero(valid.bool()).flatten()
    if not 1 <= k < len(cand):
        raise ValueError(f"k={k} must be in [1, {len(cand) - 1}]: there are {len(cand)} candidate neighbours")
    e = torch.nn.functional.normalize(emb.float(), dim=1)
    ec = e[cand]
    ids = torch.empty(V, k, dtype=torch.long)
    sims = torch.empty(V, k, dtype=torch.float32)
    col_of = torch.full((V,), -1, dtype=torch.long)
    col_of[cand] = torch.arange(len(cand))
    for start in range(0, V, chunk_size):
        stop = min(start + chunk_size, V)
        s = e[start:stop] @ ec.T  # [chunk, #valid]
        rows = torch.arange(start, stop)
        own = col_of[rows]
        s[(own >= 0).nonzero().flatten(), own[own >= 0]] = float("-inf")  # self is no neighbour
        top = torch.topk(s, k, dim=1)
        ids[start:stop], sims[start:stop] = cand[top.indices], top.values
    return ids, sims
