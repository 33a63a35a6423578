"""Where the documents of each split come from: the embedded corpus, text files, `datasets` sources.

LM1B, OpenWebText and WikiText-103 are named sources with the usual splits (LM1B: train / test, detokenised as
the packing's reference does it;
OWT: its one split with the last 100k documents held out; WikiText-103: train / validation). They load by hub id,
or from ``data.path``: a ``save_to_disk`` directory, a directory of parquet files (split name in the file or
folder name; OWT: all files), or one parquet file. Every other source is read whole and split by document
with ``data.validation_fraction`` and ``data.seed``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import assets
from pipeline.common import StageError
from semdlm.config import DataConfig
from semdlm.data import bd3lm_lm1b_detokenize, lm1b_detokenize, split_documents

OWT_HELD_OUT = 100_000


@dataclass(frozen=True)
class Named:
    """A public corpus: hub id (+ config), its train / validation split names, text column, clean-up."""

    hub: str
    config: str | None
    train: str
    validation: str | None  # None: hold out the last documents of the train split
    detokenize: dict[str, Callable[[str], str] | None] | None = None  # by data.packing; None: raw text for both


NAMED = {
    "lm1b": Named("lm1b", None, "train", "test", {"wrap": bd3lm_lm1b_detokenize, "cls_sep": lm1b_detokenize}),
    "openwebtext": Named("Skylion007/openwebtext", None, "train", None),
    # BD3-LM cleans WikiText with its wt_detokenizer, which is not implemented here: wrap is refused for it
    "wikitext103": Named("Salesforce/wikitext", "wikitext-103-raw-v1", "train", "validation", {"cls_sep": None}),
}

Docs = Any  # list[str] or a (memory-mapped) datasets.Dataset: both have len() and [i:j] slicing


@dataclass
class Corpus:
    splits: dict[str, Docs]  # "train" / "validation"
    text_field: str
    detokenize: Callable[[str], str] | None = None

    def batches(self, split: str, size: int) -> Iterator[list[str]]:
        """The split's documents in lists of ``size`` texts (datasets are read slice by slice, never whole)."""
        docs = self.splits[split]
        for i in range(0, len(docs), size):
            chunk = docs[i : i + size]
            yield chunk if isinstance(chunk, list) else chunk[self.text_field]


def open_corpus(cfg: DataConfig) -> Corpus:
    if cfg.source in NAMED:
        return _named(cfg, NAMED[cfg.source])
    if cfg.source != "bbcnews" and not cfg.source.strip():
        raise StageError("data.source is empty; use 'bbcnews', lm1b, openwebtext, wikitext103, a text file/dir or a "
                         "dataset id")
    if Path(cfg.source).suffix and not Path(cfg.source).exists():
        raise StageError(f"data.source={cfg.source!r} does not exist; check the path")
    docs = [d for d in read_corpus(cfg) if d.strip()]
    if cfg.max_docs:
        docs = docs[: cfg.max_docs]
    if len(docs) < 2:
        raise StageError(f"data.source={cfg.source!r} has {len(docs)} non-empty documents; need at least 2")
    train_idx, valid_idx = split_documents(len(docs), cfg.validation_fraction, cfg.seed)
    return Corpus({"train": [docs[i] for i in train_idx], "validation": [docs[i] for i in valid_idx]}, cfg.text_field)


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
    ds = _load(cfg.source, lambda d: d.load_dataset(cfg.source, split=cfg.hf_split), cfg, hf_split=cfg.hf_split)
    return list(ds[cfg.text_field])


def _named(cfg: DataConfig, spec: Named) -> Corpus:
    if spec.detokenize is not None and cfg.packing not in spec.detokenize:
        raise StageError(f"data.packing={cfg.packing} with data.source={cfg.source}: BD3-LM detokenises this corpus "
                         "with a clean-up that is not implemented here; use data.packing: cls_sep")
    detokenize = spec.detokenize.get(cfg.packing) if spec.detokenize else None
    where = cfg.path or spec.hub

    def split(name: str) -> Any:
        return _load(where, lambda d: _named_split(d, cfg, spec, name), cfg, hf_split=name)

    train = split(spec.train)
    if cfg.max_docs:
        train = train.select(range(min(cfg.max_docs, len(train))))
    if spec.validation is None:
        n_valid = min(OWT_HELD_OUT, max(1, round(len(train) * cfg.validation_fraction)))
        if len(train) < 2:
            raise StageError(f"data.source={cfg.source} at {where!r} has {len(train)} documents; need at least 2")
        validation = train.select(range(len(train) - n_valid, len(train)))
        train = train.select(range(len(train) - n_valid))
    else:
        validation = split(spec.validation)
        if cfg.max_docs:
            validation = validation.select(range(min(cfg.max_docs, len(validation))))
    return Corpus({"train": train, "validation": validation}, cfg.text_field, detokenize)


def _named_split(datasets: Any, cfg: DataConfig, spec: Named, split: str) -> Any:
    """One split of a named corpus from the hub or from ``data.path``."""
    if not cfg.path:
        try:
            return datasets.load_dataset(spec.hub, spec.config, split=split)
        except RuntimeError:  # a hub repo with a loading script (datasets >= 4 runs none): its parquet export
            print(f"{spec.hub}: loading script not supported by this datasets version; reading the hub's parquet "
                  "export (refs/convert/parquet) of the same data", file=sys.stderr)
            return datasets.load_dataset(spec.hub, spec.config, split=split, revision="refs/convert/parquet")
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(path)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        ds = datasets.load_from_disk(str(path))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    in_split = [f for f in files if path.is_dir() and (split in f.relative_to(path).parts or f.name.startswith(split))]
    named = in_split or (files if spec.validation is None else [])  # OWT: every file belongs to its one split
    if not named:
        raise FileNotFoundError(f"no parquet file of split {split!r} under {path}")
    return datasets.Dataset.from_parquet([str(f) for f in named])


def _load(where: str, load: Callable[[Any], Any], cfg: DataConfig, hf_split: str) -> Any:
    import datasets

    try:
        path = Path(where)
        if cfg.source not in NAMED and path.is_dir():
            ds = datasets.load_from_disk(str(path))
            ds = ds[hf_split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = load(datasets)
    except Exception as e:  # noqa: BLE001 - hub / network / format errors all mean "cannot read this source"
        kind = "path" if Path(where).exists() else "dataset id (no such local path; the hub needs internet)"
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise StageError(
            f"data.source={cfg.source!r}: cannot load {where!r} as a {kind}: {e.__class__.__name__} {why}; use "
            "'bbcnews', a .txt file/dir, a local dataset saved with save_to_disk, or set data.path to a local copy"
        ) from None
    if cfg.text_field not in ds.column_names:
        raise StageError(
            f"data.text_field={cfg.text_field!r} is not a column of {where} ({', '.join(ds.column_names)})"
        )
    return ds
