"""Where each stage's outs live, and typed loaders for them (one place, used by every downstream stage)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.common import StageError, atomic, read_json, read_parquet, require
from semdlm.config import Params
from semdlm.kernels import Kernel, family, get_kernel
from semdlm.model import Denoiser

TOKENS = Path("data/tokens")
VOCAB = TOKENS / "vocab.json"
GRAPH = Path("data/graph/neighbours.parquet")
PRIOR = Path("data/prior/unigram.parquet")
PRIOR_METRICS = Path("metrics/prior.json")
EVALUATOR = Path("models/evaluator")
REFERENCE = Path("metrics/reference.json")
DISPERSION = Path("metrics/dispersion.json")
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


def load_unigram(vocab: Vocab) -> torch.Tensor:
    """The smoothed train unigram m over x_0 ([V] float64, 0 on [MASK])."""
    from semdlm.prior import smoothed_unigram

    return torch.from_numpy(smoothed_unigram(load_prior()["count"].numpy(), vocab.mask))


def load_graph() -> tuple[torch.Tensor, torch.Tensor]:
    """The [V, k_max] neighbour ids and their cosine similarities."""
    df = read_parquet(GRAPH, "graph")
    ids = torch.from_numpy(np.stack(df["neighbours"].to_numpy()).astype(np.int64))
    return ids, torch.from_numpy(np.stack(df["sims"].to_numpy()).astype(np.float64))


def load_kernel(name: str, params: Params, vocab: Vocab) -> Kernel:
    if name not in params.kernels:
        raise StageError(
            f"kernel {name!r} is not in params.yaml kernels ({', '.join(params.kernels)}); add a kernels.{name} section"
        )
    prior = load_prior()
    cfg = params.kernels[name]
    neighbours = load_graph()[0] if family(cfg.type).uses_graph else None
    try:
        return get_kernel(cfg.type, cfg, mask_id=vocab.mask, valid=prior["valid"], unigram_nu=prior["nu"],
                          neighbours=neighbours, name=name)
    except ValueError as e:
        raise StageError(str(e)) from None


def load_denoiser(kernel: str, latent: bool | None = None) -> Denoiser:
    """The trained model of ``kernel`` (weights-only load: no pickle of code); with ``latent`` (the kernel entry's
    ``latent_state``) it must be the model that entry names."""
    from semdlm.config import ModelConfig

    path = require(model_path(kernel), f"train@{kernel}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        model = Denoiser(meta["vocab_size"], meta["seq_len"], ModelConfig(**meta["model"]), meta["mask_id"],
                         meta.get("num_states", 0))
        model.load_state_dict(blob["state_dict"])
    except Exception as e:  # noqa: BLE001
        raise StageError(
            f"{path} is not a usable model ({e.__class__.__name__}); run `dvc repro train@{kernel}`"
        ) from None
    if latent is not None and (model.num_states > 0) != latent:
        raise StageError(f"{path} is {'a latent-state' if model.num_states else 'an x_t-only'} model but "
                         f"kernels.{kernel}.latent_state is {str(latent).lower()}; run `dvc repro train@{kernel}`")
    return model.eval()
