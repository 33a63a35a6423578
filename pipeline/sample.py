"""sample@<kernel>: draw sequences from the trained denoiser with the configured sampler (float64), in the model of
the kernel entry (``kernels.<name>.latent_state``), and measure repair and the basin per step count: the revisions
per position (``SampleResult.mean_revisions``) and the semantic repetition of the samples (``metrics``).

Everything runs on ``sampler.device``: the network in the training precision (``train.precision``: bf16 autocast on
CUDA), the sampling arithmetic in float64, the random draws from one generator on that device. On the CPU the
samples are those of any earlier version for the same seed; a CUDA generator draws other (equally valid) numbers.
"""

from __future__ import annotations

import dataclasses
import time

import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.artifacts import load_graph, load_vocab, metrics_dir, samples_path
from pipeline.common import StageError, write_json, write_parquet
from pipeline.loaders import load_denoiser, load_kernel, load_unigram
from pipeline.text import decode
from semdlm.config import Params, SamplerConfig
from semdlm.devices import in_precision, on_device, resolve_device
from semdlm.kernels import Kernel
from semdlm.metrics import semantic_repetition
from semdlm.model import Denoiser
from semdlm.penalties import penalty
from semdlm.samplers import Sampler, Transform, get_sampler


def penalty_on(cfg: SamplerConfig, graph: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> Transform | None:
    """Eq. 23 on the logits before each draw (None when off), with the graph's table on ``device``."""
    neighbours, sims = (g.to(device) for g in graph)
    return penalty(cfg.lambda_freq, cfg.lambda_sem, cfg.window, neighbours, sims)


def run(params: Params, kernel_name: str) -> None:
    """One sample set per count in sampler.steps (same seed), all in one parquet with a ``steps`` column."""
    cfg = params.sampler
    sampler_of(cfg)  # an unknown sampler stops the stage before any loading
    device = resolve_device(cfg.device, "sampler.device")
    vocab = load_vocab()
    kernel = on_device(load_kernel(kernel_name, params, vocab), device)
    latent = params.kernels[kernel_name].latent_state
    model = load_denoiser(kernel_name, latent)
    if cfg.name == "blockwise" and model.seq_len % cfg.strides:
        raise StageError(
            f"sampler.strides={cfg.strides} does not divide the sequence length {model.seq_len}; "
            "choose a divisor (the paper uses 2)"
        )
    model.to(device)
    graph = load_graph()
    unigram, transform = load_unigram(vocab).to(device), penalty_on(cfg, graph, device)
    frames, by_steps = [], {}
    for steps in cfg.step_counts:
        ids, nfe_per_batch, wall, revisions = draw(model, kernel, dataclasses.replace(cfg, steps=steps), unigram,
                                                   transform, device, params.train.precision, latent)
        frames.append(pd.DataFrame({"steps": steps, "sample": range(len(ids)), "ids": ids,
                                    "text": decode(vocab, ids)}))
        by_steps[str(steps)] = {"nfe_per_batch": nfe_per_batch, "sample_s": wall,
                                "samples_per_s": cfg.num_samples / wall, "revisions": revisions,
                                "semantic_repetition": semantic_repetition(torch.tensor(ids), graph[0],
                                                                           graph[0].shape[1], cfg.window)}
    write_parquet(samples_path(kernel_name), pd.concat(frames, ignore_index=True))
    write_json(metrics_dir(kernel_name) / "sample.json", {
        "sampler": cfg.name, "steps": list(cfg.step_counts), "num_samples": cfg.num_samples, "seed": cfg.seed,
        "device": str(device), "lambda_freq": cfg.lambda_freq, "lambda_sem": cfg.lambda_sem,
        "model": "latent-state" if latent else "paper", "projection": cfg.projection,
        "revisions_label": "mean changes of a position's token after it first held a data token (0 for mask)",
        "semantic_repetition_label": (f"share of tokens with themselves or one of their {graph[0].shape[1]} graph "
                                      f"neighbours within {cfg.window} positions (sampler.window)"),
        "sample_s": sum(r["sample_s"] for r in by_steps.values()), "by_steps": by_steps,
    })


def sampler_of(cfg: SamplerConfig) -> Sampler:
    """The registered sampler ``sampler.name``; an unknown name stops the stage with the registry's one line."""
    try:
        return get_sampler(cfg.name)
    except ValueError as e:
        raise StageError(str(e)) from None


def draw(model: Denoiser, kernel: Kernel, cfg: SamplerConfig, unigram: torch.Tensor | None,
         transform: Transform | None, device: torch.device, precision: str,
         latent: bool) -> tuple[list[list[int]], float, float, float]:
    """``cfg.num_samples`` sequences at ``cfg.steps`` (one count): (ids, network calls per batch, wall s, revisions
    per position). ``model``, ``kernel``, ``unigram`` and ``transform`` are on ``device``, where the generator is
    made; the network runs in the training ``precision``; ``latent``: the model sees each token's latent state."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    denoise = in_precision(model, device, precision)
    sampler = sampler_of(cfg)
    ids, nfe, revisions = [], 0, 0
    start = time.perf_counter()
    columns = (TextColumn(f"sample@{kernel.name} {cfg.steps} steps"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns) as bar, torch.no_grad():
        calls = cfg.strides * (cfg.steps // cfg.strides) if cfg.name == "blockwise" else cfg.steps  # bar: steps
        task = bar.add_task("sample", total=cfg.num_samples * calls)
        for first in range(0, cfg.num_samples, cfg.batch_size):
            n = min(cfg.batch_size, cfg.num_samples - first)
            advance = lambda n=n: bar.advance(task, n)  # noqa: E731 - one call per sampler step
            res = sampler(denoise, kernel, cfg, n, model.seq_len, latent=latent, generator=gen, unigram=unigram,
                          transform=transform, on_step=advance)
            ids += res.ids.tolist()
            nfe += res.nfe
            revisions += int(res.revisions.sum())
    wall = time.perf_counter() - start
    return ids, nfe / -(-cfg.num_samples // cfg.batch_size), wall, revisions / (cfg.num_samples * model.seq_len)
