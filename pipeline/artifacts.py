"""Where each stage's outs live, and typed loaders for them (one place, used by every downstream stage)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.common import StageError, read_json, read_parquet, require
from semdlm.config import Params
from semdlm.kernels import Kernel, build_kernel
from semdlm.model import Denoiser

TOKENS = Path("data/tokens")
VOCAB = TOKENS / "vocab.json"
GRAPH = Path("data/graph/neighbours.parquet")
PRIOR = Path("data/prior/unigram.parquet")
PRIOR_METRICS = Path("metrics/prior.json")
EVALUATOR = Path("models/evaluator")
REFERENCE = Path("metrics/reference.json")
DISPERSION = Path("metrics/dispersion.json")


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


def load_split(name: str) -> torch.Tensor:
    df = read_parquet(TOKENS / f"{name}.parquet", "tokenize")
    if len(df) == 0:
        raise StageError(f"{TOKENS / name}.parquet has no sequences; use a larger corpus or a smaller data.seq_len")
    return torch.from_numpy(np.stack(df["ids"].to_numpy()).astype(np.int64))


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
    neighbours = load_graph()[0] if name in ("knn", "semdlm_plus") else None
    try:
        return build_kernel(name, cfg, mask_id=vocab.mask, valid=prior["valid"], unigram_nu=prior["nu"],
                            neighbours=neighbours)
    except ValueError as e:
        raise StageError(str(e)) from None


def load_denoiser(kernel: str) -> Denoiser:
    """The trained model of ``kernel`` (weights-only load: no pickle of code)."""
    from semdlm.config import ModelConfig

    path = require(model_path(kernel), f"train@{kernel}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        model = Denoiser(meta["vocab_size"], meta["seq_len"], ModelConfig(**meta["model"]), meta["mask_id"])
        model.load_state_dict(blob["state_dict"])
    except Exception as e:  # noqa: BLE001
        raise StageError(
            f"{path} is not a usable model ({e.__class__.__name__}); run `dvc repro train@{kernel}`"
        ) from None
    return model.eval()
