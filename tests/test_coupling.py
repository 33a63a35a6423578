"""The latent-flag coupling process: its reverse and forward moves keep the kernel's marginals exactly."""

import pytest
import torch

from semdlm.coupling import forward_step, reverse_step
from semdlm.samplers import renoise_denoise
from tests.stats import assert_frequencies_match
from tests.test_kernels import kernels

N = 30_000
KERNELS = ["mask", "uniform", "knn", "semdlm_plus"]
# (s, t) pairs; for semdlm_plus (k_max = 4, gamma = 1) 0.3 -> 0.8 crosses two jumps of k_t
LEVELS = [(0.3, 0.8), (0.6, 0.65), (0.0, 0.5), (0.5, 1.0)]


def draws(kernel, x0: int, t: float, gen: torch.Generator) -> torch.Tensor:
    return kernel.sample_xt(torch.full((N, 1), x0), torch.full((N,), t, dtype=torch.float64), gen).view(-1)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize(("s", "t"), LEVELS)
@pytest.mark.parametrize("direction", ["reverse: q_t -> q_s", "forward: q_s -> q_t"])
def test_coupling_moves_take_one_marginal_to_the_other(name, s, t, direction):
    kernel, gen = kernels()[name], torch.Generator().manual_seed(0)
    x0 = torch.full((N,), 2)
    if direction.startswith("reverse"):
        moved, level = reverse_step(kernel, draws(kernel, 2, t, gen), x0, t, s, gen), s
    else:
        moved, level = forward_step(kernel, draws(kernel, 2, s, gen), x0, s, t, gen), t
    assert_frequencies_match(moved, kernel.probs(torch.tensor([2]), level)[0])


@pytest.mark.parametrize("name", KERNELS)
def test_forward_then_reverse_with_the_same_x0_leaves_q_s_invariant(name):
    # the corrector of the samplers: renoise s -> t and denoise back, repeated
    kernel, gen = kernels()[name], torch.Generator().manual_seed(2)
    x0 = torch.full((N,), 3)
    x = draws(kernel, 3, 0.4, gen)
    for _ in range(3):
        x = reverse_step(kernel, forward_step(kernel, x, x0, 0.4, 0.7, gen), x0, 0.7, 0.4, gen)
    assert_frequencies_match(x, kernel.probs(torch.tensor([3]), 0.4)[0])


def test_the_chi_square_check_rejects_the_marginal_of_another_level():
    # the check used above can fail: q_0.8 draws are not q_0.3 draws
    kernel, gen = kernels()["semdlm_plus"], torch.Generator().manual_seed(3)
    xt = draws(kernel, 2, 0.8, gen)
    with pytest.raises(AssertionError, match="chi2"):
        assert_frequencies_match(xt, kernel.probs(torch.tensor([2]), 0.3)[0])


@pytest.mark.parametrize("name", KERNELS)
def test_corrector_moves_a_wrong_state_to_q_s(name):
    # all tokens clean is the wrong law at s = 0.4; repeated renoise-denoise steps given x_0 mix to q_s(. | x_0)
    kernel, gen = kernels()[name], torch.Generator().manual_seed(4)
    x0 = torch.full((N,), 1)
    x = x0.clone()
    for _ in range(25):
        x = renoise_denoise(kernel, x, x0, 0.4, 0.3, gen)
    assert_frequencies_match(x, kernel.probs(torch.tensor([1]), 0.4)[0])
