"""Where each stage's outs live, and typed readers of the tokens, the prior and the graph (one place, used by every
downstream stage). The library objects built from them (the unigram, kernels, trained models) are
``pipeline/loaders.py``'s."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.common import StageError, atomic, read_json, read_parquet, require

TOKENS = Path("data/tokens")
VOCAB = TOKENS / "vocab.json"
GRAPH = Path("data/graph/neighbours.parquet")
PRIOR = Path("data/prior/unigram.parquet")
PRIOR_METRICS = Path("metrics/prior.json")
EVALUATOR = Path("models/evaluator")
REFERENCE = Path("metrics/reference.json")
DISPERSION = Path("metrics/dispersion.json")
REPORTS = Path("reports")  # report.md, results.csv, figures/
FIGURES = REPORTS / "figures"
TOKEN_CACHE = Path("checkpoints/tokens")  # memory-mapped copies of the token splits (no out: rebuilt when missing)


def model_path(kernel: str) -> Path:
    return Path("models") / kernel / "model.pt"


def checkpoint_dir(kernel: str) -> Path:
    return Path("checkpoints") / kernel


def metrics_dir(kernel: str) -> Path:
    return Path("metrics") / kernel


def samples_path(kernel: str) -> Path:
    return Path("samples") / kernel / "samples.parquet"


@dataclass
class Vocab:
    ids: np.ndarray  # compact id -> bert-base-uncased id
    tokens: list[str]
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @property
    def size(self) -> int:
        return len(self.ids)


def load_vocab() -> Vocab:
    v = read_json(VOCAB, "tokenize")
    s = v["special"]
    return Vocab(np.asarray(v["ids"], dtype=np.int64), v["tokens"], s["pad"], s["unk"], s["cls"], s["sep"], s["mask"])


def split_shards(name: str) -> list[Path]:
    """The parquet shards of a tokenized split (data/tokens/<name>/part-*.parquet), in order."""
    shards = sorted((TOKENS / name).glob("part-*.parquet"))
    if not shards:
        raise StageError(f"missing upstream files {TOKENS / name}/part-*.parquet; run `dvc repro tokenize` first")
    return shards


def read_rows(path: Path) -> np.ndarray:
    """One shard as [rows, seq_len] int32."""
    import pyarrow.parquet as pq

    col = pq.read_table(path, columns=["ids"]).column("ids").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)


def iter_split(name: str) -> Iterator[np.ndarray]:
    """The split shard by shard, each as [rows, seq_len] int32 (constant memory for any corpus size)."""
    for path in split_shards(name):
        try:
            yield read_rows(path)
        except Exception as e:  # noqa: BLE001 - any parse failure means the same thing to the user
            raise StageError(
                f"{path} is unreadable ({e.__class__.__name__}); delete data/tokens and run `dvc repro tokenize`"
            ) from None


def load_rows(name: str, alloc: Callable[[tuple[int, int], type], np.ndarray] = np.empty) -> np.ndarray:
    """All sequences of a split in one [rows, seq_len] array: uint16 when the vocabulary allows (it does for
    bert-base-uncased; OpenWebText is then ~18 GB), else int32. Filled shard by shard into ``alloc(shape, dtype)``
    (in memory, or a memory map for ``mapped_rows``), no second copy."""
    import pyarrow.parquet as pq

    shards = split_shards(name)
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in shards]
    vocab_size = len(read_json(VOCAB, "tokenize")["ids"])
    rows: np.ndarray | None = None
    at = 0
    for part in iter_split(name):
        if rows is None:
            rows = alloc((sum(sizes), part.shape[1]), np.uint16 if vocab_size <= 2**16 else np.int32)
        rows[at : at + len(part)] = part
        at += len(part)
    if rows is None or len(rows) == 0:
        raise StageError(f"{TOKENS / name} has no sequences; use a larger corpus or a smaller data.seq_len")
    return rows


def mapped_rows(name: str, write: bool = True) -> np.ndarray:
    """``load_rows(name)`` as a read-only memory map of a flat .npy under checkpoints/tokens/: the page cache holds
    one copy per node, shared by its ranks. ``write``: build it when missing or stale (the shards changed); call it
    so in one process per node (local rank 0) and with ``write=False`` in the others once that one is done."""
    shards = split_shards(name)
    key = json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in shards])
    path = TOKEN_CACHE / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if write and not path.exists():
        for stale in TOKEN_CACHE.glob(f"{name}-*.npy"):
            stale.unlink(missing_ok=True)  # another node may have removed it (shared file system)
        with atomic(path) as tmp:
            rows = load_rows(name, lambda shape, dtype: np.lib.format.open_memmap(tmp, "w+", dtype, shape))
            rows.flush()
            del rows
    return np.load(require(path, "tokenize"), mmap_mode="r")


def load_split(name: str) -> torch.Tensor:
    """A split as one [rows, seq_len] int64 tensor (for the validation split and small corpora)."""
    return torch.from_numpy(load_rows(name).astype(np.int64))


def load_prior() -> dict[str, torch.Tensor]:
    df = read_parquet(PRIOR, "prior")
    return {
        "count": torch.tensor(df["count"].to_numpy(), dtype=torch.float64),
        "valid": torch.tensor(df["valid"].to_numpy(), dtype=torch.bool),
        "nu": torch.tensor(df["nu"].to_numpy(), dtype=torch.float64),
    }


def load_graph() -> tuple[torch.Tensor, torch.Tensor]:
    """The [V, k_max] neighbour ids and their cosine similarities."""
    df = read_parquet(GRAPH, "graph")
    ids = torch.from_numpy(np.stack(df["neighbours"].to_numpy()).astype(np.int64))
    return ids, torch.from_numpy(np.stack(df["sims"].to_numpy()).astype(np.float64))
