"""report: reports/report.md, reports/results.csv and PNG figures, rebuilt from the metrics files only.

The same metrics give a byte-identical report.md (no clock, no absolute paths).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.artifacts import PRIOR_METRICS, REFERENCE, metrics_dir, samples_path  # noqa: E402
from pipeline.common import StageError, atomic, read_json, read_parquet  # noqa: E402
from semdlm.config import Params  # noqa: E402

REPORTS = Path("reports")
FIGURES = REPORTS / "figures"
REFERENCE_ROWS = {"heldout_text": "held-out text (floor)", "unigram_samples": "unigram samples (ceiling)"}
# The paper's Table 2 (LM1B test PPL, 110M parameters, 200k steps), by our kernel name, with its source row.
PAPER_TABLE2 = {
    "mask": (31.78, "Masking DLM (MDLM)"),
    "uniform": (88.03, "Uniform DLM (D3PM)"),
    "knn": (149.50, "SemDLM (KNN)"),
    "semdlm_plus": (27.19, "SemDLM+"),
}


def collect(params: Params) -> pd.DataFrame:
    """One row per kernel and per reference row, with every number the report shows."""
    rows = []
    for k in params.kernels:
        m = metrics_dir(k)
        tr, sa, ev = (read_json(m / f, f"{s}@{k}") for f, s in
                      (("train.json", "train"), ("sample.json", "sample"), ("eval.json", "evaluate")))
        rows.append({"row": k, "kind": "model", "parameters": tr["parameters"], "train_steps": tr["steps"],
                     "train_tokens": tr["train_tokens"], "val_nelbo": tr["val_nelbo"], "val_ppl": tr["val_ppl"],
                     "bound": tr["bound"], "tokens_per_s": tr["tokens_per_s"], "train_s": tr["train_seconds"],
                     "sampler": sa["sampler"], "sample_steps": sa["steps"], "nfe": sa["nfe_per_batch"],
                     "sample_s": sa["wall_s"], "paper_ppl": PAPER_TABLE2.get(k, (None, ""))[0],
                     "paper_row": PAPER_TABLE2.get(k, (None, "–"))[1], **_eval_cols(ev)})
    ref = read_json(REFERENCE, "reference")
    for key in REFERENCE_ROWS:
        rows.append({"row": key, "kind": "reference", **_eval_cols(ref[key])})
    return pd.DataFrame(rows)


def _eval_cols(ev: dict) -> dict:
    keys = ("gen_ppl", "entropy", "distinct_1", "distinct_2", "distinct_3", "repeated_4gram", "below_min_entropy",
            "eval_tokens", "num_texts")
    return {k: ev[k] for k in keys}


def _fmt(x: object, digits: int = 2) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, float) and x.is_integer() and abs(x) >= 1000:
        return f"{int(x):,}"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return str(x)


def markdown_table(df: pd.DataFrame, cols: list[str], names: list[str], digits: int = 2) -> str:
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for _, r in df.iterrows():
        cells = [_fmt(r[c], digits) if r[c] is not None and not (isinstance(r[c], float) and np.isnan(r[c])) else "–"
                 for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_training(params: Params, unigram_ce: float, path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k in params.kernels:
        tr = pd.read_csv(metrics_dir(k) / "train_log.tsv", sep="\t")
        va = pd.read_csv(metrics_dir(k) / "val_log.tsv", sep="\t")
        a.plot(tr["step"], tr["loss"], label=k)
        b.plot(va["step"], va["val_nelbo"], marker="o", label=k)
    for ax, title in ((a, "training loss (each kernel's own Eq. 120 objective)"), (b, "validation bound (nats/token)")):
        ax.axhline(unigram_ce, color="grey", ls="--", lw=1, label="unigram CE (valid)")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def plot_ppl_entropy(df: pd.DataFrame, min_entropy: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for _, r in df.iterrows():
        marker = "s" if r["kind"] == "reference" else "o"
        ax.scatter(r["entropy"], r["gen_ppl"], marker=marker, s=50)
        ax.annotate(r["row"], (r["entropy"], r["gen_ppl"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.axvline(min_entropy, color="grey", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("mean per-sample unigram entropy (nats)")
    ax.set_ylabel("gen PPL (log scale)")
    ax.set_title("gen PPL vs entropy (dashed: eval.min_entropy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def render(params: Params, df: pd.DataFrame, unigram_ce: float, examples: dict[str, list[str]]) -> str:
    models = df[df["kind"] == "model"]
    refs = df[df["kind"] == "reference"].replace({"row": REFERENCE_ROWS})
    p = models.iloc[0]
    ev = params.eval
    out = [
        "# semdlm report",
        "",
        f"> **Scale warning.** This run used data `{params.data.source}`, sequences of {params.data.seq_len} tokens, "
        f"a {_fmt(int(p['parameters']))}-parameter denoiser trained for {_fmt(int(p['train_steps']))} steps "
        f"({_fmt(int(p['train_tokens']))} tokens). The paper trains 110M parameters for 200k steps on LM1B/OWT. "
        "At this scale the numbers show that every stage works; they are not a reproduction of the paper, and "
        "differences between kernels here say little about the paper's claims.",
        "",
        "## Likelihood (validation, Table-2 style)",
        "",
        f"Unigram cross-entropy of the validation split (train counts, add-one): **{unigram_ce:.3f} nats/token**. "
        "A model that learned nothing from context sits at this line; a broken one far above it.",
        "",
        markdown_table(models, ["row", "val_ppl", "gen_ppl", "entropy", "paper_ppl", "paper_row"],
                       ["kernel", "ours: val PPL (bound)", "ours: gen PPL", "ours: entropy",
                        "paper: LM1B test PPL", "paper row"], 2),
        "",
        "Paper columns are Table 2 of arXiv 2606.15327 (LM1B, 110M parameters, 200k steps); they are printed for "
        "orientation only and are **not** comparable with ours (other data, scale and, for knn / semdlm_plus, "
        "another bound: see docs/likelihood.md).",
        "",
        markdown_table(models, ["row", "val_nelbo", "bound", "parameters", "train_tokens", "tokens_per_s"],
                       ["kernel", "val NELBO (nats/tok)", "bound", "params", "train tokens", "train tok/s"], 3),
        "",
        "## Generation",
        "",
        f"Evaluator `{ev.model}` ({ev.dtype}); protocol: samples detokenised, retokenised by the evaluator, "
        "[BOS] text [EOS] in context-sized chunks, token-weighted NLL. Entropy: mean per-sample unigram entropy "
        f"of the model's own token ids (nats). Rows with entropy < eval.min_entropy = {ev.min_entropy} are "
        "marked (the paper's Table 3 only reports rows above it). A sample of "
        f"{params.data.seq_len} tokens has entropy at most ln {params.data.seq_len} = "
        f"{math.log(params.data.seq_len):.2f}, so compare entropies with the held-out text row, not the threshold.",
        f"Sampler `{params.sampler.name}`, {params.sampler.steps} steps, {params.sampler.num_samples} samples, "
        f"seed {params.sampler.seed}.",
        "",
        markdown_table(pd.concat([models, refs]),
                       ["row", "gen_ppl", "entropy", "below_min_entropy", "distinct_1", "distinct_2", "distinct_3",
                        "repeated_4gram", "nfe", "sample_s"],
                       ["row", "gen PPL", "entropy", "entropy < min", "distinct-1", "distinct-2", "distinct-3",
                        "rep. 4-gram", "NFE/batch", "sample s"]),
        "",
        "![training curves](figures/training.png)",
        "",
        "![gen PPL vs entropy](figures/genppl_entropy.png)",
        "",
        "## Samples",
        "",
    ]
    for k, texts in examples.items():
        out.append(f"**{k}**")
        out.append("")
        out += [f"- {t[:300]}{'…' if len(t) > 300 else ''}" for t in texts]
        out.append("")
    out += ["## Stage wall times (s)", "",
            markdown_table(models, ["row", "train_s", "sample_s"], ["kernel", "train", "sample"], 1), ""]
    return "\n".join(out)


def run(params: Params) -> None:
    df = collect(params)
    unigram_ce = read_json(PRIOR_METRICS, "prior")["unigram_valid_ce"]
    examples = {k: read_parquet(samples_path(k), f"sample@{k}")["text"].head(3).tolist() for k in params.kernels}
    if df.empty:
        raise StageError("no metrics to report; run `dvc repro` first")
    REPORTS.mkdir(exist_ok=True)
    with atomic(FIGURES) as tmp:
        tmp.mkdir()
        plot_training(params, unigram_ce, tmp / "training.png")
        plot_ppl_entropy(df, params.eval.min_entropy, tmp / "genppl_entropy.png")
    with atomic(REPORTS / "results.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    with atomic(REPORTS / "report.md") as tmp:
        tmp.write_text(render(params, df, unigram_ce, examples))
    print(json.dumps({"report": str(REPORTS / "report.md")}))
