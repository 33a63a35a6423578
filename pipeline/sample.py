"""sample@<kernel>: draw sequences from the trained denoiser with the configured sampler (float64)."""

from __future__ import annotations

import time

import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline import assets
from pipeline.artifacts import Vocab, load_denoiser, load_kernel, load_vocab, metrics_dir, samples_path
from pipeline.common import StageError, write_json, write_parquet
from semdlm.config import Params
from semdlm.samplers import ancestral


def decode(vocab: Vocab, rows: list[list[int]]) -> list[str]:
    """Compact ids -> bert ids -> text (special tokens dropped), the same for samples and reference text."""
    tok = assets.tokenizer()
    return tok.decode_batch([vocab.ids[r].tolist() for r in rows], skip_special_tokens=True)


def run(params: Params, kernel_name: str) -> None:
    cfg = params.sampler
    vocab = load_vocab()
    kernel = load_kernel(kernel_name, params, vocab)
    if cfg.name == "ancestral" and not kernel.is_absorbing:
        raise StageError(f"sampler.name=ancestral only supports the mask kernel, not {kernel_name!r}")
    model = load_denoiser(kernel_name)
    gen = torch.Generator().manual_seed(cfg.seed)
    ids, nfe = [], 0
    start = time.perf_counter()
    columns = (TextColumn(f"sample@{kernel_name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar, torch.no_grad():
        task = bar.add_task("sample", total=cfg.num_samples * cfg.steps)
        for first in range(0, cfg.num_samples, cfg.batch_size):
            n = min(cfg.batch_size, cfg.num_samples - first)
            res = ancestral(model, kernel, n, model.seq_len, cfg.steps, gen,
                            on_step=lambda n=n: bar.advance(task, n))
            ids += res.ids.tolist()
            nfe += res.nfe
    wall = time.perf_counter() - start
    write_parquet(samples_path(kernel_name), pd.DataFrame({"sample": range(len(ids)), "ids": ids,
                                                           "text": decode(vocab, ids)}))
    batches = -(-cfg.num_samples // cfg.batch_size)
    write_json(metrics_dir(kernel_name) / "sample.json", {
        "sampler": cfg.name, "steps": cfg.steps, "num_samples": cfg.num_samples, "seed": cfg.seed,
        "nfe_per_batch": nfe / batches, "wall_s": wall, "samples_per_s": cfg.num_samples / wall,
    })
