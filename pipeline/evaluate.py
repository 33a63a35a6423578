"""evaluate@<kernel> and reference: generative perplexity + diversity of texts, by one scoring function.

Reference rows, computed by the same code: held-out validation text (a floor for gen PPL) and sequences
drawn from the train unigram distribution (a ceiling), so every model can be placed between them.
"""

from __future__ import annotations

import time

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from pipeline import evaluator as ev
from pipeline.artifacts import REFERENCE, load_prior, load_split, load_vocab, metrics_dir, samples_path
from pipeline.common import StageError, read_parquet, write_json
from pipeline.sample import decode
from semdlm.config import EvalConfig
from semdlm.metrics import diversity, gen_ppl, retokenize

PROTOCOL = "retokenize: [BOS] text [EOS] by the evaluator tokenizer, context chunks, token-weighted NLL"


def score(e: ev.Evaluator, texts: list[str], ids: list[list[int]], cfg: EvalConfig, label: str) -> dict:
    """Gen PPL of ``texts`` under the evaluator and diversity of the model-vocabulary ``ids``."""
    tok = e.tokenizer
    chunks = retokenize(texts, e.encode, tok.bos_token_id, tok.eos_token_id, e.context)
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn()) as bar:
        task = bar.add_task(label, total=-(-len(chunks) // cfg.batch_size))
        res = gen_ppl(chunks, e.logits, cfg.batch_size, tok.pad_token_id or 0, lambda: bar.advance(task))
    row = {"gen_ppl": res.ppl, "gen_nll": res.nll, "eval_tokens": res.tokens, "num_texts": len(texts), **diversity(ids)}
    row["below_min_entropy"] = bool(row["entropy"] < cfg.min_entropy)
    return row


def provenance(cfg: EvalConfig) -> dict:
    """What every gen PPL is measured with: written beside the numbers in every metrics file."""
    return {"evaluator": cfg.model, "eval_dtype": cfg.dtype, "protocol": PROTOCOL, "min_entropy": cfg.min_entropy}


def run(cfg: EvalConfig, kernel_name: str) -> None:
    """One row per sampler.steps count of samples/<kernel>/samples.parquet, one evaluator load."""
    df = read_parquet(samples_path(kernel_name), f"sample@{kernel_name}")
    if len(df) == 0:
        raise StageError(f"{samples_path(kernel_name)} holds no samples; run `dvc repro sample@{kernel_name}`")
    if "steps" not in df.columns:
        raise StageError(f"{samples_path(kernel_name)} has no steps column (written by an older version); "
                         f"run `dvc repro -f sample@{kernel_name}`")
    start = time.perf_counter()
    e = ev.load(cfg)
    by_steps = {
        str(steps): score(e, g["text"].tolist(), [list(r) for r in g["ids"]], cfg, f"evaluate@{kernel_name} {steps}")
        for steps, g in df.groupby("steps", sort=True)
    }
    write_json(metrics_dir(kernel_name) / "eval.json",
               {**provenance(cfg), "device": str(e.device), "wall_s": time.perf_counter() - start,
                "by_steps": by_steps})


def reference(cfg: EvalConfig, seed: int = 0) -> None:
    """Score held-out text and unigram samples (same length, count and decoding as model samples)."""
    vocab = load_vocab()
    valid = load_split("valid")[: cfg.num_reference]
    count = load_prior()["count"].clone()
    count[vocab.mask] = 0.0
    gen = torch.Generator().manual_seed(seed)
    unigram = torch.multinomial(count / count.sum(), valid.numel(), replacement=True, generator=gen).view(valid.shape)
    e = ev.load(cfg)
    rows = {}
    for name, ids in (("heldout_text", valid), ("unigram_samples", unigram)):
        ids_list = ids.tolist()
        rows[name] = score(e, decode(vocab, ids_list), ids_list, cfg, f"reference {name}")
    rows.update(provenance(cfg), device=str(e.device))
    write_json(REFERENCE, rows)
