"""The paper's published numbers (pipeline/paper.yaml), read as data: Table 2 and Table 3 by our kernel name."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

PAPER = Path(__file__).with_name("paper.yaml")


@dataclass(frozen=True)
class Table3:
    name: str  # the dataset as the paper names it (LM1B, OWT)
    seq_len: int
    steps: tuple[int, ...]
    rows: dict[str, tuple[str, dict[int, float]]]  # kernel -> (paper's row name, gen PPL by step count)


@functools.cache
def _numbers() -> dict:
    return yaml.safe_load(PAPER.read_text())


def table2(source: str) -> dict[str, tuple[float, str]]:
    """kernel -> (test PPL, paper's row name) of Table 2, for a run on Table 2's dataset (LM1B); else empty."""
    t = _numbers()["table2"]
    return {k: (r["ppl"], r["row"]) for k, r in t["rows"].items()} if source == t["dataset"] else {}


def table3(source: str) -> Table3 | None:
    """Table 3's columns for a run on one of its datasets (lm1b, openwebtext); None for any other data."""
    t = _numbers()["table3"].get(source)
    if t is None:
        return None
    return Table3(t["name"], t["seq_len"], tuple(t["steps"]),
                  {k: (r["row"], {int(s): float(v) for s, v in r["gen_ppl"].items()}) for k, r in t["rows"].items()})
