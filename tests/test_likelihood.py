import pytest
import torch

from semdlm.kernels import masking
from semdlm.likelihood import coupling_bound, ctmc_nelbo, ctmc_nelbo_terms, prior_kl
from semdlm.loss import change_aware_loss, stratified_times, time_weight, token_ce
from tests.test_kernels import kernels
from tests.toy import Toy

N = 4000


def toy_and_prior():
    toy = Toy(V=6, L=2, extra=2)  # the 8-token kernels of test_kernels; ids 6, 7 never occur in data
    return toy, toy.token_marginal()


def estimate(per_seq: torch.Tensor, L: int) -> tuple[float, float]:
    v = per_seq * L  # nats per sequence
    return float(v.mean()), float(v.std() / len(v) ** 0.5)


@pytest.mark.parametrize("name", ["mask", "uniform"])
def test_ctmc_nelbo_with_exact_posterior_is_at_least_and_close_to_true_nll(name):
    toy, _ = toy_and_prior()
    kernel = kernels()[name]
    gen = torch.Generator().manual_seed(0)
    x0 = toy.sample(N, gen)
    nelbo, se = estimate(ctmc_nelbo(toy.denoiser(kernel), kernel, x0, stratified_times(N, 0.0, gen), gen), toy.L)
    H = toy.entropy()
    # with the exact reverse process the path KL vanishes: NELBO = NLL (up to Monte-Carlo error)
    assert nelbo >= H - 4 * se, (nelbo, H, se)
    assert abs(nelbo - H) < 4 * se + 0.05, (nelbo, H, se)


@pytest.mark.parametrize("name", ["mask", "uniform", "knn", "semdlm_plus"])
@pytest.mark.parametrize("T", [1, 8])
def test_coupling_bound_with_exact_posterior_is_at_least_true_nll(name, T):
    toy, m = toy_and_prior()
    kernel = kernels()[name]
    gen = torch.Generator().manual_seed(0)
    x0 = toy.sample(N, gen)
    bound, se = estimate(coupling_bound(toy.denoiser(kernel), kernel, x0, T, prior_kl(kernel, m), gen), toy.L)
    assert bound >= toy.entropy() - 4 * se, (bound, toy.entropy(), se)


def test_coupling_bound_of_the_absorbing_kernel_is_close_to_true_nll():
    toy, m = toy_and_prior()
    kernel = kernels()["mask"]
    gen = torch.Generator().manual_seed(1)
    x0 = toy.sample(N, gen)
    bound, se = estimate(coupling_bound(toy.denoiser(kernel), kernel, x0, 16, prior_kl(kernel, m), gen), toy.L)
    assert abs(bound - toy.entropy()) < 4 * se + 0.05  # discrete-time MDLM bound, no corruption ambiguity


def test_bounds_of_a_wrong_denoiser_are_above_true_nll():
    toy, m = toy_and_prior()
    guess = lambda xt, t: torch.zeros(*xt.shape, toy.vocab)  # noqa: E731 - uniform prediction
    for name in ("mask", "semdlm_plus"):
        kernel = kernels()[name]
        gen = torch.Generator().manual_seed(0)
        x0 = toy.sample(N, gen)
        bound, _ = estimate(coupling_bound(guess, kernel, x0, 4, prior_kl(kernel, m), gen), toy.L)
        assert bound > toy.entropy() + 0.3


def test_change_aware_loss_with_unit_weights_is_the_mask_ctmc_nelbo():
    torch.manual_seed(0)
    kernel = masking(6, mask_id=5)
    x0 = torch.randint(0, 5, (8, 10))
    t = torch.rand(8, dtype=torch.float64) * 0.98 + 0.01
    xt = kernel.sample_xt(x0, t)
    logits = torch.randn(8, 10, 6)
    logits[..., 5] = float("-inf")
    ce = token_ce(logits, x0, xt != kernel.mask_id)
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
