import pytest
import torch

from semdlm.dispersion import (
    ReverseNeighbours,
    between_t_variance,
    dispersion,
    latent_posterior_entropy,
    mean_posterior_entropy,
    midpoint_times,
    posterior_entropy,
)
from tests.test_kernels import NEIGHBOURS, V, kernels
from tests.toy import local_likelihood

M = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.1, 0.05, 0.0, 0.0], dtype=torch.float64)  # token prior, 0 on specials


def bayes_entropy(kernel, j: int, t: float) -> float:
    """H(q(x_0 | x_t = j)) by Bayes' rule on the dense V x V transition matrix (fine for a toy V)."""
    Q = kernel.probs(torch.arange(V), t)  # [x_0, x_t]
    post = M * Q[:, j]
    post = post / post.sum()
    return float(-torch.special.xlogy(post, post).sum())


@pytest.mark.parametrize("name", ["mask", "uniform", "knn", "semdlm_plus"])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.93])
def test_posterior_entropy_matches_bayes_on_the_dense_matrix(name, t):
    kernel = kernels()[name]
    Q = kernel.probs(torch.arange(6), t)
    reachable = [j for j in range(V) if float((M[:6] * Q[:, j]).sum()) > 0]
    got = posterior_entropy(kernel, M, torch.tensor(reachable), t)
    want = torch.tensor([bayes_entropy(kernel, j, t) for j in reachable], dtype=torch.float64)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["mask", "uniform", "knn", "semdlm_plus"])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.93])
def test_latent_posterior_entropy_matches_bayes_on_state_and_token(name, t):
    # the latent-state model's posterior q(x_0 | x_t, state) ∝ m(v) q(state, x_t | v), written densely
    kernel = kernels()[name]
    gen = torch.Generator().manual_seed(1)
    x0 = torch.multinomial(M, 400, replacement=True, generator=gen).view(20, 20)
    xt, state = kernel.corrupt(x0, torch.full((20,), t, dtype=torch.float64), gen)
    post = M * local_likelihood(kernel, state.reshape(-1), xt.reshape(-1), t)
    post = post / post.sum(1, keepdim=True)
    want = -torch.special.xlogy(post, post).sum(1)
    torch.testing.assert_close(latent_posterior_entropy(kernel, M, xt, state), want)
    assert mean_posterior_entropy(kernel, M, xt, t, state) == pytest.approx(float(want.mean()))


def test_reverse_neighbours_are_the_transposed_table():
    for k in (1, 3, 4):
        dense = torch.zeros(V, V, dtype=torch.float64)  # dense[j, v] = 1 if j in N_k(v)
        for v in range(V):
            dense[NEIGHBOURS[v, :k], v] += 1
        got = ReverseNeighbours(NEIGHBOURS, k).indicator(torch.tensor([0, 5, 3, 0, 7]), V)
        torch.testing.assert_close(got, dense[[0, 5, 3, 0, 7]])


def test_mask_trajectory_is_one_minus_alpha_times_prior_entropy():
    kernel = kernels()["mask"]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.multinomial(M, 20000, replacement=True, generator=gen).view(100, 200)
    h_m = float(-torch.special.xlogy(M, M).sum())
    for t in (0.2, 0.7):
        xt = kernel.sample_xt(x0, torch.full((100,), t, dtype=torch.float64), gen)
        assert mean_posterior_entropy(kernel, M, xt, t) == pytest.approx(t * h_m, rel=0.03)


def test_dispersion_is_the_variance_over_the_grid():
    assert dispersion(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)) == 0.0
    assert dispersion(torch.tensor([0.0, 2.0], dtype=torch.float64)) == pytest.approx(1.0)
    torch.testing.assert_close(midpoint_times(4), torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64))


def test_between_t_variance_without_noise_is_the_plain_variance():
    mu = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]], dtype=torch.float64)
    between, noise = between_t_variance(mu, mu)
    want = float(((mu - mu.mean(0)) ** 2).sum(1).mean())
    assert noise == 0.0 and between == pytest.approx(want)


def test_between_t_variance_removes_the_estimation_noise_on_average():
    gen = torch.Generator().manual_seed(0)
    T, P, sigma = 6, 50, 2.0
    mu = torch.randn(T, P, generator=gen, dtype=torch.float64)
    truth = float(((mu - mu.mean(0)) ** 2).sum(1).mean())
    corrected, raw = [], []
    for _ in range(400):
        ga = mu + sigma * torch.randn(T, P, generator=gen, dtype=torch.float64)
        gb = mu + sigma * torch.randn(T, P, generator=gen, dtype=torch.float64)
        b, n = between_t_variance(ga, gb)
        corrected.append(b)
        raw.append(b + n)
    assert sum(corrected) / len(corrected) == pytest.approx(truth, rel=0.05)
    expected_noise = (T - 1) / T * P * sigma**2 / 2  # what the uncorrected variance over t adds on average
    assert sum(raw) / len(raw) == pytest.approx(truth + expected_noise, rel=0.05)
