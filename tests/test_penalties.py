import math

import pytest
import torch

from semdlm.penalties import penalise, penalty, window_tokens

V = 6
NEIGHBOURS = torch.tensor([[1, 2], [0, 2], [1, 0], [4, 5], [3, 5], [4, 3]])
SIMS = torch.tensor([[0.9, 0.5], [0.9, 0.4], [0.4, 0.5], [0.8, -0.2], [0.8, 0.3], [0.3, -0.2]], dtype=torch.float64)


def test_window_excludes_the_position_itself_and_pads_at_the_edges():
    x = torch.tensor([[10, 11, 12, 13, 14]])
    w = window_tokens(x, torch.tensor([[0, 0], [0, 2]]), window=2)
    assert w.tolist() == [[-1, -1, 11, 12], [10, 11, 13, 14]]


def test_lambda_zero_is_the_identity():
    logits = torch.randn(3, V, dtype=torch.float64)
    window = torch.tensor([[0, 0, 1], [2, -1, -1], [3, 3, 3]])
    assert torch.equal(penalise(logits, window, 0.0, 0.0, NEIGHBOURS, SIMS), logits)


def test_penalties_match_hand_computed_logits():
    logits = torch.zeros(1, V, dtype=torch.float64)
    window = torch.tensor([[0, 0, 3, -1]])  # n(0) = 2, n(3) = 1
    out = penalise(logits, window, lambda_freq=1.0, lambda_sem=2.0, neighbours=NEIGHBOURS, sims=SIMS)
    # m(k) = sum_l S+(k, l) n(l): token 0 spreads 0.9 to id 1 and 0.5 to id 2 (twice); token 3 gives 0.8 to 4;
    # S+(k, k) = 1 adds each window token's own count: m(0) = 2, m(3) = 1
    m = torch.tensor([2.0, 1.8, 1.0, 1.0, 0.8, 0.0], dtype=torch.float64)  # S+(5, 3) = max(0, -0.2) = 0
    n = torch.tensor([2.0, 0, 0, 1, 0, 0], dtype=torch.float64)
    expected = -torch.log1p(n) - 2.0 * torch.log1p(m)
    torch.testing.assert_close(out[0], expected)
    assert math.isclose(float(out[0, 1]), -2 * math.log(2.8))


def test_larger_lambda_sem_lowers_neighbours_of_repeated_tokens():
    logits = torch.zeros(1, V, dtype=torch.float64)
    window = torch.tensor([[0, 0, 0, 0]])
    probs = [torch.softmax(penalise(logits, window, 0.0, lam, NEIGHBOURS, SIMS), -1)[0] for lam in (0.0, 0.5, 2.0)]
    assert probs[0][1] > probs[1][1] > probs[2][1]  # id 1 is token 0's nearest neighbour
    assert probs[2][3] > probs[0][3]  # unrelated ids gain the mass


def test_semantic_penalty_needs_the_neighbour_table():
    with pytest.raises(ValueError, match="neighbour table"):
        penalise(torch.zeros(1, V), torch.tensor([[0]]), 0.0, 1.0)


def test_penalty_transform_is_eq23_on_the_window_and_none_when_off():
    assert penalty(0.0, 0.0, 4) is None
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (2, 7), generator=gen)
    pos = torch.tensor([[0, 0], [1, 3], [1, 6]])
    logits = torch.randn(3, V, generator=gen)  # float32 in, float64 out
    got = penalty(0.5, 1.5, 2, NEIGHBOURS, SIMS)(logits, x, pos)
    assert got.dtype == torch.float64
    want = penalise(logits.double(), window_tokens(x, pos, 2), 0.5, 1.5, NEIGHBOURS, SIMS)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_penalties_make_every_tensor_on_the_device_of_their_inputs():
    """On the meta device a tensor made on the CPU would meet the inputs and raise: every one follows them."""
    meta = torch.device("meta")
    x = torch.zeros(2, 7, dtype=torch.long, device=meta)
    pos = torch.zeros(3, 2, dtype=torch.long, device=meta)
    nb, sims = NEIGHBOURS.to(meta), SIMS.to(meta)
    out = penalty(0.5, 1.5, 2, nb, sims)(torch.zeros(3, V, device=meta), x, pos)
    assert out.device == meta and out.shape == (3, V) and out.dtype == torch.float64
