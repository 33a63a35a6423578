import functools

import pytest
import torch

from semdlm.config import SamplerConfig
from semdlm.kernels import masking
from semdlm.samplers import SAMPLERS, categorical, get_sampler
from tests.chain import LatentChain, MarginalChain, MarkovChain
from tests.test_kernels import KERNELS, kernels
from tests.toy import Toy, exact_denoiser, imperfect_denoiser, wrong_where_known


def config(sampler: str = "ancestral", steps: int = 8, **kw) -> SamplerConfig:
    """Sampler settings with one step count; one stride and rho = 0 (the model's exact chain) unless given."""
    return SamplerConfig(name=sampler, steps=steps, **{"strides": 1, "rho": 0.0, **kw})


def sample(sampler: str, denoise, kernel, num: int, seq_len: int, steps: int, latent: bool, seed: int = 0,
           unigram: torch.Tensor | None = None, **kw):
    return get_sampler(sampler)(denoise, kernel, config(sampler, steps, **kw), num, seq_len, latent=latent,
                                generator=torch.Generator().manual_seed(seed), unigram=unigram)


def empirical_tv(toy: Toy, samples: torch.Tensor) -> float:
    counts = torch.bincount(toy.index(samples), minlength=len(toy.p)).double()
    return float(0.5 * (counts / counts.sum() - toy.p).abs().sum())


def test_every_sampler_is_registered_under_its_params_name():
    assert tuple(SAMPLERS) == ("ancestral", "tau_leaping", "blockwise")
    assert all(get_sampler(n).__name__ == n for n in SAMPLERS)
    with pytest.raises(ValueError, match="sampler.name='gibbs' is unknown; choose one of ancestral, tau_leaping"):
        get_sampler("gibbs")


def test_a_sampler_runs_one_step_count():
    with pytest.raises(ValueError, match="one count"):
        get_sampler("ancestral")(lambda x, t, s: torch.zeros(*x.shape, 8), kernels()["mask"],
                                 SamplerConfig(steps=[4, 8]), 2, 2, latent=False)


def test_ancestral_with_exact_posterior_reproduces_the_data_distribution():
    toy = Toy(V=4, L=2)
    kernel = masking(toy.vocab, mask_id=toy.V)
    res = sample("ancestral", toy.denoiser(kernel), kernel, 6000, toy.L, 64, latent=False)
    assert (res.ids < toy.V).all()
    # 16 states, 6000 draws: sampling noise alone gives TV ~ 0.02
    assert empirical_tv(toy, res.ids) < 0.04


def test_knn_sampling_needs_the_x0_law_of_its_reference_distribution():
    with pytest.raises(ValueError, match="unigram"):
        sample("ancestral", lambda x, t, state: torch.zeros(*x.shape, 8), kernels()["knn"], 2, 3, 4, latent=False)


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

    def denoise(x, t, state):
        calls.append(1)
        return torch.zeros(*x.shape, 5)

    res = sample("ancestral", denoise, kernel, 1, 1, 50, latent=False)
    assert res.nfe == len(calls) == 1  # one position is revealed at exactly one step


SIX = Toy(V=6, L=2, extra=2)  # ids 6, 7 exist in the kernel vocabulary but never in data
DRAWS = 20_000  # 36 sequences: sampling noise alone gives TV ~ 0.015


def enumerated(name: str, latent: bool) -> LatentChain | MarginalChain:
    """The chain the samplers draw from: the latent-state model, the Markov chain (mask, uniform) or the
    state-marginalised chain (knn, SemDLM+) of the paper's model."""
    if latent:
        return LatentChain(SIX, kernels()[name], SIX.token_marginal())
    return (MarkovChain if kernels()[name].is_markov else MarginalChain)(SIX, kernels()[name], SIX.token_marginal())


@functools.cache
def model_law(name: str, latent: bool, steps: int) -> torch.Tensor:
    """The exact law of x_0 under the imperfect toy denoiser's T-step chain (tests/chain.py)."""
    return enumerated(name, latent).x0_law(imperfect_denoiser(SIX, kernels()[name], latent), steps)


