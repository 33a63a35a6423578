"""Typer app: one command per DVC stage. Run ``python -m pipeline --help``."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import typer  # noqa: E402

from pipeline.common import stage  # noqa: E402
from semdlm.config import load_params  # noqa: E402

app = typer.Typer(
    name="pipeline",
    help="semdlm pipeline stages (tokenize -> prior -> graph -> train -> sample -> evaluate -> summary, report -> "
         "track).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
ParamsOpt = typer.Option("params.yaml", "--params", help="params file (DVC passes params.yaml)")
KernelOpt = typer.Option(..., "--kernel", "-k", help="kernel name: a key of the [bold]kernels[/] section")


@app.command()
@stage
def tokenize(params: str = ParamsOpt) -> None:
    """Tokenize the corpus ([bold]data[/] section) into packed train/validation sequences."""
    from pipeline import tokenize as m

    m.run(load_params(params).data)


@app.command()
@stage
def graph(params: str = ParamsOpt) -> None:
    """Cosine kNN table of the vocabulary's word embeddings ([bold]graph[/] section)."""
    from pipeline import graph as m

    m.run(load_params(params).graph)


@app.command()
@stage
def prior(params: str = ParamsOpt) -> None:
    """Unigram counts, valid-vocabulary mask and global-jump nu ([bold]prior[/] section)."""
    from pipeline import prior as m

    m.run(load_params(params).prior)


@app.command()
@stage
def train(kernel: str = KernelOpt, params: str = ParamsOpt) -> None:
    """Train the denoiser for one kernel ([bold]model[/], [bold]train[/], [bold]kernels.<name>[/]); resumes.

    With train.devices > 1 it re-launches itself under torchrun (DDP, one process per device)."""
    from pipeline import train as m

    m.launch(params, kernel)


@app.command()
@stage
def dispersion(params: str = ParamsOpt) -> None:
    """Fig. 3 data: posterior-entropy trajectory, dispersion D(Q) and between-t gradient variance per kernel."""
    from pipeline import dispersion as m

    m.run(load_params(params))


@app.command()
@stage
def sample(kernel: str = KernelOpt, params: str = ParamsOpt) -> None:
    """Draw samples from a trained kernel's model ([bold]sampler[/] section)."""
    from pipeline import sample as m

    m.run(load_params(params), kernel)


@app.command()
@stage
def evaluator_lm(params: str = ParamsOpt) -> None:
    """Prepare the evaluator LM once ([bold]eval.model[/]) into models/evaluator/."""
    from pipeline import evaluator_lm as m

    m.prepare(load_params(params).eval)


@app.command()
@stage
def evaluate(kernel: str = KernelOpt, params: str = ParamsOpt) -> None:
    """Gen PPL, entropy and distinct-n of a kernel's samples ([bold]eval[/] section)."""
    from pipeline import evaluate as m

    m.run(load_params(params).eval, kernel)


@app.command()
@stage
def reference(params: str = ParamsOpt) -> None:
    """Score the reference rows: held-out text and unigram samples ([bold]eval[/] section)."""
    from pipeline import evaluate as m

    p = load_params(params)
    m.reference(p.eval, p.sampler.seed)


@app.command()
@stage
def report(params: str = ParamsOpt) -> None:
    """Write reports/report.md, reports/results.csv and reports/figures/*.png from the metrics."""
    from pipeline import report as m

    m.run(load_params(params))


@app.command()
@stage
def summary(params: str = ParamsOpt) -> None:
    """Write results/summary.json (the DVC metrics: val PPL, gen PPL, entropy per kernel) and results/*.tsv."""
    from pipeline import summary as m

    m.run(load_params(params))


@app.command()
@stage
def track(params: str = ParamsOpt) -> None:
    """Mirror params and metrics to MLflow (one parent run per DVC experiment, a child per kernel)."""
    from pipeline import track as m

    m.run(load_params(params))


@app.command()
@stage
def compare(out: str = typer.Option("reports/compare", "--out", help="folder for compare.md, .csv and PNGs"),
            tracking_uri: str = typer.Option(None, "--tracking-uri",
                                             help="MLflow store (default: MLFLOW_TRACKING_URI, else mlflow.db)"),
            x: str = typer.Option(None, "--x", help="a param that varies across the runs, e.g. "
                                  "kernels.semdlm_plus.gamma: adds val PPL and gen PPL against it (paper Figs. 1-2)"),
            ) -> None:
    """Table + figures across every tracked run (kernel x λ_sem x steps x gen PPL x entropy), from MLflow."""
    from pathlib import Path

    from pipeline import compare as m

    m.run(Path(out), tracking_uri, x)


@app.command()
@stage
def plots(revs: list[str] = typer.Argument(None, help="revisions / experiments to compare (default: workspace)"),
          out: str = typer.Option("dvc_plots/index.html", "--out", help="the HTML page to write")) -> None:
    """dvc.yaml's plots as one self-contained HTML page (static SVG, opens offline); like `dvc plots diff`."""
    from pathlib import Path

    from pipeline import plots as m

    m.run(Path(out), revs or [])


@app.command("use-profile")
@stage
def use_profile(profile: str = typer.Argument(..., help="a profile, e.g. params/cpu-study.yaml"),
                params: str = ParamsOpt) -> None:
    """Merge a parameter profile into params.yaml (validated first); then `dvc repro` or `dvc exp run`."""
    from pipeline import profile as m

    m.run(profile, params)
    typer.echo(f"{params} now holds {profile}; run `dvc exp run` (or `git checkout {params}` to undo)")


if __name__ == "__main__":
    app()
