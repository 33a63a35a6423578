"""graph: cosine kNN over MiniLM word embeddings of the vocabulary -> [V, k_max] table.

Neighbours are drawn from the prior stage's valid vocabulary only (Eq. 119's V_valid: no special, unused or
unseen id, no ## piece, no punctuation), for every ``data.vocab`` mode, so a kernel never corrupts a token into
an id that does not occur in the data.
"""

from __future__ import annotations

import pandas as pd
import torch

from pipeline import assets
from pipeline.artifacts import GRAPH, load_prior, load_vocab
from pipeline.common import StageError, write_parquet
from semdlm.config import GraphConfig
from semdlm.graph import knn_table


def run(cfg: GraphConfig) -> None:
    vocab = load_vocab()
    valid = load_prior()["valid"]
    n_valid = int(valid.sum())
    if cfg.k_max >= n_valid:
        raise StageError(f"graph.k_max={cfg.k_max} needs more than {cfg.k_max} valid tokens, the prior stage found "
                         f"{n_valid}; lower graph.k_max or prior.min_count, or use a larger corpus")
    emb = assets.word_embeddings()[torch.from_numpy(vocab.ids)]
    ids, sims = knn_table(emb, cfg.k_max, cfg.chunk_size, valid=valid)
    write_parquet(GRAPH, pd.DataFrame({
        "id": range(vocab.size),
        "token": vocab.tokens,
        "neighbours": list(ids.numpy().astype("int32")),
        "sims": list(sims.numpy()),
    }))
