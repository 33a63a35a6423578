"""The report's markdown tables: one table writer, Table 2 (likelihood) and Table 3 (generation) beside the
paper's numbers for the run's dataset, the true-law table of a synthetic run, and the notes that say what their
columns mean."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pipeline import paper
from pipeline.results import REFERENCE_ROWS, models
from semdlm.config import Params

MODEL_NAMES = {"paper": "x_t only", "latent-state": "x_t + latent state (ours)"}  # the paper's; our extension


def fmt(x: object, digits: int = 2) -> str:
    """A cell: yes/no for booleans, thousands separators, ``digits`` decimals for floats, strings as they are."""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, float) and x.is_integer() and abs(x) >= 1000:
        return f"{int(x):,}"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return str(x)


def missing(x: object) -> bool:
    return x is None or (np.ndim(x) == 0 and pd.isna(x))


def markdown_table(df: pd.DataFrame, cols: list[str], names: list[str], digits: int = 2) -> str:
    """The columns ``cols`` of ``df`` under the headers ``names``; a missing value is "–"."""
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for _, r in df.iterrows():
        cells = ["–" if missing(r[c]) else fmt(r[c], digits) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cells_table(rows: list[dict[str, str]]) -> str:
    """A table of ready-made cells, its headers the keys of the first row."""
    names = list(rows[0])
    return markdown_table(pd.DataFrame(rows), names, names)


def table3(params: Params, df: pd.DataFrame) -> str:
    """Per kernel x our step counts: gen PPL, entropy, and repair and the basin (revisions, semantic repetition);
    then the paper's columns of this run's dataset (Table 3: LM1B or OWT; none for any other data), labelled."""
    steps = params.sampler.step_counts
    ours = models(df)
    protocol = ours["protocol"].iloc[0]
    ref = paper.table3(params.data.source)
    rows = []
    for k in params.kernels:
        mine = ours[ours["kernel"] == k]
        row = {"kernel": k, "model": MODEL_NAMES[mine["model"].iloc[0]]}
        for s in steps:
            r = mine[mine["steps"] == s].iloc[0]
            flag = " *" if r["below_min_entropy"] else ""
            row[f"ours: gen PPL @{s} ({protocol})"] = fmt(float(r["gen_ppl"])) + flag
            row[f"entropy @{s}"] = fmt(float(r["entropy"]))
            row[f"revisions @{s}"] = fmt(float(r["revisions"]))
            row[f"sem. rep. @{s}"] = fmt(float(r["semantic_repetition"]))
        if ref is not None:
            paper_row, values = ref.rows.get(str(mine["kernel_type"].iloc[0]), ("–", {}))
            if mine["model"].iloc[0] != "paper":
                paper_row, values = "–", {}
            row["paper row"] = paper_row
            row.update({f"paper: {ref.name} gen PPL @{s}": fmt(values[s]) if s in values else "–" for s in ref.steps})
        rows.append(row)
    return cells_table(rows)


def table2(params: Params, headline: pd.DataFrame) -> str:
    """Per kernel: its model, its valid bound (named, with how to read it), the continuous-time bound of a Markov
    chain, and the denoising PPL (the paper's Table 2 metric as we read it; not a bound); the paper's Table 2
    columns only for a run on its dataset (LM1B)."""
    cols = ["kernel", "model_name", "val_ppl", "bound", "bound_label", "val_ppl_ctmc", "val_denoising_ppl"]
    names = ["kernel", "model", "ours: val PPL (bound)", "bound", "how to read the bound",
             "ours: val PPL (continuous-time bound)", "ours: denoising PPL (not a bound)"]
    top = headline.assign(model_name=headline["model"].map(MODEL_NAMES))
    if not paper.table2(params.data.source):
        return markdown_table(top, cols, names, 2) + (
            f"\n\nNo paper column: the paper's Table 2 is LM1B test PPL, and this run's data is "
            f"`{params.data.source}`.")
    return markdown_table(top, cols + ["paper_ppl", "paper_row"], names + ["paper: LM1B test PPL", "paper row"],
                          2) + (
        "\n\nPaper columns are Table 2 of arXiv 2606.15327 (LM1B, 110M parameters, 200k steps), printed for "
        "orientation only: they are comparable with ours only where data and scale match. The paper's \"test PPL\" "
        "is not a likelihood bound (Sec. 5.1: measured on texts produced by the model-native sampler; its "
        "objective, E_t E[-log p_theta(x_0 | x_t)]): the column to hold it against is our denoising PPL, not our "
        "bound (docs/likelihood.md).")


def truth_table(params: Params, df: pd.DataFrame, law: dict) -> str:
    """Against the data's true law (data.source: synthetic): per kernel the bound's distance to H, and per step
    count the exact NLL of its samples minus H (over the samples of non-zero probability) and the share of
    samples the law gives probability zero; the reference rows scored by the same law."""
    steps = params.sampler.step_counts
    ours = models(df)
    rows = []
    for k in params.kernels:
        mine = ours[ours["kernel"] == k]
        row = {"kernel": k, "bound − H": fmt(float(mine["bound_minus_entropy"].iloc[0]), 3)}
        for s in steps:
            r = mine[mine["steps"] == s].iloc[0]
            row[f"sample NLL − H @{s}"] = "–" if missing(r["true_nll_minus_entropy"]) else fmt(
                float(r["true_nll_minus_entropy"]), 3)
            row[f"p = 0 share @{s}"] = fmt(float(r["zero_prob_share"]))
        rows.append(row)
    for key, name in REFERENCE_ROWS.items():
        r = df[df["kernel"] == key].iloc[0]
        row = {"kernel": name, "bound − H": "–"}
        for s in steps:
            row[f"sample NLL − H @{s}"] = "–" if missing(r["true_nll_minus_entropy"]) else fmt(
                float(r["true_nll_minus_entropy"]), 3)
            row[f"p = 0 share @{s}"] = fmt(float(r["zero_prob_share"]))
        rows.append(row)
    return cells_table(rows)


def entropy_note(params: Params, applies: bool) -> str:
    """What the entropy column and the `*` mean for this run."""
    ev, L = params.eval, params.data.seq_len
    bound = f"A sample of {L} tokens has entropy at most ln {L} = {math.log(L):.2f}"
    if not applies:
        return (f"Entropy: mean per-sample unigram entropy of the model's own token ids (nats). {bound}, below "
                f"eval.min_entropy = {ev.min_entropy}, so the threshold is **not applied** (no row could pass it, "
                "held-out text included; see docs/evaluation.md): compare entropies with the held-out text row.")
    return (f"Entropy: mean per-sample unigram entropy of the model's own token ids (nats). `*`: entropy below "
            f"eval.min_entropy = {ev.min_entropy} (the paper's Table 3 only reports rows above it; here they are "
            f"marked, not hidden). {bound}.")


def paper_note(params: Params) -> str:
    ref = paper.table3(params.data.source)
    if ref is not None:
        return (f"Paper columns: Table 3, {ref.name}, GPT-2 Large, {ref.seq_len}-token samples (this run's dataset), "
                "for the paper's models only; other steps and scale than ours may apply.")
    return (f"No paper columns: the paper's tables are for LM1B and OWT, and this run's data is "
            f"`{params.data.source}`.")
