"""The report's markdown tables: one table writer, Table 2 (likelihood) and Table 3 (generation) beside the
paper's numbers for the run's dataset, and the notes that say what their columns mean."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pipeline import paper
from pipeline.results import models
from semdlm.config import Params


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


def markdown_table(df: pd.DataFrame, cols: list[str], names: list[str], digits: int = 2) -> str:
    """The columns ``cols`` of ``df`` under the headers ``names``; a missing value is "–"."""
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for _, r in df.iterrows():
        cells = ["–" if r[c] is None or (np.ndim(r[c]) == 0 and pd.isna(r[c])) else fmt(r[c], digits) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table3(params: Params, df: pd.DataFrame) -> str:
    """Gen PPL and entropy per kernel x our step counts, then the paper's columns of this run's dataset (Table 3:
    LM1B or OWT; none for any other data), separate and labelled."""
    steps = params.sampler.step_counts
    ours = models(df)
    protocol = ours["protocol"].iloc[0]
    ref = paper.table3(params.data.source)
    cells = []
    for k in params.kernels:
        row = {"kernel": k}
        for s in steps:
            r = ours[(ours["row"] == k) & (ours["steps"] == s)].iloc[0]
            flag = " *" if r["below_min_entropy"] else ""
            row[f"ours: gen PPL @{s} ({protocol})"] = fmt(float(r["gen_ppl"])) + flag
            row[f"ours: entropy @{s}"] = fmt(float(r["entropy"]))
        if ref is not None:
            paper_row, values = ref.rows.get(k, ("–", {}))
            row["paper row"] = paper_row
            row.update({f"paper: {ref.name} gen PPL @{s}": fmt(values[s]) if s in values else "–" for s in ref.steps})
        cells.append(row)
    names = list(cells[0])
    return markdown_table(pd.DataFrame(cells), names, names)


def table2(params: Params, headline: pd.DataFrame) -> str:
    """Our validation bound per kernel; the paper's Table 2 columns only for a run on its dataset (LM1B)."""
    top = max(params.sampler.step_counts)
    cols = ["row", "val_ppl", "bound", "gen_ppl", "entropy"]
    names = ["kernel", "ours: val PPL (bound)", f"bound (T = {params.train.bound_steps})", f"ours: gen PPL @{top}",
             f"ours: entropy @{top}"]
    if not paper.table2(params.data.source):
        return markdown_table(headline, cols, names, 2) + (
            f"\n\nNo paper column: the paper's Table 2 is LM1B test PPL, and this run's data is "
            f"`{params.data.source}`.")
    return markdown_table(headline, cols + ["paper_ppl", "paper_row"], names + ["paper: LM1B test PPL", "paper row"],
                          2) + (
        "\n\nPaper columns are Table 2 of arXiv 2606.15327 (LM1B, 110M parameters, 200k steps); they are printed "
        "for orientation only and are **not** comparable with ours unless data and scale match; the paper's "
        "SemDLM+ number is a perplexity of its own samples, not a bound (see docs/likelihood.md).")


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
        return (f"Paper columns: Table 3, {ref.name}, GPT-2 Large, {ref.seq_len}-token samples (this run's dataset); "
                "other steps and scale than ours may apply.")
    return (f"No paper columns: the paper's tables are for LM1B and OWT, and this run's data is "
            f"`{params.data.source}`.")
