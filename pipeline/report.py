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

from pipeline.artifacts import (  # noqa: E402
    DISPERSION,
    PRIOR_METRICS,
    REFERENCE,
    load_vocab,
    metrics_dir,
    samples_path,
)
from pipeline.common import StageError, atomic, read_json, read_parquet  # noqa: E402
from pipeline.evaluate import PROTOCOLS, decode  # noqa: E402
from semdlm.config import Params  # noqa: E402

REPORTS = Path("reports")
FIGURES = REPORTS / "figures"
PACKINGS = {"wrap": "BD3-LM's wrap (every document followed by [CLS], rows [CLS] + L-2 tokens + [CLS])",
            "cls_sep": "[CLS] doc [SEP] per document, the stream cut into rows of L"}
REFERENCE_ROWS = {"heldout_text": "held-out text (floor)", "unigram_samples": "unigram samples (ceiling)"}
# The paper's Table 2 (LM1B test PPL, 110M parameters, 200k steps), by our kernel name, with its source row.
PAPER_TABLE2 = {
    "mask": (31.78, "Masking DLM (MDLM)"),
    "uniform": (88.03, "Uniform DLM (D3PM)"),
    "knn": (149.50, "SemDLM (KNN)"),
    "semdlm_plus": (27.19, "SemDLM+"),
}
# The paper's Table 3 (gen PPL by GPT-2 Large, entropy >= 4.8), per dataset: its step counts and, by our kernel
# name, the source row and its values. LM1B: 128-token samples, D3PM (Uniform) has no 128-step value ("/" in the
# paper); OWT: 1,024-token samples. SemDLM (KNN) has no row.
PAPER_TABLE3 = {
    "lm1b": ((128, 256, 512), {
        "mask": ("MDLM (no remasking)", {128: 93.69, 256: 85.24, 512: 78.02}),
        "uniform": ("D3PM (Uniform)", {256: 150.37, 512: 133.92}),
        "semdlm_plus": ("SemDLM+", {128: 74.52, 256: 54.08, 512: 36.60}),
    }),
    "openwebtext": ((128, 256, 512, 1024), {
        "mask": ("MDLM (no remasking)", {128: 76.50, 256: 64.20, 512: 50.70, 1024: 43.00}),
        "uniform": ("D3PM (Uniform)", {128: 407.72, 256: 146.89, 512: 112.86, 1024: 96.46}),
        "semdlm_plus": ("SemDLM+", {128: 64.39, 256: 62.72, 512: 41.91, 1024: 34.37}),
    }),
}
PAPER_NAMES = {"lm1b": "LM1B", "openwebtext": "OWT"}
# written next to every gen PPL, carried into results.csv
PROVENANCE = ("evaluator", "eval_dtype", "protocol", "min_entropy_applies")
EVAL_COLS = ("gen_ppl", "entropy", "distinct_1", "distinct_2", "distinct_3", "repeated_4gram", "below_min_entropy",
             "eval_tokens", "num_texts")


