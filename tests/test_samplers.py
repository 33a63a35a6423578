import pytest
import torch

from semdlm.kernels import masking
from semdlm.samplers import ancestral, blockwise, categorical, tau_leaping
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


def test_knn_sampling_needs_the_x0_law_of_its_reference_distribution():
    from tests.test_kernels import kernels

    with pytest.raises(ValueError, match="x0_dist"):
        ancestral(lambda x, t: torch.zeros(*x.shape, 8), kernels()["knn"], 2, 3, 4)


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


@pytest.mark.parametrize("name", ["uniform", "knn", "semdlm_plus"])
def test_ancestral_with_exact_posterior_reproduces_data_for_every_kernel(name):
    from tests.test_kernels import NEIGHBOURS, kernels

    toy = Toy(V=6, L=2, extra=2)  # ids 6, 7 exist in the kernel vocabulary but never in data
    kernel = kernels()[name]
    assert kernel.vocab_size == toy.vocab and NEIGHBOURS.shape[0] == toy.vocab
    gen = torch.Generator().manual_seed(0)
    res = ancestral(toy.denoiser(kernel), kernel, 6000, toy.L, steps=64, generator=gen, x0_dist=toy.token_marginal())
    assert (res.ids < toy.V).all()
    assert empirical_tv(toy, res.ids) < 0.06  # 36 states, 6000 draws: noise alone gives TV ~ 0.03


@pytest.mark.parametrize(("name", "strides"), [("mask", 2), ("uniform", 1), ("semdlm_plus", 1)])
def test_blockwise_with_exact_posterior_and_rho_zero_reproduces_data(name, strides):
    # (strides > 1 is exact only for mask: the exact posterior assumes one noise level for the whole
    # sequence, but a not-yet-denoised stride of a uniform-type kernel is noisier than the current one)
    from tests.test_kernels import kernels

    toy = Toy(V=6, L=2, extra=2)
    kernel = kernels()[name]
    gen = torch.Generator().manual_seed(0)
    res = blockwise(toy.denoiser(kernel), kernel, 6000, toy.L, steps=64, strides=strides, generator=gen,
                    x0_dist=toy.token_marginal())
    assert res.nfe == 64
    assert empirical_tv(toy, res.ids) < 0.06


def test_blockwise_tv_shrinks_with_more_steps():
    from tests.test_kernels import kernels

    toy = Toy(V=6, L=2, extra=2)
    kernel = kernels()["uniform"]
    tv = []
    for steps in (2, 64):
        gen = torch.Generator().manual_seed(0)
        res = blockwise(toy.denoiser(kernel), kernel, 6000, toy.L, steps=steps, strides=1, generator=gen)
        tv.append(empirical_tv(toy, res.ids))
    assert tv[1] < tv[0] - 0.03, tv


def test_blockwise_rejects_strides_that_do_not_divide_the_length():
    from tests.test_kernels import kernels

    with pytest.raises(ValueError, match="strides=3 does not divide seq_len=8"):
        blockwise(lambda x, t: torch.zeros(*x.shape, 8), kernels()["mask"], 1, 8, 6, 3)


def test_top_p_keeps_the_smallest_set_reaching_p():
    from semdlm.samplers import top_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


@pytest.mark.parametrize("name", ["mask", "uniform", "knn", "semdlm_plus"])
def test_tau_leaping_with_exact_posterior_converges_to_data_as_steps_grow(name):
    from tests.test_kernels import kernels

    toy = Toy(V=6, L=2, extra=2)
    kernel = kernels()[name]
    tv = []
    for steps in (4, 128):
        res = tau_leaping(toy.denoiser(kernel), kernel, 6000, toy.L, steps, torch.Generator().manual_seed(0),
                          x0_dist=toy.token_marginal())
        assert res.nfe == steps
        tv.append(empirical_tv(toy, res.ids))
    assert tv[1] < 0.06 and tv[1] < tv[0], tv


@pytest.mark.parametrize("name", ["uniform", "knn", "semdlm_plus"])
def test_tau_leaping_corrector_keeps_the_exact_distribution(name):
    from tests.test_kernels import kernels

    toy = Toy(V=6, L=2, extra=2)
    kernel = kernels()[name]
    res = tau_leaping(toy.denoiser(kernel), kernel, 6000, toy.L, 32, torch.Generator().manual_seed(1),
                      corrector_steps=2, x0_dist=toy.token_marginal())
    assert res.nfe == 32 + 2 * 31  # no corrector after the last step
    assert empirical_tv(toy, res.ids) < 0.06


@pytest.mark.parametrize("name", ["mask", "semdlm_plus"])
def test_blockwise_with_correctors_keeps_the_exact_distribution(name):
    from tests.test_kernels import kernels

    toy = Toy(V=6, L=2, extra=2)
    kernel = kernels()[name]
    res = blockwise(toy.denoiser(kernel), kernel, 6000, toy.L, steps=32, strides=1,
                    generator=torch.Generator().manual_seed(3), x0_dist=toy.token_marginal(), corrector_steps=1)
    assert res.nfe == 32 + 31
    assert empirical_tv(toy, res.ids) < 0.06


def test_truncate_keeps_the_top_k_then_the_nucleus():
    from semdlm.samplers import truncate

    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]], dtype=torch.float64))
    assert torch.isfinite(truncate(logits, top_k=2)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(truncate(logits, top_p=0.6, top_k=3)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(truncate(logits)).all()


def test_cached_ancestral_is_bit_identical_to_plain_with_fewer_network_calls():
    toy = Toy(V=4, L=3)
    kernel = masking(toy.vocab, mask_id=toy.V)
    runs = [ancestral(toy.denoiser(kernel), kernel, 4, toy.L, 64, torch.Generator().manual_seed(5), cache=c)
            for c in (True, False)]
    assert torch.equal(runs[0].ids, runs[1].ids)
    assert runs[1].nfe == 64 and runs[0].nfe <= 12  # 12 positions: at most 12 steps reveal something


@pytest.mark.parametrize("name", ["uniform", "semdlm_plus"])
def test_the_literal_reading_of_eq_121_does_not_converge_but_the_coupling_projection_does(name):
    # docs/samplers.md: replacing x_t^i, w.p. (p_t - p_s) / p_t, by a fresh draw from q_s(. | x^_0) leaves the
    # tokens off the noise level the denoiser is told; the coupling projection (ours) is exact
    from tests.test_kernels import kernels

    toy = Toy(V=6, L=2, extra=2)
    kernel = kernels()[name]
    denoise, n = toy.denoiser(kernel), 6000
    literal, ours = [], []
    for steps in (16, 128):
        gen = torch.Generator().manual_seed(4)
        x = kernel.sample_prior((n, toy.L), toy.token_marginal(), gen)
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        for k in range(steps):
            t, s = float(grid[k]), float(grid[k + 1])
            x0_hat = categorical(denoise(x, torch.full((n,), t)).reshape(n * toy.L, -1), gen).view(n, toy.L)
            fresh = kernel.sample_xt(x0_hat, torch.full((n,), s, dtype=torch.float64), gen)
            x = torch.where(torch.rand(n, toy.L, dtype=torch.float64, generator=gen) < (t - s) / t, fresh, x)
        literal.append(empirical_tv(toy, x))
        ours.append(empirical_tv(toy, blockwise(denoise, kernel, n, toy.L, steps, 1, torch.Generator().manual_seed(4),
                                                x0_dist=toy.token_marginal()).ids))
    assert min(literal) > 0.08 and max(ours) < 0.05, (literal, ours)
