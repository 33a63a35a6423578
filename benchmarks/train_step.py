"""Training-step throughput: tokens/s and achieved FLOP/s as a fraction of this machine's dense matmul FLOP/s.

    python benchmarks/train_step.py [--params params.yaml] [--kernel mask] [--steps 20]

Uses the model / batch / sequence length of the params file on synthetic tokens; measures a float32 GEMM
peak in the same run. Prints one line and writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pipeline.common import load_params
from pipeline.train import make_optimizer, train_step
from semdlm.config import KernelConfig
from semdlm.kernels import masking
from semdlm.model import Denoiser


def matmul_peak(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def model_flops_per_token(model: Denoiser, seq_len: int) -> float:
    """6 x matmul parameters (forward + backward) + attention scores/values, per token."""
    d, L = model.cfg.d_model, model.cfg.n_layers
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "ada" not in n
                 and "time" not in n)
    return 6 * matmul + 6 * 2 * L * seq_len * d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--vocab", type=int, default=7917, help="vocabulary size (the embedded default's compact vocab)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args()
    p = load_params(args.params)
    if p.train.threads:
        torch.set_num_threads(p.train.threads)
    V, L, B = args.vocab, p.data.seq_len, p.train.batch_size
    kernel = masking(V, V - 1)
    model = Denoiser(V, L, p.model, kernel.mask_id)
    opt = make_optimizer(model, p.train)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V - 1, (B, L), generator=gen)

    def step() -> None:
        loss = train_step(model, kernel, x0, p.train, p.kernels.get('mask', KernelConfig()), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    peak = matmul_peak()
    tok_s = B * L / dt
    achieved = tok_s * model_flops_per_token(model, L)
    result = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
              "parameters": model.num_parameters(), "batch": B, "seq_len": L, "vocab": V,
              "step_s": dt, "tokens_per_s": tok_s, "achieved_flops": achieved, "matmul_peak_flops": peak,
              "fraction_of_peak": achieved / peak}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"train step: {tok_s:,.0f} tok/s, {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of "
          f"{peak / 1e9:.0f} GFLOP/s matmul peak ({result['machine']}, {result['parameters']:,} params)")


if __name__ == "__main__":
    main()
