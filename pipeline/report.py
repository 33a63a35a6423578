"""report: reports/report.md, reports/results.csv and PNG figures, rebuilt from the metrics files only.

The page is assembled here from its sections; the numbers come from ``pipeline.results``, the tables from
``pipeline.tables``, the figures from ``pipeline.figures``. The same metrics give a byte-identical report.md (no
clock, no absolute paths).
"""

from __future__ import annotations

import json

import pandas as pd

from pipeline import figures
from pipeline.artifacts import DISPERSION, FIGURES, PRIOR_METRICS, REFERENCE, REPORTS, load_vocab, samples_path
from pipeline.common import StageError, atomic, read_json, read_parquet
from pipeline.results import REFERENCE_ROWS, collect, headline, models, truth
from pipeline.tables import entropy_note, fmt, markdown_table, paper_note, table2, table3, truth_table
from pipeline.text import decode
from semdlm.config import SYNTHETIC, Params

PACKING_TEXT = {"wrap": "BD3-LM's wrap (every document followed by [CLS], rows [CLS] + L-2 tokens + [CLS])",
            "cls_sep": "[CLS] doc [SEP] per document, the stream cut into rows of L"}


def scale_warning(params: Params, top: pd.Series) -> list[str]:
    run = (f"This run used data `{params.data.source}`, sequences of {params.data.seq_len} tokens, a "
           f"{fmt(int(top['parameters']))}-parameter denoiser trained for {fmt(int(top['train_steps']))} steps "
           f"({fmt(int(top['train_tokens']))} tokens). The paper trains 110M parameters for 200k steps on LM1B/OWT. ")
    if params.data.source == SYNTHETIC:
        verdict = ("The numbers are not a reproduction of the paper's: they measure each kernel on a language whose "
                   "law is known, at this scale (section *Against the true law*); the evaluator LM's gen PPL means "
                   "little on it (compare its held-out text row).")
    else:
        verdict = ("At this scale the numbers show that every stage works; they are not a reproduction of the paper, "
                   "and differences between kernels here say little about the paper's claims.")
    return [f"> **Scale warning.** {run}{verdict}", ""]


def settings(params: Params, top: pd.Series) -> list[str]:
    sa = params.sampler
    steps = ", ".join(str(s) for s in sa.step_counts)
    return [
        "## Settings", "",
        f"- Evaluator `{top['evaluator']}` ({top['eval_dtype']}); gen PPL protocol `{top['protocol']}`: "
        f"{top['protocol_detail']} (eval.protocol; docs/evaluation.md).",
        f"- Data packing `{params.data.packing}`: {PACKING_TEXT[params.data.packing]} (data.packing).",
        f"- Sampler `{sa.name}`, sampling steps {steps} (paper: 128/256/512 on LM1B, 128/256/512/1,024 on OWT; the "
        f"embedded default uses fewer so that `dvc repro` stays within its time budget), {sa.num_samples} samples of "
        f"{params.data.seq_len} tokens per step count, λ_freq = {sa.lambda_freq}, λ_sem = {sa.lambda_sem}.",
        f"- Seeds: data {params.data.seed}, train {params.train.seed}, sampler {sa.seed}, "
        f"dispersion {params.dispersion.seed}.",
        f"- Model: {fmt(int(top['parameters']))} parameters (d_model {params.model.d_model}, "
        f"{params.model.n_layers} layers), {fmt(int(top['train_steps']))} training steps per kernel, "
        f"{fmt(int(top['train_tokens']))} training tokens per kernel.", ""]


def likelihood(params: Params, top: pd.DataFrame, unigram_ce: float) -> list[str]:
    return [
        "## Likelihood (validation, Table 2)", "",
        f"Unigram cross-entropy of the validation split (train counts, add-one): **{unigram_ce:.3f} nats/token**. "
        "A model that learned nothing from context sits at this line; a broken one far above it.", "",
        "Each kernel's model (*x_t only*: the paper's, the denoiser sees x_t alone; *x_t + latent state*: ours, "
        "the latent-state extension) has one "
        "valid bound on the NLL of the chain its samplers draw from, named in its row. The Markov chains (mask, "
        "uniform) also have their continuous-time bound. knn and SemDLM+ have no Markov x_t chain with Eq. 117's "
        "marginals, so their x_t-only bound is valid but not tight (docs/likelihood.md). The denoising PPL is exp "
        "of E_t mean_i -log p_theta(x_0^i | x_t), t ~ U(0, 1): the paper's Table 2 metric as we read it; **not a "
        "likelihood bound**.", "",
        table2(params, top), "",
        markdown_table(top, ["kernel", "val_nelbo", "val_nelbo_ctmc", "val_denoising_ce", "parameters",
                             "train_tokens", "tokens_per_s"],
                       ["kernel", "val NELBO (nats/tok)", "continuous-time NELBO", "denoising CE (not a bound)",
                        "params", "train tokens", "train tok/s"], 3), ""]


