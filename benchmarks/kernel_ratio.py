"""Training-step time of every kernel as a ratio to `mask`: same model, batch and length, one run.

    python benchmarks/kernel_ratio.py [--params params.yaml] [--steps 15] [--vocab 7917]

The step is the trainer's (``semdlm.training``: draw_batch + optimizer_step, with clipping, the schedule and the EMA)
on the params' model, batch and sequence length, each kernel with a model of its own. The pipeline's tables are
replaced by synthetic ones of the same shape (``semdlm.stand_ins``: random tokens, uniform nu, a random
[V, graph.k_max] neighbour table), so it needs no pipeline outs. Target: every kernel <= 1.10x mask. Prints a table
and writes benchmarks/results/kernel_ratio.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from semdlm.config import KernelConfig, load_params
from semdlm.model import Denoiser
from semdlm.provenance import machine, versions
from semdlm.stand_ins import random_kernel, random_rows
from semdlm.training import TrainState, draw_batch, optimizer_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--vocab", type=int, default=7917, help="vocabulary size (the embedded default's)")
    ap.add_argument("--out", default="benchmarks/results/kernel_ratio.json")
    args = ap.parse_args()
    p = load_params(args.params)
    p = replace(p, kernels={"mask": KernelConfig(), **p.kernels})  # mask is the baseline even if not listed
    cfg, L, V = p.train, p.data.seq_len, args.vocab
    gen = torch.Generator().manual_seed(0)
    rows = random_rows(cfg.batch_size, L, V, gen)
    kernels = {name: random_kernel(name, kcfg, V, gen, p.graph.k_max) for name, kcfg in p.kernels.items()}
    times: dict[str, float] = {}
    for _ in range(2):  # two rounds, keep the faster: evens out warm-up and background noise
        for name, kernel in kernels.items():
            torch.manual_seed(0)
            latent = p.kernels[name].latent_state  # each entry's own model
            state = TrainState.new(Denoiser.for_kernel(p.model, kernel, L, latent), cfg)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                batch = draw_batch(rows, kernel, cfg, p.kernels[name], state.gen, pieces=cfg.grad_accum,
                                   mine=range(cfg.grad_accum), never=kernel.mask_id)
                optimizer_step(state, state.model, kernel, batch, cfg, p.kernels[name], latent)
            dt = (time.perf_counter() - t0) / args.steps
            times[name] = min(times.get(name, float("inf")), dt)
    ratio = {k: v / times["mask"] for k, v in times.items()}
    result = {"machine": machine(), "versions": versions(), "batch": cfg.batch_size, "seq_len": L, "vocab": V,
              "tables": "synthetic", "step_s": times, "ratio_to_mask": ratio, "target": 1.10}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'kernel':<12} {'step s':>8} {'x mask':>7}")
    for k in kernels:
        print(f"{k:<12} {times[k]:>8.3f} {ratio[k]:>7.2f}{'' if ratio[k] <= 1.10 else '  (over 1.10)'}")
    print(f"({result['machine']}, batch {result['batch']} x {result['seq_len']}, V={result['vocab']})")


if __name__ == "__main__":
    main()
