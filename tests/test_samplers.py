import pytest
import torch

from semdlm.kernels import masking, uniform
from semdlm.samplers import ancestral, categorical
from tests.toy import Toy


def empirical_tv(toy: Toy, samples: torch.Tensor) -> float:
    counts = torch.bincount(toy.index(samples), minlength=len(toy.p)).double()
    return float(0.5 * (counts / counts.sum() - toy.p).abs().sum())


def test_ancestral_with_exact_posterior_reproduces_the_data_distribution():
    toy = Toy(V=4, L=2)
    kernel = masking(toy.vocab, mask_id=toy.V)
    res = ancestral(toy.denoiser(kernel), kernel, 6000, toy.L, steps=64, generator=torch.Generator().manual_seed(0))
    assert (res.ids < toy.V).all()
    # 16 states, 6000 draws: sampling noise alone gives TV ~ 0.02
    assert empirical_tv(toy, res.ids) < 0.04


def test_ancestral_refuses_a_non_absorbing_kernel():
    with pytest.raises(ValueError, match="absorbing"):
        ancestral(lambda x, t: x, uniform(torch.ones(5, dtype=torch.bool)), 2, 3, 4)


def test_categorical_draws_in_float64_keep_tiny_tail_probabilities():
    # each tail token has p = 2.5e-8: a float32 CDF near 1 cannot resolve it and would never draw the tail
    logits = torch.zeros(1, 100_001, dtype=torch.float64)
    logits[0, 0] = 17.5
    p_tail = float(torch.softmax(logits, -1)[0, 1:].sum())  # about 2.5e-3
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([categorical(logits.expand(100, -1), gen) for _ in range(40)])
    tail = int((draws != 0).sum())  # expected 4000 * p_tail = 10
    assert 2 <= tail <= 25, (tail, p_tail)


def test_ancestral_skips_the_network_when_nothing_is_revealed():
    calls = []
    kernel = masking(5, mask_id=4)

    def denoise(x, t):
        calls.append(1)
        return torch.zeros(*x.shape, 5)

    res = ancestral(denoise, kernel, 1, 1, steps=50, generator=torch.Generator().manual_seed(0))
    assert res.nfe == len(calls) == 1  # one position is revealed at exactly one step