def generation(params: Params, df: pd.DataFrame) -> list[str]:
    applies = bool(df["min_entropy_applies"].all())
    refs = df[df["kind"] == "reference"].replace({"kernel": REFERENCE_ROWS})
    every = pd.concat([models(df), refs]).assign(
        below_min_entropy=lambda d: d["below_min_entropy"] if applies else "n/a")
    return [
        "## Generation (Table 3)", "",
        entropy_note(params, applies), "",
        "Repair and the basin: *revisions* is the mean number of times a position's token changes after it first "
        "held a data token (0 for mask by construction: an unmasked token is final); *sem. rep.* (semantic "
        "repetition) is the share of tokens that have themselves or one of their graph neighbours elsewhere within "
        f"±{params.sampler.window} positions (sampler.window), Sec. 4.1's basin signature.", "",
        paper_note(params), "",
        table3(params, df), "",
        "Every step count, with diversity (distinct-n pooled over samples; rep. 4-gram: mean share of a sample's "
        "4-grams that occur more than once in it) beside semantic repetition, and the reference rows scored by the "
        "same code:", "",
        markdown_table(every, ["kernel", "steps", "protocol", "gen_ppl", "entropy", "below_min_entropy", "distinct_1",
                               "distinct_2", "distinct_3", "repeated_4gram", "semantic_repetition", "revisions",
                               "nfe", "sample_s"],
                       ["row", "steps", "gen PPL protocol", "gen PPL", "entropy", "entropy < min", "distinct-1",
                        "distinct-2", "distinct-3", "rep. 4-gram", "sem. rep.", "revisions", "NFE/batch",
                        "sample s"]), "",
        "![gen PPL vs steps](figures/genppl_steps.png)", "",
        "![gen PPL vs entropy](figures/genppl_entropy.png)", "",
        "The λ_freq × λ_sem heatmaps (paper Figs. 4/5) come from a sweep of DVC experiments: see "
        "docs/experiments.md (`dvc exp run --queue -S ...`, then `python -m pipeline compare`).", ""]


def true_law(params: Params, df: pd.DataFrame, law: dict) -> list[str]:
    """The section of a synthetic run: every kernel measured against the data's exact law."""
    held = law["heldout_split"]
    return [
        "## Against the true law (data.source: synthetic)", "",
        f"The data is a language whose law is known exactly (semdlm/synthetic.py): entropy **H = "
        f"{law['entropy_per_token']:.3f} nats/token**; its unigram line (the best a model without context can do) "
        f"is {law['unigram_entropy_per_token']:.3f}. The whole held-out split ({held['rows']:,} rows) scores "
        f"{held['true_nll']:.3f} ± {held['true_nll_se']:.3f} under the law, as it should (≈ H).", "",
        "How to read it: *bound − H* is how far the model's likelihood bound sits from the truth (the kernel's "
        "asymptotic bias, its bound's own slack, and what training has not reached yet); *sample NLL − H* is the "
        "exact NLL of its samples under the law minus H: that gap plus the error the reverse chain compounds "
        "(exposure bias), a gen PPL without an evaluator's own error. It covers the samples the law gives "
        "non-zero probability; *p = 0 share* is the share it gives probability zero (e.g. a frame token inside "
        "a row, or two words no state emits together). The reference rows are held-out text (≈ 0) and unigram "
        "samples.", "",
        "Two mechanisms put samples at p = 0. (1) At t = 1 the x_t-only denoiser sees identical [MASK] tokens, and "
        "with rotary (relative) positions and identical values every position gets the same prediction, so a "
        "frame token ([CLS], [SEP]) can be revealed at any position; masking cannot revise a revealed token, "
        "the Markov uniform chain and SemDLM+ can. (2) A kernel without a global jump (knn) moves a token only "
        "through neighbourhoods, from a t = 1 draw that does not depend on position: where no neighbourhood of "
        "that draw leads to a frame token, no sample gets its frame right (p = 0 share 1), the missing jump that "
        "SemDLM+ adds (Sec. 4.2).", "",
        truth_table(params, df, law), "",
        "![distance to the true law](figures/truth.png)", ""]