def law_tv(samples: torch.Tensor, law: torch.Tensor) -> float:
    """TV distance between the samples and a law over the data sequences, whose missing mass is on the others."""
    data = (samples < SIX.V).all(1)
    counts = torch.bincount(SIX.index(samples[data]), minlength=len(law)).double() / len(samples)
    off = 1.0 - float(data.double().mean())
    return 0.5 * (float((counts - law).abs().sum()) + abs(off - (1.0 - float(law.sum()))))


def run_sampler(sampler: str, name: str, latent: bool, denoise, steps: int, seed: int = 0, device: str = "cpu",
                num: int = DRAWS, **kw):
    kernel, gen = kernels()[name].to(device), torch.Generator(device=device).manual_seed(seed)
    return get_sampler(sampler)(denoise, kernel, config(sampler, steps, **kw), num, SIX.L, latent=latent,
                                generator=gen, unigram=SIX.token_marginal().to(device))


@pytest.mark.parametrize("latent", [True, False], ids=["latent", "paper"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))  # every registered sampler
@pytest.mark.parametrize("name", KERNELS)
def test_every_sampler_draws_from_the_chain_that_the_bound_describes(name, sampler, latent):
    # an imperfect denoiser (wrong where it is never trained) drives both the enumerated T-step chain, whose ELBO
    # is the validation bound, and the sampler; blockwise with one stride, rho = 0 and no truncation is that chain
    if sampler == "tau_leaping" and name == "uniform" and not latent:
        pytest.skip("the paper's uniform tau-leaping is Campbell's CTMC, another discretisation (tested below)")
    res = run_sampler(sampler, name, latent, imperfect_denoiser(SIX, kernels()[name], latent), 8)
    assert law_tv(res.ids, model_law(name, latent, 8)) < 0.035


@functools.cache
def exact_law(name: str, steps: int) -> torch.Tensor:
    chain = LatentChain(SIX, kernels()[name], SIX.token_marginal())
    return chain.x0_law(exact_denoiser(SIX, kernels()[name], True), steps)


@pytest.mark.parametrize(("name", "latent"), [(n, True) for n in KERNELS] + [("mask", False)])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_revealed_tokens_are_kept_even_where_the_denoiser_is_wrong(name, sampler, latent):
    # carry-over: the denoiser is exact at corrupted positions and confidently wrong at known-clean ones. knn's
    # latent model cannot reach the data law on this toy (its t = 1 state pins x_0 down through the one-to-one
    # neighbour maps, so the data's correlation is lost at t = 1): it is held to its own exact chain law instead
    steps = 16 if name == "knn" else 64
    res = run_sampler(sampler, name, latent, wrong_where_known(SIX, kernels()[name], latent), steps)
    target = exact_law(name, steps) if name == "knn" else SIX.p
    assert law_tv(res.ids, target) < 0.03


@pytest.mark.parametrize(("name", "strides"), [("mask", 2), ("semdlm_plus", 2), ("uniform", 1)])
def test_latent_blockwise_with_exact_posterior_and_rho_zero_reproduces_data(name, strides):
    # the latent-state model's exact posterior does not depend on t (a state's law cancels), so the not-yet
    # denoised strides at level 1 are no approximation there
    res = run_sampler("blockwise", name, True, exact_denoiser(SIX, kernels()[name], True), 64, num=6000,
                      strides=strides)
    assert res.nfe <= 64
    assert empirical_tv(SIX, res.ids) < 0.06


def test_blockwise_tv_shrinks_with_more_steps():
    kernel = kernels()["uniform"]
    tv = [empirical_tv(SIX, sample("blockwise", SIX.denoiser(kernel), kernel, 6000, SIX.L, steps, False).ids)
          for steps in (2, 64)]
    assert tv[1] < tv[0] - 0.03, tv


