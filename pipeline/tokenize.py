"""tokenize: corpus -> bert-base-uncased ids -> packed sequences, as sharded parquet.

Documents stream through ``data.workers`` tokenizer processes in chunks; the train split's token counts are
gathered on the way, rows are packed (``data.packing``: BD3-LM's ``wrap`` or ``cls_sep``) and written in shards
of ``data.shard_sequences`` rows, so a corpus the size of OpenWebText never has to fit in memory. With the
compact vocabulary the shards are re-mapped shard by shard once the counts are known. Text that spells a special
token ("[MASK]", "[SEP]", ...) is encoded as ordinary text ("[", "mask", "]"): a special id only ever comes from
the packing. Outs: data/tokens/{train,validation}/part-*.parquet and vocab.json.

``data.source: synthetic`` has no documents: its rows are drawn from the seeded HMM language of
semdlm/synthetic.py, one sequence per row, and written as the same shards and vocab.json; beside them the law
(synthetic.npz, named with its content digest in vocab.json's ``synthetic`` block) and a readable summary
(synthetic.json: clusters, exact entropies).
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline import assets
from pipeline.artifacts import TOKENS, VOCAB, read_rows
from pipeline.common import StageError, atomic, write_json
from pipeline.sources import Corpus, open_corpus, read_corpus  # noqa: F401 - read_corpus is part of this API
from semdlm import synthetic
from semdlm.config import SYNTHETIC, DataConfig
from semdlm.data import SPECIALS, Packer, compact_vocab, lookup_table

CHUNK_DOCS = 2000  # documents per tokenizer task
SYNTHETIC_LAW, SYNTHETIC_SUMMARY = "synthetic.npz", "synthetic.json"  # under data/tokens, source: synthetic only
SYNTHETIC_CHUNK = 4096  # rows drawn at a time (fixed: the rows do not depend on data.shard_sequences)

_worker: dict = {}


def _init_worker(detokenize: Callable[[str], str] | None, pooled: bool) -> None:
    if pooled:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    tok = assets.tokenizer()
    tok.encode_special_tokens = True  # "[MASK]" in a document is text, never the mask id
    _worker.update(tok=tok, detokenize=detokenize)


def _encode(texts: list[str]) -> list[np.ndarray]:
    tok, detok = _worker["tok"], _worker["detokenize"]
    texts = [detok(t) for t in texts] if detok else texts
    return [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(texts, add_special_tokens=False)]


class ShardWriter:
    """Rows -> parquet shards ``part-00000.parquet`` ... of ``rows_per_shard`` rows (column ``ids``)."""

    def __init__(self, folder: Path, seq_len: int, rows_per_shard: int, count_id: int) -> None:
        self.folder, self.seq_len, self.rows_per_shard, self.count_id = folder, seq_len, rows_per_shard, count_id
        folder.mkdir(parents=True)
        self._buf: list[np.ndarray] = []
        self._held = 0
        self.shards = self.rows = self.counted = 0  # counted: tokens equal to count_id

    def add(self, rows: np.ndarray) -> None:
        self.counted += int((rows == self.count_id).sum())
        self._buf.append(rows)
        self._held += len(rows)
        while self._held >= self.rows_per_shard:
            block = np.concatenate(self._buf)
            self._write(block[: self.rows_per_shard])
            rest = block[self.rows_per_shard :]
            self._buf, self._held = [rest], len(rest)

    def close(self) -> None:
        if self._held or not self.shards:
            self._write(np.concatenate(self._buf) if self._buf else np.zeros((0, self.seq_len), dtype=np.int32))
        self._buf, self._held = [], 0

    def _write(self, rows: np.ndarray) -> None:
        write_rows(self.folder / f"part-{self.shards:05d}.parquet", rows)
        self.shards += 1
        self.rows += len(rows)


def write_rows(path: Path, rows: np.ndarray) -> None:
    flat = pa.array(np.ascontiguousarray(rows, dtype=np.int32).reshape(-1))
    pq.write_table(pa.table({"ids": pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])}), path)


def _token_chunks(corpus: Corpus, split: str, workers: int) -> Iterator[list[np.ndarray]]:
    chunks = corpus.batches(split, CHUNK_DOCS)
    if workers == 1:
        _init_worker(corpus.detokenize, pooled=False)
        yield from map(_encode, chunks)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds tokenizer threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(corpus.detokenize, True)) as pool:
        yield from pool.imap(_encode, chunks)


def _write_split(corpus: Corpus, split: str, cfg: DataConfig, out: Path, specials: dict[str, int],
                 counts: np.ndarray | None) -> tuple[int, ShardWriter]:
    """Tokenize, count (train), pack and write one split with full-vocabulary ids; returns (documents, writer)."""
    packer = Packer(cfg.seq_len, specials["cls"], specials["sep"], cfg.packing)
    writer = ShardWriter(out / split, cfg.seq_len, cfg.shard_sequences, specials["unk"])
    n_docs = 0
    columns = (TextColumn(f"tokenize {split}"), BarColumn(), MofNCompleteColumn(), TextColumn("documents"),
               TimeRemainingColumn())
    with Progress(*columns, disable=len(corpus.splits[split]) < 10 * CHUNK_DOCS) as bar:
        task = bar.add_task(split, total=len(corpus.splits[split]))
        for raw in _token_chunks(corpus, split, cfg.workers):
            ids = [x for x in raw if len(x)]
            n_docs += len(ids)
            if counts is not None and ids:
                counts += np.bincount(np.concatenate(ids), minlength=len(counts))
            writer.add(packer.push(ids))
            bar.advance(task, len(raw))
    writer.close()
    if writer.rows == 0:
        raise StageError(
            f"the {split} split has no full sequence of data.seq_len={cfg.seq_len} tokens; "
            "use a larger corpus, a smaller seq_len or a larger data.validation_fraction"
        )
    return n_docs, writer


def _remap(folder: Path, table: np.ndarray, unk: int) -> int:
    """Map every shard of ``folder`` through ``table`` in place; returns how many tokens became ``unk``."""
    n_unk = 0
    for path in sorted(folder.glob("part-*.parquet")):
        rows = table[read_rows(path)]
        n_unk += int((rows == unk).sum())
        write_rows(path, rows)
    return n_unk


def run(cfg: DataConfig) -> None:
    if cfg.source == SYNTHETIC:
        run_synthetic(cfg)
        return
    corpus = open_corpus(cfg)
    tok = assets.tokenizer()
    V_full = tok.get_vocab_size()
    special_full = [tok.token_to_id(s) for s in SPECIALS]
    names = [s.strip("[]").lower() for s in SPECIALS]
    counts = np.zeros(V_full, dtype=np.int64)
    with atomic(TOKENS) as tmp:
        tmp.mkdir()
        full_specials = dict(zip(names, special_full, strict=True))
        docs, writers = {}, {}
        for split in ("train", "validation"):
            docs[split], writers[split] = _write_split(corpus, split, cfg, tmp, full_specials,
                                                       counts if split == "train" else None)
        kept = compact_vocab(counts, cfg.min_count, special_full) if cfg.vocab == "compact" else np.arange(V_full)
        unk = int(np.flatnonzero(kept == special_full[1])[0])
        table = lookup_table(kept, V_full, unk_compact=unk).astype(np.int32)
        if cfg.vocab == "compact":
            n_unk = {split: _remap(tmp / split, table, unk) for split in writers}
        else:  # the full vocabulary maps ids to themselves: the shards are final
            n_unk = {split: w.counted for split, w in writers.items()}
        special = {n: int(table[i]) for n, i in zip(names, special_full, strict=True)}
        write_json(tmp / VOCAB.name, {
            "tokenizer": assets.TOKENIZER_NAME,
            "source": cfg.source,
            "ids": kept.tolist(),
            "tokens": [tok.id_to_token(int(i)) for i in kept],
            "special": special,
            "seq_len": cfg.seq_len,
            "packing": cfg.packing,
            "documents": docs,
            "sequences": {k: w.rows for k, w in writers.items()},
            "shards": {k: w.shards for k, w in writers.items()},
            "unk_rate_train": n_unk["train"] / (writers["train"].rows * cfg.seq_len),
        })


def law_digest(law: synthetic.RowLaw) -> str:
    """sha256 of the law's arrays (names, dtypes, shapes, bytes): vocab.json carries it, so a stage that depends on
    vocab.json re-runs when the law changes (the .npz file itself is not byte-stable: zip time stamps)."""
    h = hashlib.sha256()
    for name, a in sorted(law.to_arrays().items()):
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def synthetic_summary(cfg: DataConfig, law: synthetic.RowLaw, tokens: list[str], emb: np.ndarray) -> dict:
    """synthetic.json: the language's exact entropies, how MiniLM-coherent its clusters are, and the clusters."""
    syn = cfg.synthetic
    cluster_of = np.repeat(np.arange(syn.states), syn.cluster_size)
    probs = law.hmm.emit[cluster_of, np.arange(len(law.words))]
    h_row = law.entropy()
    return {
        "config": dataclasses.asdict(syn),
        "seq_len": cfg.seq_len,
        "frame": [tokens[law.first], tokens[law.last]],
        "words": len(law.words),
        "entropy_per_row": h_row,
        "entropy_per_token": h_row / cfg.seq_len,  # per row position, frame included (the bounds' unit)
        "entropy_per_word": h_row / law.length,
        "entropy_rate_per_word": synthetic.entropy_rate(law.hmm),
        "unigram_entropy_per_token": law.unigram_entropy(),
        "neighbour_purity": {  # of each word's C - 1 MiniLM-nearest language words, the share in its own cluster
            "k": syn.cluster_size - 1,
            "share": synthetic.neighbour_purity(emb[law.words], cluster_of, syn.cluster_size - 1),
            "chance": (syn.cluster_size - 1) / (len(law.words) - 1),
        },
        "clusters": [{"state": k, "tokens": [tokens[i] for i in law.words[cluster_of == k]],
                      "probs": probs[cluster_of == k].tolist()} for k in range(syn.states)],
    }


