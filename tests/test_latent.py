"""The latent-state process: its state law matches Eq. 117, and its reverse and forward moves keep the marginals."""

import pytest
import torch

from semdlm.kernels import CLEAN, GLOBAL, NEIGHBOUR
from semdlm.latent import flows, forward_step, marginal_reverse_step, reverse_probs, reverse_step
from semdlm.loss import token_ce
from tests.stats import assert_frequencies_match
from tests.test_kernels import KERNELS, kernels
from tests.toy import local_likelihood

N = 30_000
# (s, t) pairs; for semdlm_plus (k_max = 4, gamma = 1) 0.3 -> 0.8 crosses two jumps of k_t
LEVELS = [(0.3, 0.8), (0.6, 0.65), (0.0, 0.5), (0.5, 1.0)]


def at(t: float) -> torch.Tensor:
    return torch.tensor([t], dtype=torch.float64)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.55, 1.0])
def test_the_state_law_shows_exactly_the_eq_117_marginal(name, t):
    kernel = kernels()[name]
    states = torch.arange(kernel.num_states).repeat_interleave(kernel.vocab_size)
    tokens = torch.arange(kernel.vocab_size).repeat(kernel.num_states)
    joint = local_likelihood(kernel, states, tokens, t)  # [S * V, x_0]: q(state, x | x_0)
    shown = torch.zeros(kernel.vocab_size, kernel.vocab_size, dtype=torch.float64).index_add_(0, tokens, joint)
    torch.testing.assert_close(shown.T[:6], kernel.probs(torch.arange(6), t))


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize(("s", "t"), LEVELS)
def test_flows_move_the_state_law_of_s_to_that_of_t_and_slots_only_when_k_grows(name, s, t):
    kernel = kernels()[name]
    f = flows(kernel, s, t)[0]
    assert (f >= 0).all()
    torch.testing.assert_close(f.sum(1), kernel.state_probs(at(s))[0])
    torch.testing.assert_close(f.sum(0), kernel.state_probs(at(t))[0])
    assert float(f[GLOBAL].sum() - f[GLOBAL, GLOBAL]) == 0.0  # GLOBAL is left by no one going forward
    between_slots = f[NEIGHBOUR:, NEIGHBOUR:] - torch.diag_embed(f[NEIGHBOUR:, NEIGHBOUR:].diagonal())
    if int(kernel.schedule.k(at(s))) == int(kernel.schedule.k(at(t))):
        assert float(between_slots.sum()) == 0.0  # the one x_0-dependent move happens only at a jump of k_t


