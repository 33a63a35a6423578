"""The results of one experiment, collected once from the stages' metrics files (train.json, sample.json,
eval.json per kernel; reference.json): one table that summary, report and track all read."""

from __future__ import annotations

import pandas as pd

from pipeline import paper
from pipeline.artifacts import REFERENCE, metrics_dir
from pipeline.common import StageError, read_json
from semdlm.config import Params

REFERENCE_ROWS = {"heldout_text": "held-out text (floor)", "unigram_samples": "unigram samples (ceiling)"}
# written next to every gen PPL, carried into results.csv
PROVENANCE = ("evaluator", "eval_dtype", "protocol", "protocol_detail", "min_entropy_applies")
EVAL_COLS = ("gen_ppl", "entropy", "distinct_1", "distinct_2", "distinct_3", "repeated_4gram", "below_min_entropy",
             "eval_tokens", "num_texts")


def collect(params: Params) -> pd.DataFrame:
    """One row per kernel x sampling-step count and per reference row, with every number the report shows.
    Paper Table 2 values only for a run on Table 2's dataset."""
    table2 = paper.table2(params.data.source)
    rows = []
    for k in params.kernels:
        m = metrics_dir(k)
        tr, sa, ev = (read_json(m / f, f"{s}@{k}") for f, s in
                      (("train.json", "train"), ("sample.json", "sample"), ("eval.json", "evaluate")))
        for steps, sample_row in sa["by_steps"].items():
            if steps not in ev["by_steps"]:
                raise StageError(f"metrics/{k}/eval.json has no result for {steps} steps; run `dvc repro evaluate@{k}`")
            rows.append({"row": k, "kind": "model", "steps": int(steps), "parameters": tr["parameters"],
                         "train_steps": tr["steps"], "train_tokens": tr["train_tokens"], "val_nelbo": tr["val_nelbo"],
                         "val_ppl": tr["val_ppl"], "bound": tr["bound"], "tokens_per_s": tr["tokens_per_s"],
                         "train_s": tr["train_seconds"], "sampler": sa["sampler"],
                         "nfe": sample_row["nfe_per_batch"], "sample_s": sample_row["wall_s"],
                         "evaluate_s": ev["wall_s"], "paper_ppl": table2.get(k, (None, ""))[0],
                         "paper_row": table2.get(k, (None, "–"))[1], "packing": params.data.packing,
                         **{c: ev["by_steps"][steps][c] for c in EVAL_COLS}, **{c: ev[c] for c in PROVENANCE}})
    ref = read_json(REFERENCE, "reference")
    for key in REFERENCE_ROWS:
        rows.append({"row": key, "kind": "reference", **{c: ref[key][c] for c in EVAL_COLS},
                     **{c: ref[c] for c in PROVENANCE}})
    df = pd.DataFrame(rows).astype({"steps": "Int64"})
    if df["evaluator"].nunique() > 1 or df["eval_dtype"].nunique() > 1 or df["protocol"].nunique() > 1:
        raise StageError("the metrics come from different evaluators, dtypes or gen PPL protocols; run `dvc repro` "
                         "so that every row is scored with the current eval.model, eval.dtype and eval.protocol")
    return df


def models(df: pd.DataFrame) -> pd.DataFrame:
    """The kernels' rows (one per kernel x sampling-step count)."""
    return df[df["kind"] == "model"]


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Per kernel, the row of its largest sampling-step count (the Table-2 view)."""
    m = models(df)
    return m.loc[m.groupby("row", sort=False)["steps"].idxmax()]
