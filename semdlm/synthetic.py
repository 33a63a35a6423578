"""A seeded language whose law is known exactly: a hidden Markov model over clusters of MiniLM-close words.

The language (``data.source: synthetic``, sizes in ``data.synthetic``):

- K hidden states, a Markov chain with transition rows A_j ~ Dirichlet(a_trans 1_K) and the first state drawn
  from its stationary law pi (pi A = pi), so every position has the same marginal;
- state k emits only from its own cluster of C whole-word bert-base-uncased tokens, B_k ~ Dirichlet(a_emit 1_C).
  The clusters are disjoint and built from the MiniLM input word embeddings (the table the graph stage uses):
  each cluster is a seed word and its C - 1 cosine-nearest words not yet taken, so the graph's neighbours of a word
  are mostly words its own state emits.

A row of the corpus is one HMM sequence of n = L - 2 words framed by two fixed tokens (``RowLaw``: [CLS] ... [SEP]
for ``data.packing: cls_sep``, [CLS] ... [CLS] for ``wrap``); rows are drawn independently, never packed across
each other. So the law of a row is exactly

    P(row) = 1[row_0 = first] 1[row_{L-1} = last]
             sum_{s_1..n} pi(s_1) B_{s_1}(x_1) prod_{i>=2} A(s_{i-1}, s_i) B_{s_i}(x_i)

(``log_prob``, the forward algorithm), and since the clusters are disjoint the state is a function of the word,
which makes the row entropy closed-form (``sequence_entropy``). All arrays are numpy float64; nothing here is
larger than the language itself ([K, K], [K, W] with W = K C) except the [W, W] similarities of
``neighbour_purity``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from semdlm.config import SyntheticConfig


def whole_word_pool(tokens: Sequence[str], size: int) -> np.ndarray:
    """Ids of the first ``size`` tokens that are lower-case ASCII words of at least 2 letters (no ## piece, special,
    digit or punctuation), in id order: bert-base-uncased lists its whole words after the single characters and
    roughly by frequency ("the" = 1996), so these are its ``size`` commonest words."""
    ids = [i for i, t in enumerate(tokens) if len(t) >= 2 and t.isascii() and t.isalpha() and t.islower()][:size]
    if len(ids) < size:
        raise ValueError(f"the vocabulary has {len(ids)} whole-word tokens, fewer than the {size} asked for")
    return np.array(ids, dtype=np.int64)


def nearest_clusters(emb: np.ndarray, states: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """[states, size] disjoint clusters of row indices of ``emb`` ([N, d]): rows are visited in a random order and
    each row not yet taken seeds a cluster of itself and its ``size - 1`` cosine-nearest untaken rows (ties broken
    by index). Memory O(N d): one row of similarities per seed."""
    if states * size > len(emb):
        raise ValueError(f"{states} clusters of {size} need {states * size} rows, the pool has {len(emb)}")
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    taken = np.zeros(len(emb), dtype=bool)
    clusters = []
    for seed in rng.permutation(len(emb)):
        if taken[seed]:
            continue
        sims = unit @ unit[seed]
        sims[taken] = -np.inf
        members = np.argsort(-sims, kind="stable")[:size]
        if not np.isfinite(sims[members]).all():
            break  # fewer than ``size`` rows left
        taken[members] = True
        clusters.append(members)
        if len(clusters) == states:
            return np.stack(clusters)
    raise ValueError(f"only {len(clusters)} clusters of {size} fit in a pool of {len(emb)}; enlarge the pool")


def neighbour_purity(emb: np.ndarray, cluster_of: np.ndarray, k: int) -> float:
    """Share of the ``k`` cosine-nearest other words of each word ([W, d] embeddings) that lie in its own cluster
    (``cluster_of`` [W]): how often the graph stage's kNN, restricted to the language, stays inside a state."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return float((cluster_of[nearest] == cluster_of[:, None]).mean())


def stationary(trans: np.ndarray) -> np.ndarray:
    """A stationary law pi (pi A = pi) of the [K, K] stochastic matrix ``trans``: uniform times the 2^64-th power
    of the lazy chain (I + A) / 2, which has the same stationary laws and, being aperiodic, converges from any
    start; each squaring is renormalised so rounding cannot drift."""
    lazy = 0.5 * (np.eye(len(trans)) + trans)
    for _ in range(64):
        lazy = lazy @ lazy
        lazy /= lazy.sum(1, keepdims=True)
    pi = np.full(len(trans), 1.0 / len(trans)) @ lazy
    return pi / pi.sum()


@dataclass(frozen=True)
class HMM:
    """Hidden Markov model over symbols 0..W-1: ``init`` [K] law of s_1, ``trans`` [K, K] with
    trans[j, k] = P(s_{i+1} = k | s_i = j), ``emit`` [K, W] with emit[k, w] = P(x_i = w | s_i = k)."""

    init: np.ndarray
    trans: np.ndarray
    emit: np.ndarray

    @property
    def identifiable(self) -> bool:
        """Every symbol is emitted by at most one state, so the state sequence is a function of the symbols."""
        return bool(((self.emit > 0).sum(0) <= 1).all())

    def marginals(self, n: int) -> np.ndarray:
        """[n, K] state laws P(s_i = k) = (init A^{i-1})_k."""
        out = [self.init]
        for _ in range(n - 1):
            out.append(out[-1] @ self.trans)
        return np.stack(out)


