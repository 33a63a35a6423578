import math
import os

import pytest
import torch

from semdlm.config import EvalConfig
from semdlm.metrics import distinct_n, diversity, gen_ppl, repeated_ngram_share, retokenize, unigram_entropy
from tests.tiny import tiny_evaluator

TEXTS = ["the match ended in a draw", "shares fell sharply on monday after the report", "a b c"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_evaluator(tmp_path_factory.mktemp("lm") / "tiny-lm")
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def by_hand(model, tok, texts: list[str]) -> float:
    """exp(mean NLL per scored token), each text scored alone (no padding, no batching)."""
    total, count = 0.0, 0
    for text in texts:
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        total += -sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        count += len(ids) - 1
    return math.exp(total / count)


def ours(model, tok, texts: list[str], context: int, batch_size: int) -> float:
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    chunks = retokenize(texts, encode, tok.bos_token_id, tok.eos_token_id, context)
    return gen_ppl(chunks, lambda i, a: model(input_ids=i, attention_mask=a).logits, batch_size,
                   tok.pad_token_id).ppl


def test_gen_ppl_is_exp_of_the_mean_token_nll_computed_by_hand(tiny_lm):
    _, model, tok = tiny_lm
    assert ours(model, tok, TEXTS, context=64, batch_size=2) == pytest.approx(by_hand(model, tok, TEXTS), rel=1e-5)


def test_chunking_and_batching_do_not_change_gen_ppl_of_texts_shorter_than_the_context(tiny_lm):
    _, model, tok = tiny_lm
    results = [ours(model, tok, TEXTS, context, batch) for context in (16, 64) for batch in (1, 3)]
    assert max(results) == pytest.approx(min(results), rel=1e-5)


def test_long_texts_are_split_so_that_every_token_after_bos_is_scored_once():
    ids = list(range(1, 24))
    chunks = retokenize(["x"], lambda s: ids, 100, 200, context=8)
    assert all(len(c) <= 8 for c in chunks)
    assert sum(len(c) - 1 for c in chunks) == len(ids) + 1  # the text and the EOS, not the BOS
    assert [c[0] for c in chunks[1:]] == [c[-1] for c in chunks[:-1]]  # each chunk conditions on its predecessor


def test_unigram_entropy_by_hand():
    assert unigram_entropy([1, 1, 2, 3]) == pytest.approx(1.5 * math.log(2))
    assert unigram_entropy([7, 7, 7]) == 0.0
    assert unigram_entropy(list(range(64))) == pytest.approx(math.log(64))


def test_distinct_n_and_repeated_ngrams_by_hand():
    samples = [[1, 2, 1, 2], [3, 3]]
    assert distinct_n(samples, 1) == pytest.approx(3 / 6)
    assert distinct_n(samples, 2) == pytest.approx(3 / 4)  # (1,2) (2,1) (1,2) (3,3)
    assert distinct_n(samples, 3) == pytest.approx(2 / 2)
    assert repeated_ngram_share([1, 2, 1, 2, 1], 2) == 1.0
    assert repeated_ngram_share([1, 2, 3, 1, 2], 2) == pytest.approx(2 / 4)
    d = diversity(samples)
    assert d["entropy"] == pytest.approx((math.log(2) + 0.0) / 2)
    assert set(d) == {"entropy", "distinct_1", "distinct_2", "distinct_3", "repeated_4gram"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_evaluator_from_a_local_path_scores_in_float32_and_bfloat16(tiny_lm, tmp_path, dtype):
    from pipeline import evaluator as ev

    path, model, tok = tiny_lm
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = EvalConfig(model=str(path), dtype=dtype)
        ev.prepare(cfg)
        e = ev.load(cfg)
    finally:
        os.chdir(old)
    assert next(e.model.parameters()).dtype == getattr(torch, dtype)
    chunks = retokenize(TEXTS, e.encode, tok.bos_token_id, tok.eos_token_id, e.context)
    got = gen_ppl(chunks, e.logits, 2, tok.pad_token_id).ppl
    assert got == pytest.approx(by_hand(model, tok, TEXTS), rel=1e-5 if dtype == "float32" else 0.05)
