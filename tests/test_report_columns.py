"""The report's paper columns follow the run's dataset: LM1B columns for LM1B, OWT columns for OWT, none else."""

import pandas as pd
import pytest

from pipeline import paper, results, tables
from semdlm.config import DataConfig, KernelConfig, Params, SamplerConfig


def run_df() -> pd.DataFrame:
    return pd.DataFrame([
        {"kernel": "mask", "kind": "model", "steps": s, "gen_ppl": 50.0 + s, "entropy": 4.9, "below_min_entropy": False,
         "protocol": "mdlm", "val_ppl": 30.0, "bound": "D3PM ELBO", "bound_label": "tightens as T grows",
         "val_ppl_ctmc": 29.0, "val_denoising_ppl": 20.0, "model": "paper", "kernel_type": "mask",
         "revisions": 0.0, "semantic_repetition": 0.1, "paper_ppl": None, "paper_row": "–"}
        for s in (128, 1024)
    ]).astype({"steps": "Int64"})


def params(source: str) -> Params:
    return Params(data=DataConfig(source=source), sampler=SamplerConfig(steps=(128, 1024)),
                  kernels={"mask": KernelConfig()})


@pytest.mark.parametrize(("source", "present", "absent"), [
    ("lm1b", ["paper: LM1B gen PPL @512", "93.69"], ["OWT", "paper: LM1B gen PPL @1024", "43.00"]),
    ("openwebtext", ["paper: OWT gen PPL @1024", "43.00", "76.50"], ["LM1B", "93.69"]),
    ("bbcnews", [], ["paper"]),
])
def test_table3_paper_columns_follow_the_dataset(source, present, absent):
    header, _, mask_row = tables.table3(params(source), run_df()).splitlines()
    table = header + "\n" + mask_row
    assert "ours: gen PPL @1024 (mdlm)" in header  # the protocol that produced our numbers
    for text in present:
        assert text in table, table
    for text in absent:
        assert text not in table, table


@pytest.mark.parametrize(("source", "has_table2"), [("lm1b", True), ("openwebtext", False), ("bbcnews", False)])
def test_table2_paper_column_only_for_lm1b(source, has_table2):
    df = run_df()
    if has_table2:
        df["paper_ppl"], df["paper_row"] = paper.table2("lm1b")["mask"]
    text = tables.table2(params(source), results.headline(df))
    assert ("paper: LM1B test PPL" in text and "31.78" in text) == has_table2
    assert ("No paper column" in text) != has_table2


def test_the_true_law_table_shows_each_kernels_distance_to_h_and_its_samples_and_the_reference_rows(tmp_path,
                                                                                                      monkeypatch):
    """A synthetic run: bound - H per kernel, sample NLL - H and the p = 0 share per step count ("–" where no sample
    has non-zero probability), the reference rows scored by the law; and the figure of the same numbers."""
    from pipeline import figures

    df = run_df().assign(bound_minus_entropy=0.75, zero_prob_share=[0.25, 1.0], true_nll_minus_entropy=[0.5, None])
    refs = pd.DataFrame([{"kernel": k, "kind": "reference", "zero_prob_share": 0.0, "true_nll_minus_entropy": v}
                         for k, v in (("heldout_text", 0.01), ("unigram_samples", 1.9))])
    df = pd.concat([df, refs], ignore_index=True)
    p = params("synthetic")
    header, _, mask, held, uni = tables.truth_table(p, df, {}).splitlines()
    assert header == ("| kernel | bound − H | sample NLL − H @128 | p = 0 share @128 | sample NLL − H @1024 | "
                      "p = 0 share @1024 |")
    assert mask == "| mask | 0.750 | 0.500 | 0.25 | – | 1.00 |"
    assert held.startswith("| held-out text (floor) | – | 0.010 |") and uni.startswith("| unigram samples")
    monkeypatch.chdir(tmp_path)
    for name, cols in (("train_log.tsv", "step\tloss\n1\t6.0\n2\t5.0\n"), ("val_log.tsv", "step\tval_nelbo\n2\t5.5\n")):
        (tmp_path / "metrics/mask").mkdir(parents=True, exist_ok=True)
        (tmp_path / "metrics/mask" / name).write_text(cols)
    figures.plot_truth(p, df, {"entropy_per_token": 4.0, "unigram_entropy_per_token": 5.7}, tmp_path / "truth.png")
    assert (tmp_path / "truth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