def clustered_hmm(states: int, cluster_size: int, transition_concentration: float, emission_concentration: float,
                  rng: np.random.Generator) -> HMM:
    """K = ``states`` states, state k emitting symbols k C .. k C + C - 1 (C = ``cluster_size``, disjoint);
    A_j ~ Dirichlet(transition_concentration), B_k ~ Dirichlet(emission_concentration) on its cluster, and
    s_1 ~ the stationary law of A."""
    trans = rng.dirichlet(np.full(states, transition_concentration), size=states)
    emit = np.zeros((states, states * cluster_size))
    for k, probs in enumerate(rng.dirichlet(np.full(cluster_size, emission_concentration), size=states)):
        emit[k, k * cluster_size : (k + 1) * cluster_size] = probs
    return HMM(stationary(trans), trans, emit)


def _draw_given(probs: np.ndarray, given: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per entry of ``given`` ([n] row indices) from row ``probs[given[j]]`` ([R, M] laws)."""
    out = np.empty(len(given), dtype=np.int64)
    for r in np.unique(given):
        at = given == r
        out[at] = rng.choice(probs.shape[1], size=int(at.sum()), p=probs[r])
    return out


def sample(hmm: HMM, n_seqs: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """[n_seqs, length] symbol sequences drawn from ``hmm`` (states drawn position by position, grouped by state)."""
    state = rng.choice(len(hmm.init), size=n_seqs, p=hmm.init)
    out = np.empty((n_seqs, length), dtype=np.int64)
    for i in range(length):
        if i:
            state = _draw_given(hmm.trans, state, rng)
        out[:, i] = _draw_given(hmm.emit, state, rng)
    return out


def log_prob(hmm: HMM, x: np.ndarray) -> np.ndarray:
    """[B] exact log P(x) of symbol sequences ``x`` ([B, n]; -1 = a token outside the language), by the scaled
    forward algorithm: alpha_1 = init * B(x_1); c_i = sum_k alpha_i(k), log P = sum_i log c_i and
    alpha_{i+1} = (alpha_i / c_i) A * B(x_{i+1}). A sequence of probability zero gets -inf (never smoothed)."""
    x = np.atleast_2d(x)
    emit_of = np.where((x >= 0)[..., None], hmm.emit.T[np.clip(x, 0, None)], 0.0)  # [B, n, K]
    alpha = hmm.init * emit_of[:, 0]
    logp = np.zeros(len(x))
    for i in range(x.shape[1]):
        if i:
            alpha = (alpha @ hmm.trans) * emit_of[:, i]
        c = alpha.sum(1)
        with np.errstate(divide="ignore"):
            logp += np.log(c)
        alpha = np.where(c[:, None] > 0, alpha / np.where(c > 0, c, 1.0)[:, None], 0.0)
    return logp


def _entropy_rows(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of ``p``, with 0 log 0 = 0."""
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)


def sequence_entropy(hmm: HMM, n: int) -> float:
    """Exact H(X_1..n) in nats, for an identifiable HMM (disjoint emission supports, as ``clustered_hmm`` builds).

    Then s_i = f(x_i), so H(X) = H(S, X) = H(S) + H(X | S), and by the Markov property and the emissions'
    conditional independence

        H(X_1..n) = H(p_1) + sum_{i=2..n} sum_k p_{i-1}(k) H(A_k) + sum_{i=1..n} sum_k p_i(k) H(B_k),

    p_i = init A^{i-1}. With overlapping emissions H(X) has no closed form (the state is then hidden), so this
    raises ValueError instead of returning a bound.
    """
    if not hmm.identifiable:
        raise ValueError("sequence_entropy is exact only when every symbol is emitted by one state at most")
    p = hmm.marginals(n)
    h_init = float(_entropy_rows(hmm.init))
    h_trans = float((p[:-1] @ _entropy_rows(hmm.trans)).sum())
    h_emit = float((p @ _entropy_rows(hmm.emit)).sum())
    return h_init + h_trans + h_emit


def entropy_rate(hmm: HMM) -> float:
    """Exact entropy rate (nats per symbol) of an identifiable HMM: sum_k pi(k) [H(A_k) + H(B_k)], pi stationary."""
    if not hmm.identifiable:
        raise ValueError("entropy_rate is exact only when every symbol is emitted by one state at most")
    return float(stationary(hmm.trans) @ (_entropy_rows(hmm.trans) + _entropy_rows(hmm.emit)))


