"""The synthetic source: a hidden Markov language whose law is exact (semdlm/synthetic.py), its token files and the
truth evaluator (pipeline/tokenize.py, pipeline/evaluate.py).

Exactness is checked against brute-force enumeration on tiny instances, the sampler against the law by chi-square,
and the truth evaluator against exp(H) within an explicit standard-error bound.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semdlm.config import ConfigError, DataConfig, SyntheticConfig, parse_params
from semdlm.synthetic import (
    HMM,
    RowLaw,
    clustered_hmm,
    entropy_rate,
    log_prob,
    make_language,
    nearest_clusters,
    neighbour_purity,
    sample,
    sequence_entropy,
    stationary,
    truth_scores,
    whole_word_pool,
)

P_MIN = 1e-3  # chi-square p-value below which a sampled law is rejected (fixed seeds: a pass is reproducible)


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's chi-square of ``counts`` against ``probs`` (Wilson-Hilferty normal
    approximation of the chi-square law, accurate to a few percent of p for dof >= 3)."""
    counts, probs = counts.ravel().astype(float), probs.ravel()
    assert counts[probs == 0].sum() == 0, "a count where the law puts no mass"
    expected = probs[probs > 0] * counts.sum()
    chi2 = float(((counts[probs > 0] - expected) ** 2 / expected).sum())
    dof = len(expected) - 1
    z = ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def brute_prob(hmm: HMM, x: tuple[int, ...]) -> float:
    """P(x) as the sum over every state path of init * trans * emit products."""
    total = 0.0
    for path in itertools.product(range(len(hmm.init)), repeat=len(x)):
        p = hmm.init[path[0]] * hmm.emit[path[0], x[0]]
        for i in range(1, len(x)):
            p *= hmm.trans[path[i - 1], path[i]] * hmm.emit[path[i], x[i]]
        total += p
    return total


def all_sequences(symbols: int, n: int) -> np.ndarray:
    return np.array(list(itertools.product(range(symbols), repeat=n)))


def overlapping_hmm() -> HMM:
    """3 states sharing 4 symbols, with zeros: symbol 3 only from state 0, and state 0 never follows itself."""
    rng = np.random.default_rng(1)
    trans, emit = rng.dirichlet(np.ones(3), 3), rng.dirichlet(np.ones(4), 3)
    trans[0, 0] = 0.0
    emit[1:, 3] = 0.0
    return HMM(rng.dirichlet(np.ones(3)), trans / trans.sum(1, keepdims=True), emit / emit.sum(1, keepdims=True))


def test_forward_log_prob_equals_enumeration_with_overlapping_emissions():
    hmm = overlapping_hmm()
    seqs = all_sequences(4, 4)
    brute = np.array([brute_prob(hmm, tuple(s)) for s in seqs])
    logp = log_prob(hmm, seqs)
    assert math.isclose(brute.sum(), 1.0, rel_tol=1e-12)
    assert (brute == 0).any() and np.array_equal(np.isneginf(logp), brute == 0)  # [3, 3, ..]: impossible, -inf
    np.testing.assert_allclose(logp[brute > 0], np.log(brute[brute > 0]), rtol=1e-12)
    assert np.isneginf(log_prob(hmm, np.array([[0, -1, 1, 2]]))).all()  # a token outside the language


def test_exact_entropy_equals_enumeration():
    hmm = clustered_hmm(3, 2, 0.5, 1.0, np.random.default_rng(2))
    assert hmm.identifiable
    seqs = all_sequences(6, 5)
    for law in (hmm, HMM(np.array([0.9, 0.1, 0.0]), hmm.trans, hmm.emit)):  # stationary start, then a fixed one
        p = np.exp(log_prob(law, seqs))
        assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)
        brute = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        assert math.isclose(sequence_entropy(law, 5), brute, rel_tol=1e-10)
    np.testing.assert_allclose(hmm.init @ hmm.trans, hmm.init, atol=1e-14)  # the start is stationary, so the
    step = sequence_entropy(hmm, 5) - sequence_entropy(hmm, 4)                # entropy grows by the rate per symbol
    assert math.isclose(step, entropy_rate(hmm), rel_tol=1e-10)
    with pytest.raises(ValueError, match="exact only"):
        sequence_entropy(overlapping_hmm(), 3)


def test_row_law_frames_the_sequence_and_its_unigram_line_is_the_averaged_marginal():
    hmm = clustered_hmm(2, 2, 0.5, 1.0, np.random.default_rng(3))
    law = RowLaw(hmm, np.array([40, 11, 30, 20]), first=2, last=3, seq_len=6)
    inner = all_sequences(4, 4)
    rows = np.concatenate([np.full((len(inner), 1), 2), law.words[inner], np.full((len(inner), 1), 3)], axis=1)
    p = np.exp(law.log_prob(rows))
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)
    assert math.isclose(law.entropy(), float(-(p * np.log(p)).sum()), rel_tol=1e-10)
    tokens = np.unique(rows)
    marginal = np.array([(p[:, None] * (rows == t)).sum() / law.seq_len for t in tokens])  # over the 6 positions
    assert math.isclose(law.unigram_entropy(), float(-(marginal * np.log(marginal)).sum()), rel_tol=1e-10)
    bad = rows[:3].copy()
    bad[0, 0], bad[1, -1], bad[2, 2] = 3, 2, 99  # wrong first, wrong last, a non-word inside
    assert np.isneginf(law.log_prob(bad)).all()
    assert list(law.outside(bad)) == [1, 1, 1]


