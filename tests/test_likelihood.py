"""Likelihood bounds against the exact NLL of the chain the samplers draw from, on the enumerable toy problem.

tests/chain.py enumerates that chain (the latent-state model, or the paper's model) for a given denoiser, and
its T-step ELBO with brute-force dense KL terms; the library's closed forms and Monte-Carlo estimators must
agree with it, and the bound must sit above the chain's NLL and close to it.
"""

import functools

import pytest
import torch

from semdlm.kernels import masking
from semdlm.latent import reverse_probs
from semdlm.likelihood import (
    ctmc_nelbo,
    ctmc_nelbo_terms,
    latent_bound,
    latent_prior_kl,
    latent_step_kl,
    marginal_bound,
    marginal_prior_kl,
    step_law,
)
from semdlm.loss import change_aware_loss, stratified_times, time_weight, token_ce
from tests.chain import LatentChain, MarginalChain, bound, nll
from tests.test_kernels import kernels
from tests.toy import Toy, exact_denoiser, imperfect_denoiser

KERNELS = ["mask", "uniform", "knn", "semdlm_plus"]
DEFAULT_T = 8  # train.bound_steps of params.yaml
TIGHT = {"mask": 0.05, "uniform": 0.05, "knn": 0.05, "semdlm_plus": 0.15}  # nats/token, the targets
N = 4000


@functools.cache
def toy() -> Toy:
    return Toy(V=6, L=2, extra=2)  # the 8-token kernels of test_kernels; ids 6, 7 never occur in data


def chain(name: str, latent: bool) -> LatentChain | MarginalChain:
    return (LatentChain if latent else MarginalChain)(toy(), kernels()[name], toy().token_marginal())


def denoiser(kind: str, name: str, latent: bool):
    return (exact_denoiser if kind == "exact" else imperfect_denoiser)(toy(), kernels()[name], latent)


@functools.cache
def exact(name: str, latent: bool, kind: str, T: int) -> tuple[float, float]:
    """(bound, NLL of the T-step chain), nats per sequence, both enumerated."""
    c, d = chain(name, latent), denoiser(kind, name, latent)
    return bound(c, d, T), nll(toy(), c.x0_law(d, T))


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("kind", ["exact", "imperfect"])
def test_latent_bound_is_at_least_the_nll_of_the_sampled_chain(name, kind):
    b, n = exact(name, True, kind, DEFAULT_T)
    assert b >= n - 1e-9, (b, n)


@pytest.mark.parametrize("name", KERNELS)
def test_latent_bound_with_the_exact_posterior_is_tight_and_tightens_with_the_grid(name):
    gaps = []
    for T in (DEFAULT_T, 2 * DEFAULT_T):
        b, n = exact(name, True, "exact", T)
        gaps.append((b - n) / toy().L)
    assert gaps[0] <= TIGHT[name], gaps
    assert gaps[1] <= gaps[0] + 1e-9, gaps  # doubling bound_steps does not loosen it


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("kind", ["exact", "imperfect"])
def test_paper_model_bound_is_at_least_the_nll_of_its_sampled_chain(name, kind):
    b, n = exact(name, False, kind, 4)
    assert b >= n - 1e-9, (b, n)


