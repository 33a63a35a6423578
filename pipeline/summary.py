"""summary: the experiment's headline numbers as one flat DVC metrics file, and the per-kernel tables DVC plots.

`results/summary.json` is the pipeline's only `metrics:` file, so `dvc exp show` / `dvc exp diff` compare what the
paper compares: per kernel the validation PPL (the kernel's bound; ``val_ppl_ctmc`` the continuous-time bound of a
Markov chain), the denoising PPL (not a bound), and at each sampling-step count gen PPL, entropy, revisions and
semantic repetition (``<kernel>.gen_ppl_<steps>steps``, ...); with data.source synthetic also ``bound_minus_entropy``
and ``true_nll_minus_entropy_<steps>steps``. Keys are the names of ``pipeline.results`` (the same in MLflow). Wall
times and strings stay in the per-stage files under metrics/ (outs that the report and MLflow read).
`results/generation.tsv` has one row per kernel and step count (gen PPL vs steps, gen PPL vs entropy plots).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.common import atomic, write_json
from pipeline.results import PER_KERNEL, PER_STEPS, collect, flat_name, models
from semdlm.config import Params

RESULTS = Path("results")
SUMMARY = RESULTS / "summary.json"
GENERATION = RESULTS / "generation.tsv"


def ordered(params: Params, df: pd.DataFrame) -> pd.DataFrame:
    """The kernels' rows in params order, step counts ascending."""
    df = df.assign(steps=df["steps"].astype(int)).sort_values("steps", kind="stable")
    order = {k: i for i, k in enumerate(params.kernels)}
    return df.sort_values("kernel", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def summary(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """{kernel: {"val_ppl": .., "gen_ppl_<steps>steps": .., ...}} (DVC shows ``kernel.key``); a number a kernel does
    not have (no continuous-time bound, no true law, no sample of non-zero probability) is left out."""
    out: dict[str, dict[str, float]] = {}
    for k, g in df.groupby("kernel", sort=False):
        first = g.iloc[0]
        row = {m: float(first[m]) for m in PER_KERNEL if m in g and pd.notna(first[m])}
        row.update({flat_name(m, int(r["steps"])): float(r[m]) for _, r in g.iterrows() for m in PER_STEPS
                    if m in g and pd.notna(r[m])})
        out[str(k)] = row
    return out


def run(params: Params) -> None:
    df = ordered(params, models(collect(params)))
    with atomic(GENERATION) as tmp:  # one row per kernel and step count: the data of dvc.yaml's plots
        df[["kernel", "steps", "val_ppl", "gen_ppl", "entropy"]].to_csv(tmp, sep="\t", index=False,
                                                                        float_format="%.6g")
    flat = summary(df)
    write_json(SUMMARY, flat)
    print(f"wrote {SUMMARY} ({sum(len(v) for v in flat.values())} metrics) and {GENERATION}")
