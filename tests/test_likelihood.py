"""Likelihood bounds against the exact NLL of the chain the samplers draw from, on the enumerable toy problem.

tests/chain.py enumerates that chain (the paper's model: the Markov chain of mask and uniform, the state-marginalised
chain of knn and SemDLM+; or ours, the latent-state model) for a given denoiser, and its T-step ELBO with brute-force
dense KL terms; the library's closed forms and Monte-Carlo estimators must agree with it, and the bound must sit
above the chain's NLL (and, where the model has a Markov chain, close to it).
"""

import functools

import pytest
import torch

from semdlm.ctmc import step_kl
from semdlm.kernels import masking
from semdlm.latent import reverse_probs
from semdlm.likelihood import (
    DENOISING,
    ctmc_nelbo,
    ctmc_nelbo_terms,
    denoising_ce,
    estimates,
    latent_bound,
    latent_prior_kl,
    latent_step_kl,
    marginal_bound,
    marginal_prior_kl,
    marginal_step_kl,
    markov_bound,
    validation_estimates,
)
from semdlm.loss import change_aware_loss, stratified_times, time_weight, token_ce
from tests.chain import LatentChain, MarginalChain, MarkovChain, bound, nll
from tests.test_kernels import KERNELS, kernels
from tests.toy import Toy, exact_denoiser, imperfect_denoiser

MARKOV = ["mask", "uniform"]  # the paper's model is the Markov chain in x_t (D3PM / UDLM / Duo; MDLM for mask)
DEFAULT_T = 8  # train.bound_steps of params.yaml
TIGHT = {"mask": 0.05, "uniform": 0.05, "knn": 0.05, "semdlm_plus": 0.15}  # nats/token, the targets
N = 4000


@functools.cache
def toy() -> Toy:
    return Toy(V=6, L=2, extra=2)  # the 8-token kernels of test_kernels; ids 6, 7 never occur in data


def chain(name: str, latent: bool, marginal: bool = False) -> LatentChain | MarginalChain:
    """The chain the samplers draw from in the kernel's model (``marginal``: the state-marginalised chain even for a
    Markov kernel, the one ``marginal_bound`` describes for every kernel)."""
    if latent:
        return LatentChain(toy(), kernels()[name], toy().token_marginal())
    paper = MarkovChain if kernels()[name].is_markov and not marginal else MarginalChain
    return paper(toy(), kernels()[name], toy().token_marginal())


def denoiser(kind: str, name: str, latent: bool):
    return (exact_denoiser if kind == "exact" else imperfect_denoiser)(toy(), kernels()[name], latent)


@functools.cache
def exact(name: str, latent: bool, kind: str, T: int, marginal: bool = False) -> tuple[float, float]:
    """(bound, NLL of the T-step chain), nats per sequence, both enumerated."""
    c, d = chain(name, latent, marginal), denoiser(kind, name, latent)
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
    for T in (4, DEFAULT_T):
        b, n = exact(name, False, kind, T)
        assert b >= n - 1e-9, (T, b, n)


@pytest.mark.parametrize("name", MARKOV)
def test_d3pm_bound_of_the_markov_chain_is_tight_and_tightens_at_every_doubling_of_the_grid(name):
    # the acceptance test: with the exact posterior, D3PM ELBO - NLL of the chain the samplers draw from is
    # at most 0.03 nats/token at T = 8 and smaller at every doubling of T
    gaps = [(lambda b, n: (b - n) / toy().L)(*exact(name, False, "exact", T)) for T in (8, 16, 32, 64)]
    assert gaps[0] <= 0.03, gaps
    assert all(gaps[i + 1] < gaps[i] for i in range(len(gaps) - 1)), gaps


def test_knn_and_semdlm_plus_keep_a_gap_in_the_paper_model():
    # no Markov chain in x_t has Eq. 117's marginals: the state-marginalised bound stays loose (docs/likelihood.md)
    for name in ("knn", "semdlm_plus"):
        b, n = exact(name, False, "exact", DEFAULT_T)
        assert (b - n) / toy().L > 0.2, (name, b, n)


