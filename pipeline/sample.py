"""sample@<kernel>: draw sequences from the trained denoiser with the configured sampler (float64)."""

from __future__ import annotations

import dataclasses
import time

import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline import assets
from pipeline.artifacts import (
    Vocab,
    load_denoiser,
    load_graph,
    load_kernel,
    load_unigram,
    load_vocab,
    metrics_dir,
    samples_path,
)
from pipeline.common import StageError, write_json, write_parquet
from semdlm.config import Params, SamplerConfig
from semdlm.kernels import Kernel
from semdlm.model import Denoiser
from semdlm.penalties import penalise, window_tokens
from semdlm.samplers import Transform, ancestral, blockwise, tau_leaping


def decode(vocab: Vocab, rows: list[list[int]]) -> list[str]:
    """Compact ids -> bert ids -> text (special tokens dropped), the same for samples and reference text."""
    tok = assets.tokenizer()
    return tok.decode_batch([vocab.ids[r].tolist() for r in rows], skip_special_tokens=True)


def penalty(cfg: SamplerConfig) -> Transform | None:
    """Eq. 23 on the logits before each draw, from the window of the current sequence (None when off)."""
    if cfg.lambda_freq == 0 and cfg.lambda_sem == 0:
        return None
    neighbours, sims = load_graph() if cfg.lambda_sem else (None, None)

    def transform(logits: torch.Tensor, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        window = window_tokens(x, positions, cfg.window)
        return penalise(logits.double(), window, cfg.lambda_freq, cfg.lambda_sem, neighbours, sims)

    return transform


def run(params: Params, kernel_name: str) -> None:
    """One sample set per count in sampler.steps (same seed), all in one parquet with a ``steps`` column."""
    cfg = params.sampler
    vocab = load_vocab()
    kernel = load_kernel(kernel_name, params, vocab)
    model = load_denoiser(kernel_name)
    if cfg.name == "blockwise" and model.seq_len % cfg.strides:
        raise StageError(
            f"sampler.strides={cfg.strides} does not divide the sequence length {model.seq_len}; "
            "choose a divisor (the paper uses 2)"
        )
    x0_dist, transform = load_unigram(vocab), penalty(cfg)
    frames, by_steps = [], {}
    for steps in cfg.step_counts:
        ids, nfe_per_batch, wall = draw(model, kernel, dataclasses.replace(cfg, steps=steps), x0_dist, transform)
        frames.append(pd.DataFrame({"steps": steps, "sample": range(len(ids)), "ids": ids,
                                    "text": decode(vocab, ids)}))
        by_steps[str(steps)] = {"nfe_per_batch": nfe_per_batch, "wall_s": wall, "samples_per_s": cfg.num_samples / wall}
    write_parquet(samples_path(kernel_name), pd.concat(frames, ignore_index=True))
    write_json(metrics_dir(kernel_name) / "sample.json", {
        "sampler": cfg.name, "steps": list(cfg.step_counts), "num_samples": cfg.num_samples, "seed": cfg.seed,
        "lambda_freq": cfg.lambda_freq, "lambda_sem": cfg.lambda_sem,
        "wall_s": sum(r["wall_s"] for r in by_steps.values()), "by_steps": by_steps,
    })


def draw(model: Denoiser, kernel: Kernel, cfg: SamplerConfig, x0_dist: torch.Tensor,
         transform: Transform | None) -> tuple[list[list[int]], float, float]:
    """``cfg.num_samples`` sequences at ``cfg.steps`` (one count): (ids, network calls per batch, wall s)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    latent = model.num_states > 0  # the latent-state model sees (and the sampler tracks) each token's state
    ids, nfe = [], 0
    start = time.perf_counter()
    columns = (TextColumn(f"sample@{kernel.name} {cfg.steps} steps"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns) as bar, torch.no_grad():
        calls = cfg.strides * (cfg.steps // cfg.strides) if cfg.name == "blockwise" else cfg.steps  # bar: steps
        task = bar.add_task("sample", total=cfg.num_samples * calls)
        for first in range(0, cfg.num_samples, cfg.batch_size):
            n = min(cfg.batch_size, cfg.num_samples - first)
            advance = lambda n=n: bar.advance(task, n)  # noqa: E731 - one call per sampler step
            if cfg.name == "blockwise":
                res = blockwise(model, kernel, n, model.seq_len, cfg.steps, cfg.strides, gen, x0_dist, cfg.top_p,
                                cfg.rho, cfg.freeze_threshold, transform, advance, cfg.top_k, cfg.corrector_steps,
                                latent)
            elif cfg.name == "tau_leaping":
                res = tau_leaping(model, kernel, n, model.seq_len, cfg.steps, gen, cfg.corrector_steps, transform,
                                  advance, x0_dist, latent)
            else:
                res = ancestral(model, kernel, n, model.seq_len, cfg.steps, gen, x0_dist, advance, transform,
                                cfg.cache, latent)
            ids += res.ids.tolist()
            nfe += res.nfe
    wall = time.perf_counter() - start
    return ids, nfe / -(-cfg.num_samples // cfg.batch_size), wall
