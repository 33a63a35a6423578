import numpy as np

from semdlm.prior import global_jump, is_valid_token, valid_mask

TOKENS = ["[PAD]", "[CLS]", "the", "bank", "##ing", ".", "!?", "rates", "rare", "[unused3]"]
COUNTS = np.array([0, 50, 100, 20, 30, 80, 5, 10, 1, 0])


def test_valid_mask_drops_specials_pieces_punctuation_and_rare_ids():
    valid = valid_mask(TOKENS, COUNTS, min_count=5)
    assert [t for t, v in zip(TOKENS, valid, strict=True) if v] == ["the", "bank", "rates"]
    assert is_valid_token("£3") and not is_valid_token("…")


def test_nu_sums_to_one_with_zero_mass_on_invalid_ids():
    valid = valid_mask(TOKENS, COUNTS, min_count=5)
    nu = global_jump(COUNTS, valid, tau=0.5)
    assert abs(nu.sum() - 1) < 1e-12
    assert (nu[~valid] == 0).all()
    expected = np.sqrt([100, 20, 10]) / np.sqrt([100, 20, 10]).sum()
    np.testing.assert_allclose(nu[valid], expected)


def test_tau_zero_is_uniform_over_valid_ids():
    valid = valid_mask(TOKENS, COUNTS, min_count=5)
    nu = global_jump(COUNTS, valid, tau=0.0)
    np.testing.assert_allclose(nu[valid], 1 / 3)
