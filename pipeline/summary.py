"""summary: the experiment's headline numbers as one flat DVC metrics file, and the per-kernel tables DVC plots.

`results/summary.json` is the pipeline's only `metrics:` file, so `dvc exp show` / `dvc exp diff` compare what the
paper compares: per kernel the validation PPL (the kernel's bound) and gen PPL and entropy at each sampling-step
count. Keys: ``<kernel>.val_ppl``, ``<kernel>.gen_ppl@<steps>``, ``<kernel>.entropy@<steps>``. Wall times and
strings stay in the per-stage files under metrics/ (outs that the report and MLflow read).
`results/generation.tsv` has one row per kernel and step count (gen PPL vs steps, gen PPL vs entropy plots).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.common import atomic, write_json
from pipeline.results import collect, models
from semdlm.config import Params

RESULTS = Path("results")
SUMMARY = RESULTS / "summary.json"
GENERATION = RESULTS / "generation.tsv"


def generation(params: Params) -> pd.DataFrame:
    """One row per kernel and sampling-step count: kernel, steps, val_ppl, gen_ppl, entropy."""
    df = models(collect(params)).rename(columns={"row": "kernel"})
    df = df.assign(steps=df["steps"].astype(int)).sort_values("steps", kind="stable")
    order = {k: i for i, k in enumerate(params.kernels)}
    df = df.sort_values("kernel", key=lambda c: c.map(order), kind="stable")
    return df[["kernel", "steps", "val_ppl", "gen_ppl", "entropy"]].reset_index(drop=True)


def summary(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """{kernel: {"val_ppl": .., "gen_ppl@<steps>": .., "entropy@<steps>": ..}} (DVC shows ``kernel.key``)."""
    out: dict[str, dict[str, float]] = {}
    for k, g in df.groupby("kernel", sort=False):
        out[str(k)] = {"val_ppl": float(g["val_ppl"].iloc[0])}
        out[str(k)].update({f"{m}@{int(r.steps)}": float(getattr(r, m)) for r in g.itertuples()
                            for m in ("gen_ppl", "entropy")})
    return out


def run(params: Params) -> None:
    df = generation(params)
    with atomic(GENERATION) as tmp:
        df.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    flat = summary(df)
    write_json(SUMMARY, flat)
    print(f"wrote {SUMMARY} ({sum(len(v) for v in flat.values())} metrics) and {GENERATION}")
