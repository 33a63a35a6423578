"""evaluate@<kernel> and reference: generative perplexity + diversity of texts, by one scoring function.

Reference rows, computed by the same code: held-out validation text (a floor for gen PPL) and sequences
drawn from the train unigram distribution (a ceiling), so every model can be placed between them. Samples and
reference rows are turned into text by the same ``decode`` (special tokens kept as text, as MDLM does), so a
reference row is scored on exactly what a perfect model of the vocabulary would emit.

With ``data.source: synthetic`` the data law is known (semdlm/synthetic.py): every row also gets its exact NLL per
token under that law (``true_nll``, ``true_ppl``, the share of rows of probability zero, the exact entropy H per
token and ``true_nll - H``), beside the evaluator LM's gen PPL, and metrics/reference.json a ``truth`` block: the
whole held-out split scored by the law (its PPL estimates exp(H)), H and the unigram line of the law.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from pipeline import evaluator_lm as ev
from pipeline.artifacts import (
    REFERENCE,
    TOKENS,
    VOCAB,
    Vocab,
    load_prior,
    load_split,
    load_vocab,
    metrics_dir,
    samples_path,
)
from pipeline.common import StageError, read_json, read_parquet, require, write_json
from pipeline.text import decode
from semdlm.config import EvalConfig
from semdlm.metrics import GenPPL, diversity, gen_ppl, gen_ppl_mdlm, mdlm_rows, retokenize
from semdlm.synthetic import RowLaw, truth_scores

PROTOCOL_TEXT = {
    "mdlm": "MDLM compute_generative_perplexity: evaluator tokens with the tokenizer's defaults (GPT-2: no BOS), "
            "truncated to the model length, right-padded with EOS, every non-EOS token and the first EOS scored, "
            "token-weighted NLL",
    "windows": "[BOS] text [EOS] by the evaluator tokenizer, windows of the evaluator context overlapping by one "
               "token, token-weighted NLL",
}


def gen_ppl_of(e: ev.Evaluator, texts: list[str], max_length: int, cfg: EvalConfig, label: str) -> GenPPL:
    """Gen PPL of ``texts`` by ``cfg.gen_ppl_protocol``; ``max_length``: the diffusion model's length (mdlm)."""
    tok = e.tokenizer
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn()) as bar:
        if cfg.gen_ppl_protocol == "mdlm":
            if tok.eos_token_id is None:
                raise StageError(f"eval.protocol=mdlm needs an evaluator tokenizer with an EOS token ({cfg.model} "
                                 "has none); use eval.protocol: windows")
            ids, att = mdlm_rows([e.encode(t, special_tokens=True) for t in texts], max_length, tok.eos_token_id)
            task = bar.add_task(label, total=-(-len(ids) // cfg.batch_size))
            return gen_ppl_mdlm(ids, att, tok.eos_token_id, e.logits, cfg.batch_size, e.context,
                                lambda: bar.advance(task))
        chunks = retokenize(texts, e.encode, tok.bos_token_id, tok.eos_token_id, e.context)
        task = bar.add_task(label, total=-(-len(chunks) // cfg.batch_size))
        return gen_ppl(chunks, e.logits, cfg.batch_size, tok.pad_token_id or 0, lambda: bar.advance(task))


def entropy_threshold_applies(cfg: EvalConfig, seq_len: int) -> bool:
    """The per-sample entropy threshold is applied only where a sample can pass it: ln(seq_len) >= min_entropy
    (Table 3's 4.8 at OWT's 1,024 tokens; never at LM1B's 128, whose maximum is ln 128 = 4.85)."""
    return cfg.min_entropy <= math.log(seq_len)


def score(e: ev.Evaluator, vocab: Vocab, ids: list[list[int]], cfg: EvalConfig, label: str) -> dict:
    """Gen PPL of the decoded ``ids`` under the evaluator and diversity of the model-vocabulary ``ids``."""
    res = gen_ppl_of(e, decode(vocab, ids), len(ids[0]), cfg, label)
    row = {"gen_ppl": res.ppl, "gen_nll": res.nll, "eval_tokens": res.tokens, "num_texts": len(ids), **diversity(ids)}
    row["below_min_entropy"] = entropy_threshold_applies(cfg, len(ids[0])) and bool(row["entropy"] < cfg.min_entropy)
    return row


def truth_law() -> RowLaw | None:
    """The exact law of the rows when data.source is synthetic (tokenize wrote it beside vocab.json), else None."""
    block = read_json(VOCAB, "tokenize").get("synthetic")
    if not block:
        return None
    with np.load(require(TOKENS / block["law"], "tokenize")) as arrays:
        return RowLaw.from_arrays(dict(arrays))


def truth_of(law: RowLaw | None, vocab: Vocab, ids: list[list[int]] | torch.Tensor) -> dict:
    """``truth_scores`` of model-id rows under the data law; empty for a source whose law is unknown."""
    return {} if law is None else truth_scores(law, vocab.ids[np.asarray(ids)])


def provenance(cfg: EvalConfig, seq_len: int) -> dict:
    """What every gen PPL is measured with: written beside the numbers in every metrics file."""
    return {"evaluator": cfg.model, "eval_dtype": cfg.dtype, "protocol": cfg.gen_ppl_protocol,
            "protocol_detail": PROTOCOL_TEXT[cfg.gen_ppl_protocol], "min_entropy": cfg.min_entropy,
            "min_entropy_applies": entropy_threshold_applies(cfg, seq_len)}


def run(cfg: EvalConfig, kernel_name: str) -> None:
    """One row per sampler.steps count of samples/<kernel>/samples.parquet, one evaluator load."""
    df = read_parquet(samples_path(kernel_name), f"sample@{kernel_name}")
    if len(df) == 0:
        raise StageError(f"{samples_path(kernel_name)} holds no samples; run `dvc repro sample@{kernel_name}`")
    if "steps" not in df.columns:
        raise StageError(f"{samples_path(kernel_name)} has no steps column (written by an older version); "
                         f"run `dvc repro -f sample@{kernel_name}`")
    start = time.perf_counter()
    vocab, e, law = load_vocab(), ev.load(cfg), truth_law()
    by_steps = {}
    for steps, g in df.groupby("steps", sort=True):
        ids = [list(r) for r in g["ids"]]
        by_steps[str(steps)] = {**score(e, vocab, ids, cfg, f"evaluate@{kernel_name} {steps}"),
                                **truth_of(law, vocab, ids)}
    write_json(metrics_dir(kernel_name) / "eval.json", {
        **provenance(cfg, len(df["ids"].iloc[0])), "device": str(e.device), "evaluate_s": time.perf_counter() - start,
        "by_steps": by_steps})


def reference(cfg: EvalConfig, seed: int = 0) -> None:
    """Score held-out text and unigram samples (same length, count and decoding as model samples)."""
    vocab = load_vocab()
    heldout = load_split("validation")
    texts = heldout[: cfg.num_reference]
    count = load_prior()["count"].clone()
    count[vocab.mask] = 0.0
    gen = torch.Generator().manual_seed(seed)
    unigram = torch.multinomial(count / count.sum(), texts.numel(), replacement=True, generator=gen).view(texts.shape)
    e, law = ev.load(cfg), truth_law()
    rows = {name: {**score(e, vocab, ids.tolist(), cfg, f"reference {name}"), **truth_of(law, vocab, ids)}
            for name, ids in (("heldout_text", texts), ("unigram_samples", unigram))}
    if law is not None:  # the whole held-out split under the law: its true PPL estimates exp(H), within true_nll_se
        rows["truth"] = {"heldout_split": {**truth_of(law, vocab, heldout), "rows": len(heldout)},
                         "entropy_per_row": law.entropy(), "entropy_per_token": law.entropy() / law.seq_len,
                         "unigram_entropy_per_token": law.unigram_entropy()}
    rows.update(provenance(cfg, texts.shape[1]), device=str(e.device))
    write_json(REFERENCE, rows)