def run_synthetic(cfg: DataConfig) -> None:
    """``data.source: synthetic``: rows [first] x_1 .. x_{L-2} [last] drawn from the language of ``data.synthetic``
    (semdlm/synthetic.py; first = [CLS], last = [SEP] for cls_sep, [CLS] for wrap). The compact vocabulary is the
    specials and every word of the language (its support, whatever the counts; ``data.min_count`` is not used),
    so no row token becomes [UNK]. Train and validation rows come from two streams of ``data.seed``."""
    tok = assets.tokenizer()
    V_full = tok.get_vocab_size()
    tokens = [tok.id_to_token(i) for i in range(V_full)]
    names = [s.strip("[]").lower() for s in SPECIALS]
    full = dict(zip(names, (tok.token_to_id(s) for s in SPECIALS), strict=True))
    emb = assets.word_embeddings().numpy()
    last = full["sep"] if cfg.packing == "cls_sep" else full["cls"]
    law = synthetic.make_language(cfg.synthetic, tokens, emb, full["cls"], last, cfg.seq_len)
    kept = (np.concatenate([list(full.values()), np.sort(law.words)]) if cfg.vocab == "compact"
            else np.arange(V_full))
    table = lookup_table(kept, V_full, unk_compact=int(np.flatnonzero(kept == full["unk"])[0]))
    total = cfg.synthetic.sequences
    n_valid = min(max(1, round(total * cfg.validation_fraction)), total - 1)
    with atomic(TOKENS) as tmp:
        tmp.mkdir()
        writers = {}
        for stream, (split, n) in enumerate((("train", total - n_valid), ("validation", n_valid))):
            rng = np.random.default_rng([cfg.seed, stream])
            writers[split] = ShardWriter(tmp / split, cfg.seq_len, cfg.shard_sequences, int(table[full["unk"]]))
            for start in range(0, n, SYNTHETIC_CHUNK):
                writers[split].add(table[law.sample(min(SYNTHETIC_CHUNK, n - start), rng)])
            writers[split].close()
        np.savez(tmp / SYNTHETIC_LAW, **law.to_arrays())
        write_json(tmp / SYNTHETIC_SUMMARY, synthetic_summary(cfg, law, tokens, emb))
        write_json(tmp / VOCAB.name, {
            "tokenizer": assets.TOKENIZER_NAME,
            "source": cfg.source,
            "ids": kept.tolist(),
            "tokens": [tokens[int(i)] for i in kept],
            "special": {n: int(table[i]) for n, i in full.items()},
            "seq_len": cfg.seq_len,
            "packing": cfg.packing,
            "documents": {k: w.rows for k, w in writers.items()},  # one HMM sequence per row
            "sequences": {k: w.rows for k, w in writers.items()},
            "shards": {k: w.shards for k, w in writers.items()},
            "unk_rate_train": writers["train"].counted / (writers["train"].rows * cfg.seq_len),
            "synthetic": {"law": SYNTHETIC_LAW, "summary": SYNTHETIC_SUMMARY, "sha256": law_digest(law)},
        })
