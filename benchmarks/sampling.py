"""Sampling cost per sampler: network function evaluations (NFE) and samples/s for S = 32/64/128 steps, and
cached vs plain ancestral on the masking model as a ratio, measured in one run.

    python benchmarks/sampling.py [--params params.yaml] [--num 16]

Uses the trained models of the pipeline (`dvc repro` first): mask and, when it is trained, semdlm_plus, each
with ancestral / tau_leaping / blockwise (no correctors). Targets: NFE <= 1.1 x S for every sampler; the
cache >= 1.5x faster at S >= 128 on the masking model. Writes benchmarks/results/sampling.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pipeline.artifacts import load_denoiser, load_kernel, load_unigram, load_vocab, model_path
from pipeline.common import load_params
from semdlm.samplers import ancestral, blockwise, tau_leaping


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--num", type=int, default=16, help="samples per run")
    ap.add_argument("--out", default="benchmarks/results/sampling.json")
    args = ap.parse_args()
    p = load_params(args.params)
    vocab = load_vocab()
    x0 = load_unigram(vocab)
    rows = []
    for kname in [k for k in ("mask", "semdlm_plus") if k in p.kernels and model_path(k).exists()]:
        kernel, model = load_kernel(kname, p, vocab), load_denoiser(kname)
        L = model.seq_len
        names = ["ancestral", "blockwise", "tau_leaping"] + (["ancestral_plain"] if kname == "mask" else [])
        for S in (32, 64, 128):
            for name in names:
                gen = torch.Generator().manual_seed(0)
                t0 = time.perf_counter()
                with torch.no_grad():
                    if name == "blockwise":
                        res = blockwise(model, kernel, args.num, L, S, p.sampler.strides, gen, x0)
                    elif name == "tau_leaping":
                        res = tau_leaping(model, kernel, args.num, L, S, gen, x0_dist=x0)
                    else:
                        res = ancestral(model, kernel, args.num, L, S, gen, x0, cache=name == "ancestral")
                wall = time.perf_counter() - t0
                rows.append({"kernel": kname, "sampler": name, "steps": S, "nfe": res.nfe,
                             "nfe_over_steps": res.nfe / S, "wall_s": wall, "samples_per_s": args.num / wall})
    speedup = {}
    for S in (32, 64, 128):
        r = {x["sampler"]: x for x in rows if x["kernel"] == "mask" and x["steps"] == S}
        if "ancestral_plain" in r:
            speedup[S] = r["ancestral_plain"]["wall_s"] / r["ancestral"]["wall_s"]
    result = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
              "num_samples": args.num, "rows": rows, "cache_speedup_mask": speedup}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'kernel':<12} {'sampler':<16} {'S':>4} {'NFE':>5} {'NFE/S':>6} {'samples/s':>10}")
    for r in rows:
        print(f"{r['kernel']:<12} {r['sampler']:<16} {r['steps']:>4} {r['nfe']:>5} {r['nfe_over_steps']:>6.2f} "
              f"{r['samples_per_s']:>10.2f}")
    print("cache speedup (plain / cached wall time, mask):", {k: round(v, 2) for k, v in speedup.items()})
    print(f"({result['machine']})")


if __name__ == "__main__":
    main()
