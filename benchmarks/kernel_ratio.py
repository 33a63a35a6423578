"""Training-step time of every kernel as a ratio to `mask`: same model, batch and data, one run.

    python benchmarks/kernel_ratio.py [--params params.yaml] [--steps 15]

Needs the tokenize / graph / prior outs (run `dvc repro prior graph` first). Target: every kernel <= 1.10x
mask. Prints a table and writes benchmarks/results/kernel_ratio.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.artifacts import load_kernel, load_split, load_vocab
from pipeline.common import load_params
from semdlm.config import KernelConfig
from semdlm.model import Denoiser
from semdlm.training import corrupt_batch, make_optimizer, normaliser, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/kernel_ratio.json")
    args = ap.parse_args()
    p = load_params(args.params)
    p = replace(p, kernels={"mask": KernelConfig(), **p.kernels})  # mask is the baseline even if not listed
    vocab = load_vocab()
    data = load_split("train")
    names = list(p.kernels)
    times: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    x0 = data[torch.randint(len(data), (p.train.batch_size,), generator=gen)]
    for _ in range(2):  # two rounds, keep the faster: evens out warm-up and background noise
        for name in names:
            kernel = load_kernel(name, p, vocab)
            torch.manual_seed(0)
            model = Denoiser(vocab.size, data.shape[1], p.model, kernel.mask_id,
                             kernel.num_states if p.kernels[name].latent_state else 0)
            opt = make_optimizer(model, p.train)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                batch = corrupt_batch(x0, kernel, p.train, p.kernels[name], gen)
                loss = train_step(model, kernel, batch, slice(None), p.kernels[name],
                                  normaliser(batch.counts, p.kernels[name]), p.kernels[name].latent_state)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            dt = (time.perf_counter() - t0) / args.steps
            times[name] = min(times.get(name, float("inf")), dt)
    ratio = {k: v / times["mask"] for k, v in times.items()}
    result = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
              "batch": p.train.batch_size, "seq_len": data.shape[1], "vocab": vocab.size,
              "step_s": times, "ratio_to_mask": ratio, "target": 1.10}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'kernel':<12} {'step s':>8} {'x mask':>7}")
    for k in names:
        print(f"{k:<12} {times[k]:>8.3f} {ratio[k]:>7.2f}{'' if ratio[k] <= 1.10 else '  (over 1.10)'}")
    print(f"({result['machine']}, batch {result['batch']} x {result['seq_len']}, V={result['vocab']})")


if __name__ == "__main__":
    main()