def monte_carlo(fn, name: str, latent: bool, T: int, prior: torch.Tensor, seed: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    x0 = toy().sample(N, gen)
    v = fn(denoiser("imperfect", name, latent), kernels()[name], x0, T, prior, gen) * toy().L
    return float(v.mean()), float(v.std() / len(v) ** 0.5)


@pytest.mark.parametrize("name", KERNELS)
def test_latent_bound_estimator_matches_the_enumerated_bound(name):
    # every term (prior KL, each entered state's cost, the factor T) is checked here: removing or scaling one
    # moves the estimate away from the brute-force value by far more than its Monte-Carlo error
    prior = latent_prior_kl(kernels()[name], toy().token_marginal())
    est, se = monte_carlo(latent_bound, name, True, DEFAULT_T, prior, seed=0)
    b, _ = exact(name, True, "imperfect", DEFAULT_T)
    assert abs(est - b) < 4 * se + 0.01, (est, b, se)


@pytest.mark.parametrize("name", KERNELS)
def test_marginal_bound_estimator_matches_the_enumerated_bound(name):
    prior = marginal_prior_kl(kernels()[name], toy().token_marginal())
    est, se = monte_carlo(marginal_bound, name, False, 4, prior, seed=1)
    b, _ = exact(name, False, "imperfect", 4)
    assert abs(est - b) < 4 * se + 0.01, (est, b, se)


@pytest.mark.parametrize("name", KERNELS)
def test_prior_terms_match_the_dense_kl(name):
    m = toy().token_marginal()
    for latent, fn in ((True, latent_prior_kl), (False, marginal_prior_kl)):
        torch.testing.assert_close(fn(kernels()[name], m)[:6], chain(name, latent).prior())


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize(("t", "s"), [(0.8, 0.3), (0.55, 0.5), (1.0, 0.875), (0.125, 0.0)])
def test_latent_step_kl_matches_the_dense_kl_of_every_position(name, t, s):
    kernel, c = kernels()[name], chain(name, True)
    gen = torch.Generator().manual_seed(2)
    x0 = toy().sample(64, gen)
    xt, state = kernel.corrupt(x0, torch.full((64,), t, dtype=torch.float64), gen)
    logits = kernel.constrain(torch.randn(64, toy().L, toy().vocab, generator=gen, dtype=torch.float64), xt, state)
    logp = torch.log_softmax(logits, -1)
    R = reverse_probs(kernel, t, s)[0]
    closed = latent_step_kl(kernel, logp, x0, state, R[state])
    local = state * toy().vocab + xt
    for i in range(toy().L):
        model = c.moves(logp[:, i].exp(), local[:, i], R)
        truth = c.moves(torch.nn.functional.one_hot(x0[:, i], toy().vocab).double(), local[:, i], R)
        dense = torch.where(truth > 0, truth * (truth.log() - model.clamp_min(1e-300).log()), 0.0).sum(1)
        torch.testing.assert_close(closed[:, i], dense)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize(("t", "s"), [(0.8, 0.3), (0.55, 0.5), (0.125, 0.0)])
def test_step_law_matches_the_dense_state_marginalised_step(name, t, s):
    kernel, c = kernels()[name], chain(name, False)
    gen = torch.Generator().manual_seed(3)
    xt = torch.randint(0, toy().vocab, (32,), generator=gen)
    p = torch.softmax(torch.randn(32, toy().vocab, generator=gen, dtype=torch.float64), -1)
    R = reverse_probs(kernel, t, s)[0].expand(32, -1, -1)
    m_t = kernel.state_probs(torch.full((32,), t, dtype=torch.float64))
    dense = torch.einsum("nv,nvy->ny", p, c.step_given_x0(xt, t, s))
    torch.testing.assert_close(step_law(kernel, p, xt, R, m_t), dense)


def test_bounds_of_a_wrong_denoiser_are_far_above_the_data_entropy():
    guess = lambda xt, t, state: torch.zeros(*xt.shape, toy().vocab)  # noqa: E731 - uniform prediction
    for name in ("mask", "semdlm_plus"):
        kernel = kernels()[name]
        gen = torch.Generator().manual_seed(0)
        x0 = toy().sample(N, gen)
        v = latent_bound(guess, kernel, x0, 4, latent_prior_kl(kernel, toy().token_marginal()), gen)
        assert float(v.mean()) * toy().L > toy().entropy() + 0.3


@pytest.mark.parametrize("name", ["mask", "uniform"])
def test_ctmc_nelbo_with_exact_posterior_is_at_least_and_close_to_true_nll(name):
    kernel = kernels()[name]
    gen = torch.Generator().manual_seed(0)
    x0 = toy().sample(N, gen)
    v = ctmc_nelbo(toy().denoiser(kernel), kernel, x0, stratified_times(N, 0.0, gen), gen) * toy().L
    nelbo, se, H = float(v.mean()), float(v.std() / N**0.5), toy().entropy()
    # with the exact reverse process the path KL vanishes: NELBO = NLL (up to Monte-Carlo error)
    assert nelbo >= H - 4 * se, (nelbo, H, se)
    assert abs(nelbo - H) < 4 * se + 0.05, (nelbo, H, se)


def test_change_aware_loss_with_unit_weights_is_the_mask_ctmc_nelbo():
    torch.manual_seed(0)
    kernel = masking(6, mask_id=5)
    x0 = torch.randint(0, 5, (8, 10))
    t = torch.rand(8, dtype=torch.float64) * 0.98 + 0.01
    xt, state = kernel.corrupt(x0, t)
    logits = kernel.constrain(torch.randn(8, 10, 6), xt, None)
    ce = token_ce(logits, x0, kernel, xt, None)
    loss = change_aware_loss(ce, x0, xt, time_weight(kernel, t), 1.0, 1.0)
    nelbo = ctmc_nelbo_terms(logits, x0, xt, kernel, t).mean()  # the general CTMC formula, written separately
    torch.testing.assert_close(loss.double(), nelbo, rtol=1e-5, atol=1e-6)
    other = change_aware_loss(ce, x0, xt, time_weight(kernel, t), 1.0, 0.0)  # lambda_same = 0: not the NELBO
    assert not torch.isclose(other.double(), nelbo)


def test_stratified_times_cover_the_interval_evenly():
    t = stratified_times(100, 0.01, torch.Generator().manual_seed(3))
    assert t.min() >= 0.01 and t.max() <= 1.0
    counts = torch.histc(t.float(), bins=10, min=0.01, max=1.0)
    assert counts.min() >= 9 and counts.max() <= 11