def test_eq_121_confidence_factor_accepts_with_probability_one_minus_conf_to_the_rho():
    # the paper's model of uniform: every position proposes a token; a fixed denoiser gives the current token
    # probability c, so a proposal that moves is kept with probability (1 - c)^rho
    kernel, c, n = kernels()["uniform"], 0.6, 20_000

    def denoise(x, t, state):
        other = torch.full((*x.shape, 8), float("-inf")).scatter_(-1, ((x + 1) % 6)[..., None], 0.0)
        return torch.log(c * torch.softmax(torch.full((*x.shape, 8), -1e9).scatter_(-1, x[..., None], 0.0), -1)
                         + (1 - c) * torch.softmax(other, -1))

    moved = []
    for rho in (0.0, 2.0):
        start = kernel.sample_prior((n, 1), SIX.token_marginal(), torch.Generator().manual_seed(7))[0]
        res = sample("blockwise", denoise, kernel, n, 1, 1, False, seed=7, rho=rho)
        moved.append(float((res.ids != start).double().mean()))
        assert res.mean_revisions == pytest.approx(moved[-1])  # one step: a revision is a moved token
    assert moved[0] > 0.3  # x^_0 differs from x_t w.p. 1 - c = 0.4 and the last step takes it
    assert abs(moved[1] / moved[0] - (1 - c) ** 2) < 0.03, moved


def test_frozen_positions_never_change_again():
    # freeze_threshold < 1: once the denoiser's confidence in the current token exceeds it, the token stays
    kernel = kernels()["uniform"]
    seen = []

    def denoise(x, t, state):
        seen.append(x.clone())
        logits = torch.zeros(*x.shape, 8)
        return logits.scatter(-1, x[..., None], torch.where(x[..., None] == 0, 10.0, 0.0))  # sure of token 0

    res = sample("blockwise", denoise, kernel, 2000, 2, 16, False, seed=8, freeze_threshold=0.9)
    first = torch.stack(seen)  # [calls, n, L]
    zero_before = (first == 0).any(0)
    assert zero_before.any()
    assert (res.ids[zero_before] == 0).all()  # every position that showed 0 with confidence > 0.9 kept it


def test_blockwise_rejects_strides_that_do_not_divide_the_length():
    with pytest.raises(ValueError, match="strides=3 does not divide seq_len=8"):
        sample("blockwise", lambda x, t, state: torch.zeros(*x.shape, 8), kernels()["mask"], 1, 8, 6, False,
               strides=3)


def test_top_p_keeps_the_smallest_set_reaching_p():
    from semdlm.samplers import top_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_paper_uniform_tau_leaping_converges_to_data_as_steps_grow():
    kernel = kernels()["uniform"]
    tv = []
    for steps in (4, 128):
        res = sample("tau_leaping", SIX.denoiser(kernel), kernel, 6000, SIX.L, steps, False,
                     unigram=SIX.token_marginal())
        assert res.nfe == steps
        tv.append(empirical_tv(SIX, res.ids))
    assert tv[1] < 0.06 and tv[1] < tv[0], tv


@pytest.mark.parametrize(("name", "latent"), [("uniform", False), ("mask", True), ("semdlm_plus", True),
                                              ("semdlm_plus", False)])
def test_tau_leaping_corrector_keeps_the_exact_distribution(name, latent):
    kernel = kernels()[name]
    res = sample("tau_leaping", exact_denoiser(SIX, kernel, latent), kernel, 6000, SIX.L, 32, latent, seed=1,
                 unigram=SIX.token_marginal(), corrector_steps=2)
    assert res.nfe == 32 + 2 * 31  # no corrector after the last step
    assert empirical_tv(SIX, res.ids) < 0.06


@pytest.mark.parametrize(("name", "latent"), [("mask", True), ("semdlm_plus", True), ("uniform", False),
                                              ("semdlm_plus", False)])
