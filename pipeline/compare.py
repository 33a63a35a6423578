"""compare: a cross-experiment table and figures from the MLflow store (not a DVC stage: it reads every run).

One row per (kernel run, sampling-step count) with the run's DVC experiment, kernel, sampler, λ_freq, λ_sem,
gen PPL, entropy and the entropy flag. Figures: gen PPL vs steps per run, gen PPL vs entropy, and the
λ_freq × λ_sem heatmaps of gen PPL and entropy (paper Figs. 4/5) for each kernel swept over both penalties.
With ``--x <param>``: validation PPL (bound) and gen PPL against a param that varies across the tracked runs
(paper Figs. 1-2 for ``--x kernels.semdlm_plus.gamma``).
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.common import StageError, atomic  # noqa: E402
from pipeline.figures import save_figure  # noqa: E402
from pipeline.tables import markdown_table  # noqa: E402
from pipeline.track import EXPERIMENT, tracking_uri  # noqa: E402

COMPARED = ("gen_ppl", "entropy", "below_min_entropy")
PARAMS = {"params.sampler.lambda_freq": "lambda_freq", "params.sampler.lambda_sem": "lambda_sem",
          "params.sampler.name": "sampler", "params.eval.model": "evaluator"}


def kernel_runs(uri: str) -> pd.DataFrame:
    """Every kernel (child) run of the semdlm experiment, newest first, via mlflow.search_runs."""
    import mlflow

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise StageError(f"no MLflow store at {uri}; run `dvc repro` (its track stage) first, or pass --tracking-uri")
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise StageError(f"no MLflow experiment {EXPERIMENT!r} at {uri}; run `dvc repro` (its track stage) first")
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.kernel != ''", order_by=["start_time DESC"])
    if runs.empty:
        raise StageError(f"the MLflow experiment {EXPERIMENT!r} at {uri} has no kernel runs; run `dvc repro` first")
    return runs


def table(runs: pd.DataFrame, uri: str) -> pd.DataFrame:
    """One row per kernel run and sampling-step count (metric histories are logged with step = steps)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    rows = []
    for _, run in runs.iterrows():
        history = {m: {h.step: h.value for h in client.get_metric_history(run["run_id"], m)} for m in COMPARED}
        base = {"run": run["tags.mlflow.runName"], "dvc_exp": run["tags.dvc_exp"], "kernel": run["tags.kernel"],
                **{short: run.get(col) for col, short in PARAMS.items()}}
        for steps in sorted(history["gen_ppl"]):
            rows.append({**base, "steps": steps, **{m: history[m].get(steps) for m in COMPARED}})
    df = pd.DataFrame(rows)
    for col in ("lambda_freq", "lambda_sem"):
        df[col] = df[col].astype(float)
    df["below_min_entropy"] = df["below_min_entropy"].astype(bool)
    return df