def dispersion(params: Params, disp: dict) -> list[str]:
    table = pd.DataFrame([{"kernel": k, **d} for k, d in disp.items()])
    return [
        "## Kernel dispersion and gradient variance (Fig. 3, App. B.6)", "",
        "h(t; Q): mean entropy of the per-token posterior of x_0 in the kernel's model (given x_t alone in the "
        "paper's; given x_t and the latent state in ours) under the train unigram, x_t drawn by the "
        f"kernel from {2 * params.dispersion.sequences} validation sequences at {params.dispersion.times} midpoint "
        "times; D(Q) = Var_t h(t; Q). Gradient: d/dθ of the mean denoising CE at time t of the same model at its "
        "trained parameters, "
        "on two independent halves; between-t variance = Var_t of the per-t mean gradient minus its estimated noise "
        "(the noise column). A between-t value within its noise term is not resolved at this sample size.", "",
        markdown_table(table, ["kernel", "model", "dispersion", "mean_posterior_entropy", "grad_var_between",
                               "grad_noise"],
                       ["kernel", "model", "D(Q)", "mean h(t; Q)", "between-t grad variance", "noise term"], 4), "",
        "![dispersion vs gradient variance](figures/dispersion.png)", ""]


def samples(params: Params, examples: dict[str, list[str]]) -> list[str]:
    out = ["## Training", "", "![training curves](figures/training.png)", "", "## Samples", "",
           f"First samples of each kernel at {max(params.sampler.step_counts)} steps, decoded as they are scored "
           "(special tokens such as [UNK] and [CLS] shown as text).", ""]
    for k, texts in examples.items():
        out += [f"**{k}**", "", *(f"- {t[:300]}{'…' if len(t) > 300 else ''}" for t in texts), ""]
    return out


def wall_times(params: Params, df: pd.DataFrame, disp: dict) -> list[str]:
    top, every = headline(df), models(df)
    walls = top.assign(sample_s=every.groupby("kernel", sort=False)["sample_s"].sum().reindex(top["kernel"]).values,
                       dispersion_s=[disp[k]["dispersion_s"] for k in top["kernel"]])
    steps = ", ".join(str(s) for s in params.sampler.step_counts)
    return ["## Stage wall times (s)", "",
            "Measured inside each stage (model/evaluator loading included; process start-up not).", "",
            markdown_table(walls, ["kernel", "train_s", "sample_s", "evaluate_s", "dispersion_s"],
                           ["kernel", "train", f"sample (all of {steps} steps)", "evaluate", "dispersion"], 1), ""]


def render(params: Params, df: pd.DataFrame, unigram_ce: float, disp: dict, examples: dict[str, list[str]],
           law: dict | None) -> str:
    top = headline(df)
    first = top.iloc[0]
    return "\n".join(["# semdlm report", "", *scale_warning(params, first), *settings(params, first),
                       *likelihood(params, top, unigram_ce), *generation(params, df),
                       *(true_law(params, df, law) if law is not None else []), *dispersion(params, disp),
                       *samples(params, examples), *wall_times(params, df, disp)])


def run(params: Params) -> None:
    df = collect(params)
    if df.empty:
        raise StageError("no metrics to report; run `dvc repro` first")
    unigram_ce = read_json(PRIOR_METRICS, "prior")["unigram_validation_ce"]
    disp = read_json(DISPERSION, "dispersion")
    missing = [k for k in params.kernels if k not in disp]
    if missing:
        raise StageError(f"{DISPERSION} has no entry for {', '.join(missing)}; run `dvc repro dispersion`")
    disp = {k: disp[k] for k in params.kernels}
    top = max(params.sampler.step_counts)
    vocab, examples = load_vocab(), {}
    for k in params.kernels:
        rows = read_parquet(samples_path(k), f"sample@{k}")
        examples[k] = decode(vocab, [list(r) for r in rows[rows["steps"] == top]["ids"].head(3)])
    law = truth(read_json(REFERENCE, "reference"))
    REPORTS.mkdir(exist_ok=True)
    with atomic(FIGURES) as tmp:
        tmp.mkdir()
        figures.plot_training(params, unigram_ce, tmp / "training.png")
        figures.plot_ppl_entropy(df, params.eval.min_entropy, tmp / "genppl_entropy.png")
        figures.plot_ppl_steps(df, tmp / "genppl_steps.png")
        figures.plot_dispersion(disp, tmp / "dispersion.png")
        if law is not None:
            figures.plot_truth(params, df, law, tmp / "truth.png")
    with atomic(REPORTS / "results.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    with atomic(REPORTS / "report.md") as tmp:
        tmp.write_text(render(params, df, unigram_ce, disp, examples, law))
    print(json.dumps({"report": str(REPORTS / "report.md")}))
