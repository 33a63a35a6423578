"""The report's paper columns follow the run's dataset: LM1B columns for LM1B, OWT columns for OWT, none else."""

import pandas as pd
import pytest

from pipeline import paper, results, tables
from semdlm.config import DataConfig, Params, SamplerConfig


def run_df() -> pd.DataFrame:
    return pd.DataFrame([
        {"row": "mask", "kind": "model", "steps": s, "gen_ppl": 50.0 + s, "entropy": 4.9, "below_min_entropy": False,
         "protocol": "mdlm", "val_ppl": 30.0, "bound": "latent-state ELBO", "paper_ppl": None, "paper_row": "–"}
        for s in (128, 1024)
    ]).astype({"steps": "Int64"})


def params(source: str) -> Params:
    return Params(data=DataConfig(source=source), sampler=SamplerConfig(steps=(128, 1024)))


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