def corrupt_at(kernel, x0: int, t: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x, st = kernel.corrupt(torch.full((N, 1), x0), torch.full((N,), t, dtype=torch.float64), gen)
    return x.view(-1), st.view(-1)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize(("s", "t"), LEVELS)
@pytest.mark.parametrize("direction", ["reverse: q_t -> q_s", "forward: q_s -> q_t"])
def test_state_moves_take_one_marginal_to_the_other(name, s, t, direction):
    kernel, gen = kernels()[name], torch.Generator().manual_seed(0)
    x0 = torch.full((N,), 2)
    if direction.startswith("reverse"):
        (x, st), level = reverse_step(kernel, *corrupt_at(kernel, 2, t, gen), x0, t, s, gen), s
    else:
        (x, st), level = forward_step(kernel, *corrupt_at(kernel, 2, s, gen), x0, s, t, gen), t
    assert_frequencies_match(x, kernel.probs(torch.tensor([2]), level)[0])
    assert_frequencies_match(st, kernel.state_probs(at(level))[0])


@pytest.mark.parametrize("name", KERNELS)
def test_the_state_marginalised_reverse_step_keeps_the_marginals(name):
    kernel, gen = kernels()[name], torch.Generator().manual_seed(1)
    x, _ = corrupt_at(kernel, 4, 0.8, gen)
    moved = marginal_reverse_step(kernel, x, torch.full((N,), 4), 0.8, 0.3, gen)
    assert_frequencies_match(moved, kernel.probs(torch.tensor([4]), 0.3)[0])


@pytest.mark.parametrize("name", KERNELS)
def test_forward_then_reverse_with_the_same_x0_leaves_q_s_invariant(name):
    # the corrector of the samplers: renoise s -> t and denoise back, repeated
    kernel, gen = kernels()[name], torch.Generator().manual_seed(2)
    x0 = torch.full((N,), 3)
    x, st = corrupt_at(kernel, 3, 0.4, gen)
    for _ in range(3):
        x, st = reverse_step(kernel, *forward_step(kernel, x, st, x0, 0.4, 0.7, gen), x0, 0.7, 0.4, gen)
    assert_frequencies_match(x, kernel.probs(torch.tensor([3]), 0.4)[0])


@pytest.mark.parametrize("name", KERNELS)
def test_corrector_moves_a_wrong_state_to_q_s(name):
    # all tokens clean is the wrong law at s = 0.4; repeated renoise-denoise steps given x_0 mix to q_s(. | x_0)
    kernel, gen = kernels()[name], torch.Generator().manual_seed(4)
    x0 = torch.full((N,), 1)
    x, st = x0.clone(), torch.full((N,), CLEAN)
    for _ in range(25):
        x, st = reverse_step(kernel, *forward_step(kernel, x, st, x0, 0.4, 0.7, gen), x0, 0.7, 0.4, gen)
    assert_frequencies_match(x, kernel.probs(torch.tensor([1]), 0.4)[0])


def test_the_chi_square_check_rejects_the_marginal_of_another_level():
    # the check used above can fail: q_0.8 draws are not q_0.3 draws
    kernel, gen = kernels()["semdlm_plus"], torch.Generator().manual_seed(3)
    x, _ = corrupt_at(kernel, 2, 0.8, gen)
    with pytest.raises(AssertionError, match="chi2"):
        assert_frequencies_match(x, kernel.probs(torch.tensor([2]), 0.3)[0])


@pytest.mark.parametrize("name", KERNELS)
def test_the_last_reverse_step_makes_every_reachable_state_clean(name):
    kernel = kernels()[name]
    live = kernel.state_probs(at(0.125))[0] > 0
    R = reverse_probs(kernel, 0.125, 0.0)[0]
    torch.testing.assert_close(R[live, CLEAN], torch.ones(int(live.sum()), dtype=torch.float64))


@pytest.mark.parametrize("name", ["knn", "semdlm_plus"])
def test_token_ce_is_the_cross_entropy_of_the_constrained_logits(name):
    # token_ce and Kernel.constrain read the neighbour-slot preimage {y : N(y)[r] = x_t} from sorted lists; both
    # must equal the restriction written densely from the neighbour table, known positions at 0, gradients included
    kernel = kernels()[name]
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 6, (64, 5), generator=gen)
    xt, state = kernel.corrupt(x0, torch.rand(64, dtype=torch.float64, generator=gen), gen)
    slot = state >= NEIGHBOUR
    assert bool(slot.any()) and bool((state == CLEAN).any())
    logits = torch.randn(64, 5, kernel.vocab_size, generator=gen, dtype=torch.float64, requires_grad=True)
    table = kernel.neighbours[:, (state - NEIGHBOUR).clamp_min(0)].permute(1, 2, 0)  # [B, L, V]: N(y)[r] per y
    keep = torch.where(slot[..., None], table == xt[..., None], torch.ones_like(table, dtype=torch.bool))
    dense = logits.masked_fill(~keep, float("-inf"))
    restricted = kernel.constrain(logits, xt, state)
    torch.testing.assert_close(restricted[slot], dense[slot])
    got = token_ce(logits, x0, kernel, xt, state)
    want = -torch.log_softmax(dense, -1).gather(-1, x0[..., None]).squeeze(-1).masked_fill(state == CLEAN, 0.0)
    torch.testing.assert_close(got, want)
    g_got, = torch.autograd.grad(got.sum(), logits)
    g_want, = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(g_got, g_want)
