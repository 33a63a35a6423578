"""tokenize: corpus -> bert-base-uncased ids -> seeded document split -> packed sequences (parquet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import assets
from pipeline.artifacts import TOKENS, VOCAB
from pipeline.common import StageError, atomic, write_json
from semdlm.config import DataConfig
from semdlm.data import compact_vocab, lookup_table, pack, split_documents

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_corpus(cfg: DataConfig) -> list[str]:
    """Documents from the embedded BBC corpus, a text file / directory, or a datasets id / local dataset."""
    if cfg.source == "bbcnews":
        return assets.bbc_news()
    path = Path(cfg.source)
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        blocks = [b for b in text.split("\n\n") if b.strip()]
        return blocks if len(blocks) > 1 else text.splitlines()
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
        return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.rglob("*.txt"))]
    return _read_dataset(cfg, path)


def _read_dataset(cfg: DataConfig, path: Path) -> list[str]:
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            ds = ds[cfg.hf_split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(cfg.source, split=cfg.hf_split)
    except Exception as e:  # noqa: BLE001 - hub / network / format errors all mean "cannot read this source"
        kind = "path" if path.exists() else "dataset id (no such local path; the hub needs internet)"
        raise StageError(
            f"data.source={cfg.source!r}: cannot load this {kind}: {e.__class__.__name__}; "
            "use 'bbcnews', a .txt file/dir, or a local dataset saved with save_to_disk"
        ) from None
    if cfg.text_field not in ds.column_names:
        raise StageError(
            f"data.text_field={cfg.text_field!r} is not a column of {cfg.source} ({', '.join(ds.column_names)})"
        )
    return list(ds[cfg.text_field])


def run(cfg: DataConfig) -> None:
    if cfg.source != "bbcnews" and not cfg.source.strip():
        raise StageError("data.source is empty; use 'bbcnews', a text file/dir or a dataset id")
    if Path(cfg.source).suffix and not Path(cfg.source).exists():
        raise StageError(f"data.source={cfg.source!r} does not exist; check the path")
    docs = [d for d in read_corpus(cfg) if d.strip()]
    if cfg.max_docs:
        docs = docs[: cfg.max_docs]
    if len(docs) < 2:
        raise StageError(f"data.source={cfg.source!r} has {len(docs)} non-empty documents; need at least 2")
    tok = assets.tokenizer()
    full = [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(docs, add_special_tokens=False)]
    train_idx, valid_idx = split_documents(len(docs), cfg.valid_fraction, cfg.seed)
    V_full = tok.get_vocab_size()
    counts = np.bincount(np.concatenate([full[i] for i in train_idx]), minlength=V_full)
    special_full = [tok.token_to_id(s) for s in SPECIALS]
    kept = compact_vocab(counts, cfg.min_count, special_full) if cfg.vocab == "compact" else np.arange(V_full)
    table = lookup_table(kept, V_full, unk_compact=int(np.flatnonzero(kept == special_full[1])[0]))
    special = {s.strip("[]").lower(): int(table[i]) for s, i in zip(SPECIALS, special_full, strict=True)}
    splits = {
        name: pack([table[full[i]] for i in idx], cfg.seq_len, special["cls"], special["sep"])
        for name, idx in (("train", train_idx), ("valid", valid_idx))
    }
    for name, rows in splits.items():
        if len(rows) == 0:
            raise StageError(
                f"the {name} split has no full sequence of data.seq_len={cfg.seq_len} tokens; "
                "use a larger corpus, a smaller seq_len or a larger data.valid_fraction"
            )
    with atomic(TOKENS) as tmp:
        tmp.mkdir()
        for name, rows in splits.items():
            pd.DataFrame({"ids": list(rows)}).to_parquet(tmp / f"{name}.parquet", index=False)
        write_json(tmp / VOCAB.name, {
            "tokenizer": assets.TOKENIZER_NAME,
            "source": cfg.source,
            "ids": kept.tolist(),
            "tokens": [tok.id_to_token(int(i)) for i in kept],
            "special": special,
            "documents": {"train": len(train_idx), "valid": len(valid_idx)},
            "sequences": {k: len(v) for k, v in splits.items()},
            "unk_rate_train": float((splits["train"] == special["unk"]).mean()),
        })