@dataclass(frozen=True)
class RowLaw:
    """The law of one token row of length ``seq_len``: token ``first``, an HMM sequence of ``seq_len - 2`` symbols
    written as token ids ``words`` [W], token ``last``. Token ids are those of the tokenizer (bert-base-uncased),
    so the law does not depend on the compact vocabulary: map model ids through ``Vocab.ids`` first."""

    hmm: HMM
    words: np.ndarray
    first: int
    last: int
    seq_len: int

    @property
    def length(self) -> int:
        """Symbols per row (the HMM part): seq_len - 2."""
        return self.seq_len - 2

    def symbols(self, rows: np.ndarray) -> np.ndarray:
        """[B, n] symbol index of positions 1..L-2 of token ``rows`` ([B, L]); -1 where a token is no word."""
        order = np.argsort(self.words)
        inner = np.asarray(rows)[:, 1:-1]
        at = np.clip(np.searchsorted(self.words[order], inner), 0, len(order) - 1)
        return np.where(self.words[order][at] == inner, order[at], -1)

    def outside(self, rows: np.ndarray) -> np.ndarray:
        """[B] count of tokens outside the law's support: a wrong frame token or a non-word inside."""
        rows = np.asarray(rows)
        return (rows[:, 0] != self.first) + (rows[:, -1] != self.last) + (self.symbols(rows) < 0).sum(1)

    def log_prob(self, rows: np.ndarray) -> np.ndarray:
        """[B] exact log P(row) of token ``rows`` ([B, seq_len]); -inf off the support."""
        rows = np.atleast_2d(rows)
        if rows.shape[1] != self.seq_len:
            raise ValueError(f"rows of {rows.shape[1]} tokens; this law is over rows of {self.seq_len}")
        framed = (rows[:, 0] == self.first) & (rows[:, -1] == self.last)
        return np.where(framed, log_prob(self.hmm, self.symbols(rows)), -np.inf)

    def entropy(self) -> float:
        """Exact entropy of a row (nats): that of its HMM part, the frame being fixed."""
        return sequence_entropy(self.hmm, self.length)

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the token law averaged over the row's positions: the cross-entropy per token of the
        best model that ignores position and context, i.e. where the pipeline's unigram line tends with data."""
        marg = np.zeros(len(self.words) + 2)
        marg[:-2] = (self.hmm.marginals(self.length) @ self.hmm.emit).sum(0)
        marg[-2] += 1.0
        marg[-1 if self.last != self.first else -2] += 1.0
        return float(_entropy_rows(marg / self.seq_len))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """[n, seq_len] token rows drawn from the law."""
        inner = self.words[sample(self.hmm, n, self.length, rng)]
        return np.concatenate([np.full((n, 1), self.first), inner, np.full((n, 1), self.last)], axis=1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything the law is, as arrays (``np.savez``); ``from_arrays`` restores it bit for bit."""
        return {"init": self.hmm.init, "trans": self.hmm.trans, "emit": self.hmm.emit, "words": self.words,
                "frame": np.array([self.first, self.last, self.seq_len], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> RowLaw:
        first, last, seq_len = (int(v) for v in arrays["frame"])
        hmm = HMM(np.asarray(arrays["init"]), np.asarray(arrays["trans"]), np.asarray(arrays["emit"]))
        return cls(hmm, np.asarray(arrays["words"], dtype=np.int64), first, last, seq_len)


def make_language(cfg: SyntheticConfig, tokens: Sequence[str], emb: np.ndarray, first: int, last: int,
                  seq_len: int) -> RowLaw:
    """The row law of ``cfg``'s language (deterministic in ``cfg.seed``) over tokenizer ``tokens`` with word
    embeddings ``emb`` ([len(tokens), d]); ``words.reshape(states, cluster_size)[k]`` is the cluster of state k."""
    rng = np.random.default_rng(cfg.seed)
    pool = whole_word_pool(tokens, cfg.pool)
    clusters = pool[nearest_clusters(emb[pool], cfg.states, cfg.cluster_size, rng)]
    hmm = clustered_hmm(cfg.states, cfg.cluster_size, cfg.transition_concentration, cfg.emission_concentration, rng)
    return RowLaw(hmm, clusters.reshape(-1), first, last, seq_len)


def truth_scores(law: RowLaw, rows: np.ndarray) -> dict[str, float | None]:
    """Exact NLL of token ``rows`` under ``law``, in nats per row position (seq_len, frame included, as the bounds
    count): its mean over the rows of non-zero probability (``true_nll``, with its standard error), exp of it
    (``true_ppl``, an exact gen PPL), the share of rows of probability zero and of tokens off the support (those
    rows are left out of the mean, never smoothed), the exact entropy H per token and ``true_nll - H``."""
    logp = law.log_prob(rows)
    ok = np.isfinite(logp)
    nll = -logp[ok] / law.seq_len
    h = law.entropy() / law.seq_len
    mean = float(nll.mean()) if ok.any() else None
    return {
        "true_nll": mean,
        "true_nll_se": float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else None,
        "true_ppl": math.exp(mean) if mean is not None else None,
        "zero_prob_share": float(1.0 - ok.mean()),
        "outside_token_share": float(law.outside(rows).sum() / np.asarray(rows).size),
        "entropy_per_token": h,
        "true_nll_minus_entropy": mean - h if mean is not None else None,
    }
