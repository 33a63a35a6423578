"""graph: cosine kNN over MiniLM word embeddings of the (compact) vocabulary -> [V, k_max] table."""

from __future__ import annotations

import pandas as pd
import torch

from pipeline import assets
from pipeline.artifacts import GRAPH, load_vocab
from pipeline.common import StageError, write_parquet
from semdlm.config import GraphConfig
from semdlm.graph import knn_table


def run(cfg: GraphConfig) -> None:
    vocab = load_vocab()
    if cfg.k_max >= vocab.size - 5:
        raise StageError(f"graph.k_max={cfg.k_max} is not below the vocabulary size {vocab.size}; lower it")
    emb = assets.word_embeddings()[torch.from_numpy(vocab.ids)]
    not_special = torch.ones(vocab.size, dtype=torch.bool)
    not_special[[vocab.pad, vocab.unk, vocab.cls, vocab.sep, vocab.mask]] = False  # never a corruption target
    ids, sims = knn_table(emb, cfg.k_max, cfg.chunk_size, valid=not_special)
    write_parquet(GRAPH, pd.DataFrame({
        "id": range(vocab.size),
        "token": vocab.tokens,
        "neighbours": list(ids.numpy().astype("int32")),
        "sims": list(sims.numpy()),
    }))
