import torch

from semdlm.graph import knn_table


def brute_force(emb: torch.Tensor, k: int) -> torch.Tensor:
    e = torch.nn.functional.normalize(emb, dim=1)
    s = e @ e.T
    s.fill_diagonal_(float("-inf"))
    return torch.topk(s, k, dim=1).indices


def test_chunked_knn_matches_brute_force_cosine():
    emb = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    ids, sims = knn_table(emb, k=7, chunk_size=64)
    assert torch.equal(ids, brute_force(emb, 7))
    e = torch.nn.functional.normalize(emb, dim=1)
    torch.testing.assert_close(sims, (e[:, None] * e[ids]).sum(-1))
    assert (sims[:, :-1] >= sims[:, 1:]).all()


def test_self_is_never_a_neighbour_even_with_duplicate_rows():
    emb = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    emb[10] = emb[11]
    ids, _ = knn_table(emb, k=5, chunk_size=7)
    assert not (ids == torch.arange(50)[:, None]).any()
    assert ids[10, 0] == 11


def test_banned_rows_are_never_neighbours():
    emb = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(40, dtype=torch.bool)
    valid[:5] = False
    ids, _ = knn_table(emb, k=6, chunk_size=16, valid=valid)
    assert (ids >= 5).all()


def test_memory_is_chunk_by_v_not_v_by_v():
    V, chunk = 4000, 256
    emb = torch.randn(V, 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        knn_table(emb, k=8, chunk_size=chunk)
    largest = max(e.cpu_memory_usage for e in prof.events() if e.name == "aten::mm")
    assert largest <= chunk * V * 4, f"one similarity block took {largest} bytes"
    assert largest < V * V * 4 // 4