def test_mask_is_one_model_whether_the_denoiser_sees_the_state_or_not():
    for kind in ("exact", "imperfect"):
        latent, paper = exact("mask", True, kind, DEFAULT_T), exact("mask", False, kind, DEFAULT_T)
        assert latent == pytest.approx(paper, abs=1e-9), (latent, paper)


def monte_carlo(fn, name: str, latent: bool, T: int, prior: torch.Tensor, seed: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    x0 = toy().sample(N, gen)
    v = fn(denoiser("imperfect", name, latent), kernels()[name], x0, T, prior, gen) * toy().L
    return float(v.mean()), float(v.std() / len(v) ** 0.5)


@pytest.mark.parametrize("name", MARKOV)
def test_markov_bound_estimator_matches_the_enumerated_bound(name):
    # every term (the stay / x_0 / nu branches of both laws, the reconstruction step, the factor T) is checked here
    prior = marginal_prior_kl(kernels()[name], toy().token_marginal())
    est, se = monte_carlo(markov_bound, name, False, DEFAULT_T, prior, seed=4)
    b, _ = exact(name, False, "imperfect", DEFAULT_T)
    assert abs(est - b) < 4 * se + 0.01, (est, b, se)


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
    b, _ = exact(name, False, "imperfect", 4, marginal=True)
    assert abs(est - b) < 4 * se + 0.01, (est, b, se)


@pytest.mark.parametrize("name", KERNELS)
def test_prior_terms_match_the_dense_kl(name):
    m = toy().token_marginal()
    for latent, fn in ((True, latent_prior_kl), (False, marginal_prior_kl)):
        torch.testing.assert_close(fn(kernels()[name], m)[:6], chain(name, latent).prior())
    assert (marginal_prior_kl(kernels()[name], m) == 0).all() == (name != "knn")  # q_1 = nu but for knn


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


def dense_step_kls(c: MarginalChain, p: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: float,
                   s: float) -> torch.Tensor:
    """KL(truth || model) of one step per position, from the enumerated chain's dense step law ([n])."""
    step = c.step_given_x0(xt, t, s)  # [n, v, y]
    truth, model = step[torch.arange(len(x0)), x0], torch.einsum("nv,nvy->ny", p, step)
    return torch.where(truth > 0, truth * (truth.log() - model.clamp_min(1e-300).log()), 0.0).sum(1)


def random_step(name: str, t: float, seed: int, n: int = 64) -> tuple[torch.Tensor, ...]:
    """x_0, x_t ~ q_t(. | x_0) and a random model law p over the data ids (and [MASK] excluded for mask)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = toy().sample(n // 2, gen).reshape(-1)
    xt = kernels()[name].sample_xt(x0[:, None], torch.full((n,), t, dtype=torch.float64), gen)[:, 0]
    p = torch.softmax(2 * torch.randn(n, toy().vocab, generator=gen, dtype=torch.float64), -1)
    if kernels()[name].is_absorbing:
        p = p.index_fill(1, torch.tensor([kernels()[name].mask_id]), 0.0)
        p = torch.where((xt == kernels()[name].mask_id)[:, None], p, torch.nn.functional.one_hot(xt, toy().vocab))
        p = p / p.sum(1, keepdim=True)
    return x0, xt, p


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize(("t", "s"), [(0.8, 0.3), (0.55, 0.5), (0.125, 0.0), (1.0, 0.875)])
def test_marginal_step_kl_matches_the_dense_state_marginalised_step(name, t, s):
    # the sparse closed form reads both laws on the truth's support only; (0.8, 0.3) crosses jumps of k_t
    x0, xt, p = random_step(name, t, seed=3)
    xt[:8] = torch.arange(8)  # also pairs (x_t, x_0) and (x_t, x_0') where x_t is impossible: the token stays
    times = [torch.full((len(x0),), v, dtype=torch.float64) for v in (t, s)]
    got = marginal_step_kl(kernels()[name], p, x0, xt, *times)
    torch.testing.assert_close(got, dense_step_kls(chain(name, False, marginal=True), p, x0, xt, t, s))


@pytest.mark.parametrize("name", MARKOV)
@pytest.mark.parametrize(("t", "s"), [(0.8, 0.3), (0.55, 0.5), (0.125, 0.0), (1.0, 0.875)])
def test_markov_step_kl_matches_the_dense_kl_of_the_markov_chain(name, t, s):
    x0, xt, p = random_step(name, t, seed=5)
    times = [torch.full((len(x0),), v, dtype=torch.float64) for v in (t, s)]
    got = step_kl(kernels()[name], p, x0, xt, *times)
    torch.testing.assert_close(got, dense_step_kls(chain(name, False), p, x0, xt, t, s))


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


def enumerated_denoising_ce(name: str, latent: bool, grid: int = 400) -> float:
    """E_{t ~ U(0,1)} E mean_i -log p(x_0^i | x_t) of the imperfect denoiser (constrained), by enumerating x_0 and
    x_t (the toy's 36 x 64 pairs, or x_t and state in the latent model) on a midpoint grid of t."""
    kernel, d, L = kernels()[name], denoiser("imperfect", name, latent), toy().L
    c = chain(name, latent)
    states = c.joint  # tokens (paper) or (state, token) pairs (latent) per position
    xt = c.token_of[states] if latent else states
    st = c.state_of[states] if latent else None
    seqs, total = toy().seqs, 0.0
    for t in ((torch.arange(grid, dtype=torch.float64) + 0.5) / grid).tolist():
        logp = torch.log_softmax(kernel.constrain(d(xt, torch.full((len(xt),), t), st), xt, st).double(), -1)
        reach = c.reach(t)  # [vocab, J, L]: q(position i shows J's local state | x_0^i = v)
        prob = torch.stack([reach[seqs[:, i], :, i] for i in range(L)]).prod(0)  # [sequences, J]
        ce = -torch.stack([logp[:, i, seqs[:, i]].T for i in range(L)]).mean(0)  # [sequences, J]
        total += float((toy().p[:, None] * torch.where(prob > 0, prob * ce, 0.0)).sum()) / grid
    return total


@pytest.mark.parametrize(("name", "latent"), [("mask", False), ("uniform", False), ("semdlm_plus", False),
                                              ("semdlm_plus", True)])
def test_denoising_ce_estimator_matches_its_enumerated_value(name, latent):
    # the paper's Table 2 objective (Eq. 3, no time weight) under Kernel.constrain: 0 at carried-over positions
    gen = torch.Generator().manual_seed(6)
    x0 = toy().sample(N, gen)
    v = denoising_ce(denoiser("imperfect", name, latent), kernels()[name], x0, gen, latent)
    est, se = float(v.mean()), float(v.std() / N**0.5)
    want = enumerated_denoising_ce(name, latent)
    assert abs(est - want) < 4 * se + 0.005, (est, want, se)


@pytest.mark.parametrize("latent", [False, True], ids=["paper", "latent"])
@pytest.mark.parametrize("name", KERNELS)
def test_estimates_name_the_primary_bound_first_and_label_what_is_not_a_bound(name, latent):
    kernel = kernels()[name]
    chosen = estimates(kernel, latent, DEFAULT_T, toy().token_marginal())
    keys = [e.key for e in chosen]
    ctmc = ["val_nelbo_ctmc"] if kernel.is_markov and not latent else []
    assert keys == ["val_nelbo", *ctmc, "val_denoising_ce"]
    assert chosen[-1].label == DENOISING and "not a likelihood bound" in DENOISING
    if name in ("knn", "semdlm_plus") and not latent:
        assert "valid, not tight for this kernel" in chosen[0].label
    d, x0 = denoiser("imperfect", name, latent), toy().sample(N, torch.Generator().manual_seed(7))
    values = validation_estimates(d, kernel, x0, N, 1, 0, chosen)
    assert list(values) == keys
    per_sequence = chosen[0].fn(d, kernel, x0, torch.Generator().manual_seed(1)) * toy().L  # validation's seed + 1
    assert values["val_nelbo"] * toy().L == pytest.approx(float(per_sequence.mean()))
    b, _ = exact(name, latent, "imperfect", DEFAULT_T)  # the primary estimate is the bound of the sampled chain
    assert abs(float(per_sequence.mean()) - b) < 4 * float(per_sequence.std()) / N**0.5 + 0.01, (values, b)


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