def test_sampled_corpus_frequencies_match_the_law():
    hmm = clustered_hmm(4, 3, 0.3, 1.0, np.random.default_rng(4))
    x = sample(hmm, 20000, 6, np.random.default_rng(5))
    states = x // 3  # state k emits symbols 3k .. 3k + 2
    pairs = np.bincount(states[:, 0] * 4 + states[:, 1], minlength=16)  # one (s_1, s_2) pair per sequence
    assert chi2_pvalue(pairs, hmm.init[:, None] * hmm.trans) > P_MIN
    assert chi2_pvalue(np.bincount(x[:, 0], minlength=12), hmm.init @ hmm.emit) > P_MIN
    last = hmm.marginals(6)[-1] @ hmm.emit
    assert chi2_pvalue(np.bincount(x[:, -1], minlength=12), last) > P_MIN


def toy_language(seq_len: int = 10, **cfg) -> RowLaw:
    """A language over a made-up vocabulary (5 specials, 64 words) with a hand-made 8-d embedding table."""
    words = ["".join(w) for w in itertools.product("abcdefgh", repeat=2)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    emb = np.random.default_rng(0).normal(size=(len(tokens), 8))
    defaults = {"states": 6, "cluster_size": 5, "pool": 60, "transition_concentration": 0.2}
    return make_language(SyntheticConfig(**{**defaults, **cfg}), tokens, emb, 2, 3, seq_len)


def test_truth_ppl_of_heldout_rows_matches_exp_entropy_within_sampling_error():
    law = toy_language()
    s = truth_scores(law, law.sample(4000, np.random.default_rng(6)))
    h = law.entropy() / law.seq_len
    assert s["zero_prob_share"] == 0 and s["outside_token_share"] == 0 and s["entropy_per_token"] == h
    assert 0 < s["true_nll_se"] < 0.02  # the bound below is tight enough to see a wrong term
    assert abs(s["true_nll"] - h) < 4 * s["true_nll_se"]
    assert abs(math.log(s["true_ppl"]) - h) < 4 * s["true_nll_se"]  # PPL within exp(H) * exp(+-4 SE)


def test_nearest_clusters_recover_planted_groups_and_are_seeded():
    rng = np.random.default_rng(7)
    centres = np.eye(5, 12) * 10
    emb = np.repeat(centres, 4, axis=0) + rng.normal(scale=0.5, size=(20, 12))
    order = rng.permutation(20)
    clusters = nearest_clusters(emb[order], 5, 4, np.random.default_rng(0))
    planted = order // 4  # group of each shuffled row
    assert sorted(len(set(planted[c])) for c in clusters) == [1] * 5
    assert len(np.unique(clusters)) == 20  # disjoint
    assert np.array_equal(clusters, nearest_clusters(emb[order], 5, 4, np.random.default_rng(0)))
    assert neighbour_purity(emb[order], planted, 3) == 1.0
    assert not np.array_equal(toy_language(seed=1).words, toy_language(seed=2).words)
    assert np.array_equal(toy_language(seed=1).hmm.trans, toy_language(seed=1).hmm.trans)


def test_whole_word_pool_keeps_lower_case_words_in_id_order():
    tokens = ["[PAD]", "a", "the", "##s", "of", "3d", "New", "cafe", "café", "it's", "x"]
    assert whole_word_pool(tokens, 3).tolist() == [2, 4, 7]
    with pytest.raises(ValueError, match="fewer than"):
        whole_word_pool(tokens, 4)


def test_stationary_law_of_a_periodic_chain():
    star = np.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # period 2: powers of it do not converge
    np.testing.assert_allclose(stationary(star), [0.5, 0.25, 0.25], atol=1e-15)


@pytest.mark.parametrize(("synthetic", "message"), [
    ({"states": 1}, r"data\.synthetic\.states=1 must be >= 2"),
    ({"cluster_size": 1}, r"data\.synthetic\.cluster_size=1 must be >= 2"),
    ({"states": 100, "cluster_size": 50, "pool": 4000}, r"data\.synthetic\.pool=4000 must be >= .* = 5000; raise"),
    ({"transition_concentration": 0.0}, r"data\.synthetic\.transition_concentration=0\.0 must be in \[0\.01"),
    ({"emission_concentration": -1}, r"data\.synthetic\.emission_concentration=-1\.0 must be in"),
    ({"sequences": 1}, r"data\.synthetic\.sequences=1 must be >= 2"),
    ({"stats": 3}, r"unknown key data\.synthetic\.stats .* did you mean data\.synthetic\.states\?"),
    ({"sequences": "many"}, r"data\.synthetic\.sequences='many' must be an integer"),
])
def test_config_errors_name_key_value_and_fix(synthetic, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({"data": {"source": "synthetic", "synthetic": synthetic}})


def test_config_nested_mapping_and_its_type():
    assert parse_params({"data": {"synthetic": {"states": 7}}}).data.synthetic == SyntheticConfig(states=7)
    assert DataConfig().synthetic == SyntheticConfig()
    with pytest.raises(ConfigError, match=r"data\.synthetic=3 must be a mapping"):
        DataConfig(synthetic=3)


# --- the pipeline on the synthetic source, with the real tokenizer and MiniLM embeddings (offline package) ---

SMALL = {"states": 16, "cluster_size": 8, "sequences": 1200, "transition_concentration": 0.1, "pool": 1000}


@pytest.fixture(scope="module")
def project(tmp_path_factory, evaluator_dir) -> Path:
    """tokenize (synthetic) -> prior -> evaluator_lm -> reference, then evaluate@mask of hand-made samples: 10 rows
    of the law and 6 with a [MASK] left in them."""
    from pipeline import evaluate, evaluator_lm, prior, tokenize
    from pipeline.artifacts import load_split, load_vocab
    from pipeline.common import write_parquet
    from semdlm.config import load_params
    from tests.tiny import write_params

    ws = tmp_path_factory.mktemp("synthetic")
    write_params(ws / "params.yaml", evaluator_dir,
                 data={"source": "synthetic", "seq_len": 16, "validation_fraction": 0.25, "synthetic": SMALL},
                 prior={"min_count": 1})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        p = load_params()
        tokenize.run(p.data)
        prior.run(p.prior)
        evaluator_lm.prepare(p.eval)
        evaluate.reference(p.eval, p.sampler.seed)
        rows = load_split("validation")[:16].clone()
        rows[10:, 5] = load_vocab().mask
        write_parquet(ws / "samples/mask/samples.parquet",
                      pd.DataFrame({"steps": 4, "sample": range(16), "ids": [r.tolist() for r in rows]}))
        evaluate.run(p.eval, "mask")
    return ws


def read(ws: Path, path: str) -> dict:
    return json.loads((ws / path).read_text())


def test_synthetic_source_writes_the_token_files_of_every_source(project):
    from pipeline import assets
    from pipeline.artifacts import read_rows

    vocab = read(project, "data/tokens/vocab.json")
    law = RowLaw.from_arrays(dict(np.load(project / "data/tokens/synthetic.npz")))
    assert vocab["source"] == "synthetic" and vocab["sequences"] == {"train": 900, "validation": 300}
    assert vocab["ids"] == [0, 100, 101, 102, 103] + sorted(law.words.tolist())  # specials + the law's support
    assert vocab["unk_rate_train"] == 0 and vocab["synthetic"]["law"] == "synthetic.npz"
    ids = np.array(vocab["ids"])
    for split in ("train", "validation"):
        rows = ids[read_rows(project / f"data/tokens/{split}/part-00000.parquet")]
        assert rows.shape == (vocab["sequences"][split], 16)
        assert (law.outside(rows) == 0).all() and (rows[:, 0] == 101).all() and (rows[:, -1] == 102).all()
    tok = assets.tokenizer()
    words = [tok.id_to_token(int(i)) for i in law.words]
    assert [e.ids for e in tok.encode_batch(words, add_special_tokens=False)] == [[int(i)] for i in law.words]
    summary = read(project, "data/tokens/synthetic.json")
    assert summary["neighbour_purity"]["share"] > 5 * summary["neighbour_purity"]["chance"]  # MiniLM-close clusters
    assert math.isclose(summary["entropy_per_token"], law.entropy() / 16)
    assert summary["unigram_entropy_per_token"] > summary["entropy_per_token"]


def test_reference_scores_heldout_text_under_the_law(project):
    ref = read(project, "metrics/reference.json")
    truth, split = ref["truth"], ref["truth"]["heldout_split"]
    assert split["rows"] == 300 and split["zero_prob_share"] == 0
    assert abs(split["true_nll"] - truth["entropy_per_token"]) < 4 * split["true_nll_se"]
    assert ref["heldout_text"]["zero_prob_share"] == 0 and ref["heldout_text"]["gen_ppl"] > 0
    assert ref["unigram_samples"]["zero_prob_share"] > 0.5  # frames and order ignored: mostly impossible rows


def test_evaluate_reports_the_exact_nll_of_samples_beside_gen_ppl(project):
    row = read(project, "metrics/mask/eval.json")["by_steps"]["4"]
    assert row["gen_ppl"] > 0 and row["num_texts"] == 16
    assert row["zero_prob_share"] == 6 / 16 and row["outside_token_share"] == 6 / (16 * 16)
    assert math.isclose(row["true_nll_minus_entropy"], row["true_nll"] - row["entropy_per_token"])
    assert math.isclose(row["true_ppl"], math.exp(row["true_nll"]))
