"""Cost of the validation bound at paper vocabulary size, without the network (which `train_step.py` measures).

    python benchmarks/bound.py [--vocab 30522] [--k-max 16] [--positions 2048] [--device cpu]

Random logits stand in for the denoiser, a random neighbour table for the graph stage; the bound arithmetic is
the library's (``semdlm.likelihood``), float64, chunked. Prints seconds per 1,000 validation positions for the
latent-state ELBO (the default model) and the paper's model's state-marginalised ELBO, for knn and semdlm_plus,
and projects the final bound of params/lm1b.yaml (val_sequences x seq_len positions, val_repeats times; the
grid size bound_steps does not change the cost: each sequence is scored at one stratified grid step).
Writes benchmarks/results/bound.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from semdlm.config import load_params
from semdlm.kernels import knn, semdlm_plus
from semdlm.likelihood import latent_bound, latent_prior_kl, marginal_bound, marginal_prior_kl
from semdlm.provenance import machine, versions
from semdlm.schedules import Schedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--k-max", type=int, default=16)
    ap.add_argument("--positions", type=int, default=2048, help="validation positions per measurement")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", default="params/lm1b.yaml")
    ap.add_argument("--out", default="benchmarks/results/bound.json")
    args = ap.parse_args()
    tc = load_params(args.profile).train
    device = torch.device(args.device)
    V, K, L = args.vocab, args.k_max, args.seq_len
    gen = torch.Generator(device=device).manual_seed(0)
    valid = torch.ones(V, dtype=torch.bool, device=device)
    neighbours = torch.stack([torch.randperm(V, generator=gen, device=device)[:K] for _ in range(8)])[
        torch.randint(8, (V,), generator=gen, device=device)]
    kernels = {"knn": knn(valid, neighbours, K // 2),
               "semdlm_plus": semdlm_plus(valid.double() / V, neighbours, Schedule(eta=2.0, k_max=K))}
    B = max(1, args.positions // L)
    x0 = torch.randint(V, (B, L), generator=gen, device=device)
    logits = torch.randn(B, L, V, generator=gen, device=device)
    denoise = lambda xt, t, state: logits  # noqa: E731 - the network is not what is measured here
    m = torch.full((V,), 1.0 / V, dtype=torch.float64, device=device)
    rows = []
    for name, kernel in kernels.items():
        for model, bound, prior_fn in (("latent", latent_bound, latent_prior_kl),
                                       ("paper", marginal_bound, marginal_prior_kl)):
            t0 = time.perf_counter()
            prior = prior_fn(kernel, m)
            prior_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            bound(denoise, kernel, x0, 64, prior, gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_1000 = (time.perf_counter() - t0) / (B * L) * 1000
            rows.append({"kernel": name, "model": model, "s_per_1000_positions": per_1000, "prior_once_s": prior_s})
    positions = tc.val_sequences * L * tc.val_repeats
    for r in rows:
        r["projected_final_bound_h"] = r["s_per_1000_positions"] * positions / 1000 / 3600
    print(f"V={V} k_max={K} L={L} device={device} ({machine(str(device))}); projection: {args.profile} final bound = "
          f"{positions:,} positions")
    print(f"{'kernel':12s} {'model':7s} {'s / 1k pos':>11s} {'prior (once) s':>15s} {'projected h':>12s}")
    for r in rows:
        print(f"{r['kernel']:12s} {r['model']:7s} {r['s_per_1000_positions']:11.3f} {r['prior_once_s']:15.1f} "
              f"{r['projected_final_bound_h']:12.2f}")
    result = {"machine": machine(str(device)), "versions": versions(), "device": str(device), "vocab": V, "k_max": K,
              "seq_len": L, "threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
