"""Entry point of one rank in the DDP tests (a module of its own so that spawned processes can import it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def train_rank(rank: int, world: int, port: int, kernel: str, keep: str) -> None:
    """Train ``kernel`` as rank ``rank`` of ``world`` (gloo), keeping a copy of every checkpoint in ``keep``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import pipeline.train as train_mod
    from semdlm.config import load_params

    save = train_mod.Checkpoint.save

    def save_and_keep(self: train_mod.Checkpoint, state: dict) -> None:
        save(self, state)
        shutil.copy(self.path, Path(keep) / f"step{state['step']}.pt")

    train_mod.Checkpoint.save = save_and_keep
    train_mod.run(load_params(), kernel)
