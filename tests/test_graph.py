import numpy as np
import pytest
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


def test_neighbours_are_the_nearest_valid_rows_only():
    emb = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(40, dtype=torch.bool)
    valid[:5] = False
    valid[17] = False
    ids, _ = knn_table(emb, k=6, chunk_size=16, valid=valid)
    e = torch.nn.functional.normalize(emb, dim=1)
    s = e @ e.T
    s.fill_diagonal_(float("-inf"))
    s[:, ~valid] = float("-inf")
    assert torch.equal(ids, torch.topk(s, 6, dim=1).indices)


def test_fewer_valid_rows_than_k_plus_one_is_an_error():
    with pytest.raises(ValueError, match="k=4 must be in"):
        knn_table(torch.randn(10, 4), k=4, valid=torch.arange(10) < 4)


@pytest.mark.parametrize("vocab", ["compact", "full"])
def test_graph_stage_never_names_an_unused_or_unseen_id_as_a_neighbour(tmp_path, monkeypatch, vocab):
    from pipeline import graph, prior, tokenize
    from pipeline.artifacts import load_graph, load_prior, load_vocab
    from semdlm.config import load_params
    from tests.tiny import write_params

    write_params(tmp_path / "params.yaml", tmp_path / "unused-evaluator", data={"vocab": vocab})
    monkeypatch.chdir(tmp_path)
    p = load_params()
    tokenize.run(p.data)
    prior.run(p.prior)
    graph.run(p.graph)
    neighbours, tokens = load_graph()[0].numpy(), np.array(load_vocab().tokens)
    pr = load_prior()
    used = np.unique(neighbours)
    assert pr["valid"].numpy()[used].all() and (pr["count"].numpy()[used] >= p.prior.min_count).all()
    assert not any(t.startswith(("[unused", "[", "##")) for t in tokens[used])
    if vocab == "full":  # the graph covers every id, unused ones included, but only as a source
        assert len(neighbours) == 30522 and any(t.startswith("[unused") for t in tokens)


def test_memory_is_chunk_by_v_not_v_by_v():
    V, chunk = 4000, 256
    emb = torch.randn(V, 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        knn_table(emb, k=8, chunk_size=chunk)
    largest = max(e.cpu_memory_usage for e in prof.events() if e.name == "aten::mm")
    assert largest <= chunk * V * 4, f"one similarity block took {largest} bytes"
    assert largest < V * V * 4 // 4