def collect(params: Params) -> pd.DataFrame:
    """One row per kernel x sampling-step count and per reference row, with every number the report shows.
    Paper Table 2 values only for an LM1B run (the only dataset of Table 2)."""
    table2 = PAPER_TABLE2 if params.data.source == "lm1b" else {}
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


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Per kernel, the row of its largest sampling-step count (the Table-2 view)."""
    models = df[df["kind"] == "model"]
    return models.loc[models.groupby("row", sort=False)["steps"].idxmax()]


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
        cells = ["–" if r[c] is None or (np.ndim(r[c]) == 0 and pd.isna(r[c])) else _fmt(r[c], digits) for c in cols]
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
    save_figure(fig, path)


def save_figure(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def plot_ppl_entropy(df: pd.DataFrame, min_entropy: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for _, r in df.iterrows():
        marker = "s" if r["kind"] == "reference" else "o"
        label = r["row"] if r["kind"] == "reference" else f"{r['row']} @{int(r['steps'])}"
        ax.scatter(r["entropy"], r["gen_ppl"], marker=marker, s=50)
        ax.annotate(label, (r["entropy"], r["gen_ppl"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.axvline(min_entropy, color="grey", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("mean per-sample unigram entropy (nats)")
    ax.set_ylabel("gen PPL (log scale)")
    ax.set_title("gen PPL vs entropy (dashed: eval.min_entropy)")
    save_figure(fig, path)


def plot_ppl_steps(df: pd.DataFrame, path: Path) -> None:
    """Fig. 7: gen PPL against the number of sampling steps, one line per kernel, reference rows dashed."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k, g in df[df["kind"] == "model"].groupby("row", sort=False):
        g = g.sort_values("steps")
        ax.plot(g["steps"], g["gen_ppl"], marker="o", label=k)
    steps = sorted(df[df["kind"] == "model"]["steps"].unique())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    for _, r in df[df["kind"] == "reference"].iterrows():
        ax.axhline(r["gen_ppl"], color="grey", ls="--", lw=1)
        ax.annotate(REFERENCE_ROWS[r["row"]], (steps[0], r["gen_ppl"]), fontsize=7, color="grey",
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("gen PPL (log scale)")
    ax.set_title("gen PPL vs sampling steps (paper Fig. 7)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_dispersion(disp: dict, path: Path) -> None:
    """Fig. 3: left h(t; Q) per kernel; right D(Q) against the between-t gradient variance (bars: noise term)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, d in disp.items():
        a.plot(d["times"], d["posterior_entropy"], marker=".", label=k)
        b.errorbar(d["dispersion"], d["grad_var_between"], yerr=d["grad_noise"], fmt="o", capsize=3, label=k)
        b.annotate(k, (d["dispersion"], d["grad_var_between"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    a.set_xlabel("t")
    a.set_ylabel("h(t; Q) (nats)")
    a.set_title("posterior entropy trajectory")
    a.legend(fontsize=8)
    b.axhline(0, color="grey", lw=0.8)
    b.set_xlabel("kernel dispersion D(Q) = Var_t h(t; Q)")
    b.set_ylabel("between-t gradient variance")
    b.set_title("dispersion vs gradient variance (paper Fig. 3)")
    save_figure(fig, path)


def table3(params: Params, df: pd.DataFrame) -> str:
    """Gen PPL and entropy per kernel x our step counts, then the paper's columns of this run's dataset (Table 3:
    LM1B or OWT; none for any other data), separate and labelled."""
    steps = params.sampler.step_counts
    models = df[df["kind"] == "model"]
    protocol = models["protocol"].iloc[0]
    paper_steps, paper_rows = PAPER_TABLE3.get(params.data.source, ((), {}))
    names = ["kernel"] + [f"ours: {h} @{s}" + (f" ({protocol})" if h == "gen PPL" else "") for s in steps
                          for h in ("gen PPL", "entropy")]
    if paper_steps:
        names += ["paper row"] + [f"paper: {PAPER_NAMES[params.data.source]} gen PPL @{s}" for s in paper_steps]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for k in params.kernels:
        cells = [k]
        for s in steps:
            r = models[(models["row"] == k) & (models["steps"] == s)].iloc[0]
            cells += [_fmt(float(r["gen_ppl"])) + (" *" if r["below_min_entropy"] else ""), _fmt(float(r["entropy"]))]
        if paper_steps:
            paper_row, paper = paper_rows.get(k, ("–", {}))
            cells += [paper_row] + [_fmt(paper[s]) if s in paper else "–" for s in paper_steps]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table2(params: Params, models: pd.DataFrame) -> str:
    """Our validation bound per kernel; the paper's Table 2 columns only for an LM1B run."""
    top = max(params.sampler.step_counts)
    cols = ["row", "val_ppl", "gen_ppl", "entropy"]
    names = ["kernel", "ours: val PPL (bound)", f"ours: gen PPL @{top}", f"ours: entropy @{top}"]
    if params.data.source != "lm1b":
        return markdown_table(models, cols, names, 2) + (
            f"\n\nNo paper column: the paper's Table 2 is LM1B test PPL, and this run's data is "
            f"`{params.data.source}`.")
    return markdown_table(models, cols + ["paper_ppl", "paper_row"], names + ["paper: LM1B test PPL", "paper row"],
                          2) + (
        "\n\nPaper columns are Table 2 of arXiv 2606.15327 (LM1B, 110M parameters, 200k steps); they are printed "
        "for orientation only and are **not** comparable with ours unless data, scale and, for knn / semdlm_plus, "
        "the bound match (see docs/likelihood.md).")


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
    if params.data.source in PAPER_TABLE3:
        name = PAPER_NAMES[params.data.source]
        L = 128 if params.data.source == "lm1b" else 1024
        return (f"Paper columns: Table 3, {name}, GPT-2 Large, {L}-token samples (this run's dataset); other steps and "
                "scale than ours may apply.")
    return (f"No paper columns: the paper's tables are for LM1B and OWT, and this run's data is "
            f"`{params.data.source}`.")


def render(params: Params, df: pd.DataFrame, unigram_ce: float, disp: dict, examples: dict[str, list[str]]) -> str:
    models = headline(df)
    every = df[df["kind"] == "model"]
    refs = df[df["kind"] == "reference"].replace({"row": REFERENCE_ROWS})
    p = models.iloc[0]
    sa = params.sampler
    applies = bool(df["min_entropy_applies"].all())
    steps = ", ".join(str(s) for s in sa.step_counts)
    dtab = pd.DataFrame([{"row": k, **d} for k, d in disp.items()])
    out = [
        "# semdlm report",
        "",
        f"> **Scale warning.** This run used data `{params.data.source}`, sequences of {params.data.seq_len} tokens, "
        f"a {_fmt(int(p['parameters']))}-parameter denoiser trained for {_fmt(int(p['train_steps']))} steps "
        f"({_fmt(int(p['train_tokens']))} tokens). The paper trains 110M parameters for 200k steps on LM1B/OWT. "
        "At this scale the numbers show that every stage works; they are not a reproduction of the paper, and "
        "differences between kernels here say little about the paper's claims.",
        "",
        "## Settings",
        "",
        f"- Evaluator `{p['evaluator']}` ({p['eval_dtype']}); gen PPL protocol `{p['protocol']}`: "
        f"{PROTOCOLS[p['protocol']]} (eval.protocol; docs/evaluation.md).",
        f"- Data packing `{params.data.packing}`: {PACKINGS[params.data.packing]} (data.packing).",
        f"- Sampler `{sa.name}`, sampling steps {steps} (paper: 128/256/512 on LM1B, 128/256/512/1,024 on OWT; the "
        f"embedded default uses fewer so that `dvc repro` stays within its time budget), {sa.num_samples} samples of "
        f"{params.data.seq_len} tokens per step count, λ_freq = {sa.lambda_freq}, λ_sem = {sa.lambda_sem}.",
        f"- Seeds: data {params.data.seed}, train {params.train.seed}, sampler {sa.seed}, "
        f"dispersion {params.dispersion.seed}.",
        f"- Model: {_fmt(int(p['parameters']))} parameters (d_model {params.model.d_model}, "
        f"{params.model.n_layers} layers), {_fmt(int(p['train_steps']))} training steps per kernel, "
        f"{_fmt(int(p['train_tokens']))} training tokens per kernel.",
        "",
        "## Likelihood (validation, Table 2)",
        "",
        f"Unigram cross-entropy of the validation split (train counts, add-one): **{unigram_ce:.3f} nats/token**. "
        "A model that learned nothing from context sits at this line; a broken one far above it.",
        "",
        table2(params, models),
        "",
        markdown_table(models, ["row", "val_nelbo", "bound", "parameters", "train_tokens", "tokens_per_s"],
                       ["kernel", "val NELBO (nats/tok)", "bound", "params", "train tokens", "train tok/s"], 3),
        "",
        "## Generation (Table 3)",
        "",
        entropy_note(params, applies),
        "",
        paper_note(params),
        "",
        table3(params, df),
        "",
        "Every step count, with diversity (distinct-n pooled over samples; rep. 4-gram: mean share of a sample's "
        "4-grams that occur more than once in it, the \"semantic basin\" signature), and the reference rows "
        "scored by the same code:",
        "",
        markdown_table(pd.concat([every, refs]).assign(
                           below_min_entropy=lambda d: d["below_min_entropy"] if applies else "n/a"),
                       ["row", "steps", "protocol", "gen_ppl", "entropy", "below_min_entropy", "distinct_1",
                        "distinct_2", "distinct_3", "repeated_4gram", "nfe", "sample_s"],
                       ["row", "steps", "gen PPL protocol", "gen PPL", "entropy", "entropy < min", "distinct-1",
                        "distinct-2", "distinct-3", "rep. 4-gram", "NFE/batch", "sample s"]),
        "",
        "![gen PPL vs steps](figures/genppl_steps.png)",
        "",
        "![gen PPL vs entropy](figures/genppl_entropy.png)",
        "",
        "The λ_freq × λ_sem heatmaps (paper Figs. 4/5) come from a sweep of DVC experiments: see the README "
        "(`dvc exp run --queue -S ...`, then `python -m pipeline compare`).",
        "",
        "## Kernel dispersion and gradient variance (Fig. 3, App. B.6)",
        "",
        f"h(t; Q): mean entropy of the per-token posterior q(x_0 | x_t) under the train unigram, x_t drawn by the "
        f"kernel from {2 * params.dispersion.sequences} validation sequences at {params.dispersion.times} midpoint "
        "times; D(Q) = Var_t h(t; Q). Gradient: d/dθ of the mean denoising CE at time t at the trained parameters, "
        "on two independent halves; between-t variance = Var_t of the per-t mean gradient minus its estimated noise "
        "(the noise column). A between-t value within its noise term is not resolved at this sample size.",
        "",
        markdown_table(dtab, ["row", "dispersion", "mean_posterior_entropy", "grad_var_between", "grad_noise"],
                       ["kernel", "D(Q)", "mean h(t; Q)", "between-t grad variance", "noise term"], 4),
        "",
        "![dispersion vs gradient variance](figures/dispersion.png)",
        "",
        "## Training",
        "",
        "![training curves](figures/training.png)",
        "",
        "## Samples",
        "",
        f"First samples of each kernel at {max(sa.step_counts)} steps, decoded as they are scored (special tokens "
        "such as [UNK] and [CLS] shown as text).",
        "",
    ]
    for k, texts in examples.items():
        out.append(f"**{k}**")
        out.append("")
        out += [f"- {t[:300]}{'…' if len(t) > 300 else ''}" for t in texts]
        out.append("")
    walls = models.assign(sample_s=every.groupby("row", sort=False)["sample_s"].sum().reindex(models["row"]).values,
                          dispersion_s=[disp[k]["wall_s"] for k in models["row"]])
    out += ["## Stage wall times (s)", "",
            "Measured inside each stage (model/evaluator loading included; process start-up not).", "",
            markdown_table(walls, ["row", "train_s", "sample_s", "evaluate_s", "dispersion_s"],
                           ["kernel", "train", f"sample (all of {steps} steps)", "evaluate", "dispersion"], 1), ""]
    return "\n".join(out)


def run(params: Params) -> None:
    df = collect(params)
    if df.empty:
        raise StageError("no metrics to report; run `dvc repro` first")
    unigram_ce = read_json(PRIOR_METRICS, "prior")["unigram_valid_ce"]
    disp = read_json(DISPERSION, "dispersion")
    missing = [k for k in params.kernels if k not in disp]
    if missing:
        raise StageError(f"{DISPERSION} has no entry for {', '.join(missing)}; run `dvc repro dispersion`")
    disp = {k: disp[k] for k in params.kernels}
    top = max(params.sampler.step_counts)
    vocab, examples = load_vocab(), {}
    for k in params.kernels:
        samples = read_parquet(samples_path(k), f"sample@{k}")
        examples[k] = decode(vocab, [list(r) for r in samples[samples["steps"] == top]["ids"].head(3)])
    REPORTS.mkdir(exist_ok=True)
    with atomic(FIGURES) as tmp:
        tmp.mkdir()
        plot_training(params, unigram_ce, tmp / "training.png")
        plot_ppl_entropy(df, params.eval.min_entropy, tmp / "genppl_entropy.png")
        plot_ppl_steps(df, tmp / "genppl_steps.png")
        plot_dispersion(disp, tmp / "dispersion.png")
    with atomic(REPORTS / "results.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    with atomic(REPORTS / "report.md") as tmp:
        tmp.write_text(render(params, df, unigram_ce, disp, examples))
    print(json.dumps({"report": str(REPORTS / "report.md")}))
