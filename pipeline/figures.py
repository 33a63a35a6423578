"""The report's figures (PNG, no timestamps: the same metrics give the same bytes): training curves, gen PPL
against steps and entropy (paper Fig. 7), kernel dispersion against gradient variance (paper Fig. 3), and for a
synthetic run the distances to the true law (bound - H, sample NLL - H)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.artifacts import metrics_dir  # noqa: E402
from pipeline.results import REFERENCE_ROWS  # noqa: E402
from semdlm.config import Params  # noqa: E402


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
        label = r["kernel"] if r["kind"] == "reference" else f"{r['kernel']} @{int(r['steps'])}"
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
    for k, g in df[df["kind"] == "model"].groupby("kernel", sort=False):
        g = g.sort_values("steps")
        ax.plot(g["steps"], g["gen_ppl"], marker="o", label=k)
    steps = sorted(df[df["kind"] == "model"]["steps"].unique())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    for _, r in df[df["kind"] == "reference"].iterrows():
        ax.axhline(r["gen_ppl"], color="grey", ls="--", lw=1)
        ax.annotate(REFERENCE_ROWS[r["kernel"]], (steps[0], r["gen_ppl"]), fontsize=7, color="grey",
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


def plot_truth(params: Params, df: pd.DataFrame, law: dict, path: Path) -> None:
    """A synthetic run against its true law H (nats/token). Left: each kernel's training loss and validation bound
    over the steps, minus H (0 = the truth; dashed: the law's unigram line). Right, per kernel: bound - H (how far
    the model's likelihood is from the truth: asymptotic bias plus optimisation) and sample NLL - H at each step
    count (the exact NLL of its samples: that gap plus the exposure bias of the reverse chain)."""
    H, unigram = law["entropy_per_token"], law["unigram_entropy_per_token"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, k in enumerate(params.kernels):
        colour = f"C{i}"
        tr = pd.read_csv(metrics_dir(k) / "train_log.tsv", sep="\t")
        va = pd.read_csv(metrics_dir(k) / "val_log.tsv", sep="\t")
        a.plot(tr["step"], tr["loss"] - H, color=colour, alpha=0.5, lw=1)
        a.plot(va["step"], va["val_nelbo"] - H, color=colour, marker="o", label=k)
    a.axhline(unigram - H, color="grey", ls="--", lw=1, label="unigram line - H")
    a.axhline(0, color="black", lw=0.8)
    a.set_xlabel("step")
    a.set_ylabel("nats/token above H")
    a.set_title("training loss (faint) and validation bound, minus H")
    a.legend(fontsize=8)
    ours = df[df["kind"] == "model"]
    steps = sorted(ours["steps"].unique())
    width = 0.8 / (1 + len(steps))
    x = range(len(params.kernels))
    bound = [float(ours[ours["kernel"] == k]["bound_minus_entropy"].iloc[0]) for k in params.kernels]
    b.bar([i - 0.4 + width / 2 for i in x], bound, width, label="bound - H", color="grey")
    for j, s in enumerate(steps):
        gap = [ours[(ours["kernel"] == k) & (ours["steps"] == s)]["true_nll_minus_entropy"].iloc[0]
               for k in params.kernels]
        b.bar([i - 0.4 + width * (j + 1.5) for i in x], [float("nan") if pd.isna(g) else g for g in gap], width,
              label=f"sample NLL - H @{s} steps")
    b.axhline(unigram - H, color="grey", ls="--", lw=1)
    b.axhline(0, color="black", lw=0.8)
    b.set_xticks(list(x), list(params.kernels))
    b.set_ylabel("nats/token above H")
    b.set_title("distance to the true law (0 = the data's own)")
    b.legend(fontsize=8)
    save_figure(fig, path)
