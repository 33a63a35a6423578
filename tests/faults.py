"""Run a pipeline stage slowed down so that a test can SIGKILL it at a chosen point.

Usage: ``python tests/faults.py <stage args>`` (the arguments of ``python -m pipeline``), with

SEMDLM_SLOW_TICK=s   sleep s seconds on every progress-bar tick (one train step, one sampler step, one eval batch)
SEMDLM_SLOW_WRITE=s  sleep s seconds after an out's temp file is complete and before it is renamed onto the out

The pipeline itself has no test hooks: this wrapper patches it from outside and then runs the normal command.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from rich.progress import Progress

from pipeline import common


def _slow_ticks(seconds: float) -> None:
    for name in ("update", "advance"):
        real = getattr(Progress, name)

        def slowed(self, *args, _real=real, **kwargs):  # noqa: ANN001, ANN202
            time.sleep(seconds)
            return _real(self, *args, **kwargs)

        setattr(Progress, name, slowed)


def _slow_writes(seconds: float) -> None:
    real = common.atomic

    @contextlib.contextmanager
    def slowed(path: str | Path) -> Iterator[Path]:
        with real(path) as tmp:
            yield tmp
            time.sleep(seconds)

    common.atomic = slowed  # stage modules import it (and write_json/write_parquet use it) after this point


if __name__ == "__main__":
    if tick := float(os.environ.get("SEMDLM_SLOW_TICK", 0)):
        _slow_ticks(tick)
    if write := float(os.environ.get("SEMDLM_SLOW_WRITE", 0)):
        _slow_writes(write)
    from pipeline.__main__ import app

    app()
