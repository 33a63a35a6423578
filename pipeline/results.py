"""The results of one experiment, collected once from the stages' metrics files (train.json, sample.json,
eval.json per kernel; reference.json): one table that summary, report and track all read.

Every number keeps one name here, in summary.json (``<name>_<steps>steps`` for a per-step-count number), in MLflow
and in results.csv: the names of the stage files (``val_ppl``, ``gen_ppl``, ``revisions``, ...)."""

from __future__ import annotations

import math

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
SAMPLE_COLS = ("revisions", "semantic_repetition")  # repair and the basin (sample.json, per step count)
TRUTH_COLS = ("true_nll", "true_ppl", "zero_prob_share", "true_nll_minus_entropy")  # data.source: synthetic only
# per kernel, from train.json: the primary bound, the Markov chains' continuous-time bound, the denoising PPL
TRAIN_COLS = ("val_nelbo", "val_ppl", "val_nelbo_ctmc", "val_denoising_ce", "val_denoising_ppl", "bound",
              "bound_label", "model", "kernel_type", "parameters", "train_tokens", "tokens_per_s", "train_s")


PER_KERNEL = ("val_ppl", "val_ppl_ctmc", "val_denoising_ppl", "bound_minus_entropy")  # summary.json, MLflow
PER_STEPS = ("gen_ppl", "entropy", "revisions", "semantic_repetition", "true_nll_minus_entropy")  # + _<steps>steps


def flat_name(metric: str, steps: int) -> str:
    """A per-step-count number's one name in summary.json and MLflow: gen_ppl_48steps."""
    return f"{metric}_{steps}steps"


def truth(reference: dict) -> dict | None:
    """The data law's exact numbers (reference.json's ``truth``: H per token, its unigram line), None unless the
    data's law is known (data.source: synthetic)."""
    return reference.get("truth")


def kernel_rows(k: str, tr: dict, sa: dict, ev: dict, table2: dict, law: dict | None) -> list[dict]:
    """One row per sampling-step count of kernel ``k``."""
    ctmc = tr.get("val_nelbo_ctmc")
    base = {"kernel": k, "kind": "model", **{c: tr.get(c) for c in TRAIN_COLS}, "train_steps": tr["steps"],
            "val_ppl_ctmc": None if ctmc is None else math.exp(ctmc), "sampler": sa["sampler"],
            "evaluate_s": ev["evaluate_s"], **{c: ev[c] for c in PROVENANCE}}
    paper_ppl, paper_row = table2.get(tr.get("kernel_type"), (None, "–")) if tr.get("model") == "paper" else (None, "–")
    base.update(paper_ppl=paper_ppl, paper_row=paper_row)
    if law is not None:
        base["bound_minus_entropy"] = tr["val_nelbo"] - law["entropy_per_token"]
    rows = []
    for steps, sample_row in sa["by_steps"].items():
        if steps not in ev["by_steps"]:
            raise StageError(f"metrics/{k}/eval.json has no result for {steps} steps; run `dvc repro evaluate@{k}`")
        scored = ev["by_steps"][steps]
        rows.append({**base, "steps": int(steps), "nfe": sample_row["nfe_per_batch"],
                     "sample_s": sample_row["sample_s"], **{c: sample_row[c] for c in SAMPLE_COLS},
                     **{c: scored[c] for c in EVAL_COLS},
                     **({c: scored.get(c) for c in TRUTH_COLS} if law is not None else {})})
    return sorted(rows, key=lambda r: r["steps"])


def collect(params: Params) -> pd.DataFrame:
    """One row per kernel x sampling-step count and per reference row, with every number the report shows.
    Paper Table 2 values only for a run on Table 2's dataset, and only for the paper's model."""
    table2 = paper.table2(params.data.source)
    ref = read_json(REFERENCE, "reference")
    law = truth(ref)
    rows = []
    for k in params.kernels:
        m = metrics_dir(k)
        tr, sa, ev = (read_json(m / f, f"{s}@{k}") for f, s in
                      (("train.json", "train"), ("sample.json", "sample"), ("eval.json", "evaluate")))
        rows += kernel_rows(k, tr, sa, ev, table2, law)
    for key in REFERENCE_ROWS:
        rows.append({"kernel": key, "kind": "reference", **{c: ref[key][c] for c in EVAL_COLS},
                     **({c: ref[key].get(c) for c in TRUTH_COLS} if law is not None else {}),
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
    return m.loc[m.groupby("kernel", sort=False)["steps"].idxmax()]