def test_blockwise_with_correctors_keeps_the_exact_distribution(name, latent):
    # the corrector of the Markov chain (uniform) runs q_{t|s} forward, which needs no x_0, and back by its posterior
    kernel = kernels()[name]
    res = sample("blockwise", exact_denoiser(SIX, kernel, latent), kernel, 6000, SIX.L, 32, latent, seed=3,
                 unigram=SIX.token_marginal(), corrector_steps=1)
    assert res.nfe <= 32 + 31
    assert empirical_tv(SIX, res.ids) < 0.06


def test_truncate_keeps_the_top_k_then_the_nucleus():
    from semdlm.samplers import truncate

    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]], dtype=torch.float64))
    assert torch.isfinite(truncate(logits, top_k=2)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(truncate(logits, top_p=0.6, top_k=3)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(truncate(logits)).all()


def test_cached_ancestral_is_bit_identical_to_plain_with_fewer_network_calls():
    toy = Toy(V=4, L=3)
    kernel = masking(toy.vocab, mask_id=toy.V)
    runs = [sample("ancestral", toy.denoiser(kernel), kernel, 4, toy.L, 64, False, seed=5, cache=c)
            for c in (True, False)]
    assert torch.equal(runs[0].ids, runs[1].ids)
    assert runs[1].nfe == 64 and runs[0].nfe <= 12  # 12 positions: at most 12 steps reveal something


@pytest.mark.parametrize("name", ["uniform", "semdlm_plus"])
def test_the_literal_reading_of_eq_121_does_not_converge_but_the_model_step_does(name):
    # docs/samplers.md: sampler.projection replaces x_t^i, w.p. (p_t - p_s) / p_t, by a fresh draw from
    # q_s(. | x^_0), which leaves the tokens off the noise level the denoiser is told; the model's own reverse step
    # (the default) is exact. The exact posterior of the paper's model, rho = 0, one stride
    kernel = kernels()[name]
    literal, ours = [], []
    for steps in (16, 128):
        for projection, out in ((True, literal), (False, ours)):
            res = sample("blockwise", SIX.denoiser(kernel), kernel, 6000, SIX.L, steps, False, seed=4,
                         unigram=SIX.token_marginal(), projection=projection)
            out.append(empirical_tv(SIX, res.ids))
    assert min(literal) > 0.08 and max(ours) < 0.05, (literal, ours)


def test_revisions_count_every_change_of_a_position_after_it_first_held_a_data_token():
    # the paper's model calls the network at every step with the current tokens: recount the changes between calls
    kernel, seen = kernels()["semdlm_plus"], []
    res = sample("ancestral", denoise_recording(SIX.denoiser(kernel), seen), kernel, 500, SIX.L, 8, False,
                 unigram=SIX.token_marginal())
    path = torch.stack([*seen, res.ids])
    torch.testing.assert_close(res.revisions, (path[1:] != path[:-1]).sum(0))
    mask, seen = masking(SIX.vocab, SIX.vocab - 1), []
    res = sample("ancestral", denoise_recording(SIX.denoiser(mask), seen), mask, 500, SIX.L, 8, False, cache=False)
    path = torch.stack([*seen, res.ids])
    held = (path[:-1] != mask.mask_id).cummax(0).values  # a data token was shown before this change
    torch.testing.assert_close(res.revisions, ((path[1:] != path[:-1]) & held).sum(0))


def denoise_recording(denoise, seen: list):
    def recorded(x, t, state):
        seen.append(x.clone())
        return denoise(x, t, state)

    return recorded


@pytest.mark.parametrize("sampler", ["ancestral", "blockwise"])
def test_with_the_exact_posterior_mask_never_revises_and_uniform_and_semdlm_plus_do(sampler):
    revisions = {name: run_sampler(sampler, name, False, SIX.denoiser(kernels()[name]), 16, num=4000).mean_revisions
                 for name in ("mask", "uniform", "semdlm_plus")}
    assert revisions["mask"] == 0.0
    assert revisions["uniform"] > 0.1 and revisions["semdlm_plus"] > 0.1, revisions
