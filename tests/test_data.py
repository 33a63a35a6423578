import numpy as np
import pytest

from pipeline import assets
from semdlm.data import compact_vocab, lookup_table, pack, split_documents


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
