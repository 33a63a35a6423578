import torch

from semdlm.kernels import masking
from semdlm.likelihood import sequence_nelbo
from semdlm.loss import change_aware_loss, mask_nelbo, stratified_times, time_weight, token_ce
from tests.toy import Toy


def mc_nelbo(toy: Toy, kernel, n: int, seed: int = 0) -> tuple[float, float]:
    """Monte-Carlo E_{x0 ~ data}[NELBO(x0)] in nats/sequence with the exact-posterior denoiser, and its s.e."""
    gen = torch.Generator().manual_seed(seed)
    x0 = toy.sample(n, gen)
    t = stratified_times(n, 0.0, gen).clamp_min(1e-6)
    per_seq = sequence_nelbo(toy.denoiser(kernel), kernel, x0, t, gen) * toy.L
    return float(per_seq.mean()), float(per_seq.std() / n**0.5)


def test_mask_nelbo_with_exact_posterior_is_at_least_and_close_to_true_nll():
    toy = Toy(V=4, L=2)
    kernel = masking(toy.vocab, mask_id=toy.V)
    nelbo, se = mc_nelbo(toy, kernel, 6000)
    H = toy.entropy()
    # for the absorbing kernel with exact conditionals the NELBO equals the NLL (any-order chain rule)
    assert nelbo >= H - 4 * se, (nelbo, H, se)
    assert abs(nelbo - H) < 4 * se + 0.02, (nelbo, H, se)


def test_mask_nelbo_of_a_wrong_denoiser_is_above_true_nll():
    toy = Toy(V=4, L=2)
    kernel = masking(toy.vocab, mask_id=toy.V)
    uniform_guess = lambda xt, t: torch.zeros(*xt.shape, toy.vocab)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    x0 = toy.sample(4000, gen)
    t = stratified_times(4000, 0.0, gen).clamp_min(1e-6)
    nelbo = float(sequence_nelbo(uniform_guess, kernel, x0, t, gen).mean()) * toy.L
    assert nelbo > toy.entropy() + 0.1


def test_change_aware_loss_with_unit_weights_is_the_mask_nelbo():
    torch.manual_seed(0)
    kernel = masking(6, mask_id=5)
    x0 = torch.randint(0, 5, (8, 10))
    t = torch.rand(8, dtype=torch.float64)
    xt = kernel.sample_xt(x0, t)
    logits = torch.randn(8, 10, 6)
    ce = token_ce(logits, x0, xt, kernel)
    loss = change_aware_loss(ce, x0, xt, time_weight(kernel, t), 1.0, 1.0)
    torch.testing.assert_close(loss, mask_nelbo(ce, kernel, t).mean().float())
    # lambda_same = 0 changes the normaliser (mean over masked positions only): no longer the NELBO
    other = change_aware_loss(ce, x0, xt, time_weight(kernel, t), 1.0, 0.0)
    assert not torch.isclose(other, loss)


def test_stratified_times_cover_the_interval_evenly():
    t = stratified_times(100, 0.01, torch.Generator().manual_seed(3))
    assert t.min() >= 0.01 and t.max() <= 1.0
    counts = torch.histc(t.float(), bins=10, min=0.01, max=1.0)
    assert counts.min() >= 9 and counts.max() <= 11