def plot_steps(df: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run, g in df.groupby("run", sort=True):
        ax.plot(g["steps"], g["gen_ppl"], marker="o", label=run)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("gen PPL (log scale)")
    ax.set_title("gen PPL vs sampling steps, every tracked run")
    ax.legend(fontsize=6)
    save_figure(fig, path)


def plot_entropy(df: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kernel, g in df.groupby("kernel", sort=True):
        ax.scatter(g["entropy"], g["gen_ppl"], label=kernel, s=25)
    ax.set_yscale("log")
    ax.set_xlabel("mean per-sample unigram entropy (nats)")
    ax.set_ylabel("gen PPL (log scale)")
    ax.set_title("gen PPL vs entropy, every tracked run and step count")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def sweep(df: pd.DataFrame, kernel: str) -> pd.DataFrame | None:
    """Newest run per (λ_freq, λ_sem) cell at the largest step count, when both penalties were varied."""
    g = df[df["kernel"] == kernel]
    g = g[g["steps"] == g["steps"].max()].drop_duplicates(["lambda_freq", "lambda_sem"])  # newest first
    if g["lambda_freq"].nunique() < 2 or g["lambda_sem"].nunique() < 2:
        return None
    return g


def plot_heatmap(g: pd.DataFrame, metric: str, title: str, path: Path) -> None:
    grid = g.pivot(index="lambda_freq", columns="lambda_sem", values=metric).sort_index().sort_index(axis=1)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    im = ax.imshow(grid.to_numpy(dtype=float), origin="lower", cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.1f}" if v < 1000 else f"{v:.0f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(grid.shape[1]), [f"{c:g}" for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{r:g}" for r in grid.index])
    ax.set_xlabel("λ_sem")
    ax.set_ylabel("λ_freq")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)


def against(runs: pd.DataFrame, x: str) -> pd.DataFrame:
    """Newest kernel run per (kernel, value of param ``x``): kernel, x, val_ppl and gen PPL per step count
    (the flat ``gen_ppl_<steps>steps`` metrics), sorted by x (numerically when every value is a number)."""
    col = f"params.{x}"
    if col not in runs.columns:
        raise StageError(f"no tracked run has the param {x!r}; --x takes a params.yaml key, e.g. "
                         "kernels.semdlm_plus.gamma")
    values = runs[col].dropna().unique()
    if len(values) < 2:
        raise StageError(f"param {x} does not vary across the tracked runs (always {values[0]}); queue a sweep first, "
                         f"e.g. dvc exp run --queue -S '{x}=<v1>,<v2>,<v3>' and dvc queue start")
    gen = {c: int(m.group(1)) for c in runs.columns if (m := re.fullmatch(r"metrics\.gen_ppl_(\d+)steps", c))}
    g = runs.dropna(subset=[col]).drop_duplicates(["tags.kernel", col])  # newest first
    df = pd.DataFrame({"kernel": g["tags.kernel"], x: g[col], "val_ppl": g["metrics.val_ppl"],
                       **{c.removeprefix("metrics."): g[c] for c, _ in sorted(gen.items(), key=lambda kv: kv[1])}})
    numeric = pd.to_numeric(df[x], errors="coerce")
    if numeric.notna().all():
        df[x] = numeric
    return df.sort_values(["kernel", x]).reset_index(drop=True)


def plot_against(df: pd.DataFrame, x: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    gen_cols = {c: int(m.group(1)) for c in df.columns if (m := re.fullmatch(r"gen_ppl_(\d+)steps", c))}
    for kernel, g in df.groupby("kernel", sort=True):
        xs = g[x] if pd.api.types.is_numeric_dtype(df[x]) else g[x].astype(str)
        axes[0].plot(xs, g["val_ppl"], marker="o", label=kernel)
        for c, steps in gen_cols.items():
            axes[1].plot(xs, g[c], marker="o", label=f"{kernel} @{steps} steps")
    for ax, name in zip(axes, ("validation PPL (bound)", "gen PPL"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(f"{name} (log scale)")
        ax.set_title(f"{name} vs {x}", fontsize=9)
        ax.legend(fontsize=6)
    save_figure(fig, path)


def run(out: Path, uri: str | None = None, x: str | None = None) -> pd.DataFrame:
    uri = uri or tracking_uri()
    runs = kernel_runs(uri)
    df = table(runs, uri)
    swept = against(runs, x) if x else None
    with atomic(out) as tmp:
        tmp.mkdir()
        df.to_csv(tmp / "compare.csv", index=False, float_format="%.6g")
        plot_steps(df, tmp / "genppl_steps.png")
        plot_entropy(df, tmp / "genppl_entropy.png")
        lines = ["# semdlm: every tracked run", "", f"MLflow store `{uri}`, experiment `{EXPERIMENT}`; "
                 "gen PPL and entropy per kernel run and sampling-step count (entropy < min: below eval.min_entropy).",
                 "", markdown_table(df, ["run", "kernel", "sampler", "lambda_freq", "lambda_sem", "steps", "gen_ppl",
                                         "entropy", "below_min_entropy", "evaluator"],
                                    ["run", "kernel", "sampler", "λ_freq", "λ_sem", "steps", "gen PPL", "entropy",
                                     "entropy < min", "evaluator"]),
                 "", "![gen PPL vs steps](genppl_steps.png)", "", "![gen PPL vs entropy](genppl_entropy.png)", ""]
        for kernel in sorted(df["kernel"].unique()):
            g = sweep(df, kernel)
            if g is None:
                continue
            steps = int(g["steps"].iloc[0])
            for metric, name, fig in (("gen_ppl", "gen PPL", 4), ("entropy", "entropy", 5)):
                plot_heatmap(g, metric, f"{kernel}: {name} at {steps} steps (paper Fig. {fig})",
                             tmp / f"heatmap_{metric}_{kernel}.png")
                lines += [f"![{kernel} {name} heatmap](heatmap_{metric}_{kernel}.png)", ""]
        if swept is not None:
            swept.to_csv(tmp / f"sweep_{x}.csv", index=False, float_format="%.6g")
            plot_against(swept, x, tmp / f"sweep_{x}.png")
            lines += [f"## Validation PPL (bound) and gen PPL against {x} (paper Figs. 1-2)", "",
                      f"Newest run per kernel and value of `{x}`: `sweep_{x}.csv`.", "", f"![sweep {x}](sweep_{x}.png)",
                      ""]
        (tmp / "compare.md").write_text("\n".join(lines))
    print(f"wrote {out / 'compare.md'}, compare.csv and figures ({len(df)} rows from {df['run'].nunique()} runs)")
    return df
