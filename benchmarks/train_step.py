"""Training-step throughput: tokens/s, model FLOP utilisation (MFU) and per-kernel step time as a ratio to mask.

    python benchmarks/train_step.py [--params params.yaml] [--steps 20]          # the embedded default's model
    python benchmarks/train_step.py --config paper [--batch 64] [--steps 10]    # 110M model, L = 128 and 1024

The step is the trainer's own: ``semdlm.training.draw_batch`` then ``optimizer_step`` (the Eq. 120 loss, clipping,
AdamW, the learning-rate schedule and the EMA of the params; bf16 autocast and optional torch.compile on CUDA), one
micro-batch per step on one device, on synthetic tokens (``semdlm.stand_ins``). The peak is the GPU's dense bf16
FLOP/s from its data sheet (or ``--peak``); on a CPU it is a float32 matmul measured in the same run.
``--config paper`` times every kernel (mask, uniform, knn, semdlm_plus with a random [V, k_max] neighbour table) at
both of the paper's lengths.
Writes benchmarks/results/train_step.json (default) or train_step_paper_<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from semdlm.config import KernelConfig, Params, deep_merge, load_params, parse_params, read_yaml
from semdlm.kernels import Kernel, masking
from semdlm.model import Denoiser
from semdlm.provenance import machine, versions
from semdlm.stand_ins import random_kernel, random_rows
from semdlm.training import TrainState, corrupt_batch, draw_batch, optimizer_step

GPU_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                 "A10": 125e12}  # dense (no sparsity) bf16 tensor-core FLOP/s, vendor data sheets
PAPER_LENGTHS = {"lm1b": 128, "owt": 1024}


def matmul_peak(n: int = 1024, reps: int = 20, rounds: int = 3) -> float:
    """Best of ``rounds`` timings of ``reps`` float32 n x n matmuls (FLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, override: float) -> tuple[float, str]:
    if override:
        return override, "given with --peak"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops, f"{name} dense bf16 data-sheet peak"
        raise SystemExit(f"unknown GPU {name!r}: pass its dense bf16 peak FLOP/s with --peak")
    return matmul_peak(), "float32 1024x1024 matmul measured in this run (best of 3, before and after)"


def model_flops_per_token(model: Denoiser, seq_len: int) -> float:
    """6 x matmul parameters (forward + backward) + attention scores/values, per token."""
    d, L = model.cfg.d_model, model.cfg.n_layers
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "ada" not in n
                 and "time" not in n)
    return 6 * matmul + 6 * 2 * L * seq_len * d


def time_steps(p: Params, kernels: dict[str, tuple[Kernel, KernelConfig]], V: int, L: int, B: int, steps: int,
               device: torch.device) -> tuple[dict[str, list[float]], Denoiser]:
    """Seconds of each timed optimiser step (the trainer's step: draw_batch + optimizer_step) per kernel, after
    warm-up, B sequences of length L per step.

    The kernels take turns on one model, step by step, so that a change in the machine's load hits all alike; its
    latent-state table is sized for the kernel with the most states (the network's cost is the same for all).
    """
    cfg = dataclasses.replace(p.train, batch_size=B, devices=1, grad_accum=1)
    torch.manual_seed(0)
    widest = max((k for k, _ in kernels.values()), key=lambda k: k.num_states)
    latent = any(c.latent_state for _, c in kernels.values())  # one model for all: latent if any entry is
    model = Denoiser.for_kernel(p.model, widest, L, latent).to(device)
    state = TrainState.new(model, cfg)
    on_device = {k.name: k.to(device) for k, _ in kernels.values()}  # constrain() runs where the logits are
    if cfg.compile and device.type == "cuda":
        torch._dynamo.reset()  # a fresh compile per length: no automatic-dynamic recompile of the last one
        net = torch.compile(model)
    else:
        net = model
    rows = random_rows(B, L, V, state.gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(kernel: Kernel, kcfg: KernelConfig) -> float:
        sync()
        t0 = time.perf_counter()
        batch = draw_batch(rows, kernel, cfg, kcfg, state.gen, never=kernel.mask_id).to(device)
        optimizer_step(state, net, on_device[kernel.name], batch, cfg, kcfg, latent)
        sync()
        return time.perf_counter() - t0

    warm = 2 if device.type == "cuda" else 1
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for i in range(warm + steps):
        for name, (kernel, kcfg) in kernels.items():
            dt = step(kernel, kcfg)
            if i >= warm:
                times[name].append(dt)
    return times, model


def run_default(p: Params, V: int, steps: int, device: torch.device) -> dict:
    L, B = p.data.seq_len, p.train.batch_size
    times, model = time_steps(p, {"mask": (masking(V, V - 1), p.kernels.get("mask", KernelConfig()))}, V, L, B,
                              steps, device)
    dt = sum(times["mask"]) / steps
    tok_s = B * L / dt
    return {"parameters": model.num_parameters(), "batch": B, "seq_len": L, "vocab": V, "step_s": dt,
            "tokens_per_s": tok_s, "achieved_flops": tok_s * model_flops_per_token(model, L)}


def run_paper(p: Params, V: int, batch: int, steps: int, device: torch.device, lengths: list[int]) -> list[dict]:
    """Every kernel at every length (fastest timed step of each); ``batch`` 0 = 1,024 tokens per step (CPU)."""
    gen = torch.Generator().manual_seed(0)
    cfgs = {"mask": KernelConfig(type="mask"), "uniform": KernelConfig(type="uniform"),
            "knn": KernelConfig(type="knn", k=8),
            "semdlm_plus": p.kernels.get("semdlm_plus", KernelConfig(type="semdlm_plus"))}
    kernels = {name: (random_kernel(name, cfg, V, gen), cfg) for name, cfg in cfgs.items()}
    runs = []
    for L in lengths:
        B = batch or max(1, 1024 // L)
        times, model = time_steps(p, kernels, V, L, B, steps, device)
        row: dict = {"seq_len": L, "batch": B, "parameters": model.num_parameters(),
                     "flops_per_token": model_flops_per_token(model, L), "kernels": {}}
        for name, ts in times.items():
            dt = min(ts)
            row["kernels"][name] = {"step_s": dt, "step_s_all": ts, "tokens_per_s": B * L / dt,
                                    "achieved_flops": B * L / dt * row["flops_per_token"],
                                    "ratio_to_mask": dt / min(times["mask"])}
            print(f"L={L:<5} {name:<12} {dt:8.3f} s/step {B * L / dt:10,.0f} tok/s", flush=True)
        t0 = time.perf_counter()  # CPU-side corruption of a whole global batch (each rank corrupts its share)
        x0 = torch.randint(0, V - 1, (p.train.batch_size, L), generator=gen)
        corrupt_batch(x0, kernels["semdlm_plus"][0], p.train, cfgs["semdlm_plus"], gen)
        row["global_batch_corruption_s"] = {"batch": p.train.batch_size, "seconds": time.perf_counter() - t0}
        runs.append(row)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("params", "paper"), default="params",
                    help="params: the --params file's model; paper: params/lm1b.yaml's 110M model at L=128, 1024")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: 7917, paper: 30522)")
    ap.add_argument("--batch", type=int, default=0,
                    help="paper: sequences per device (default 64 on GPU; on CPU 1,024 tokens per step)")
    ap.add_argument("--lengths", default="128,1024", help="paper: sequence lengths")
    ap.add_argument("--steps", type=int, default=0,
                    help="timed steps (default 20; paper, per kernel: 10 on GPU, 3 on CPU)")
    ap.add_argument("--peak", type=float, default=0.0, help="peak FLOP/s to compare with (default: see above)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. other jobs running)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device(args.device)
    paper = args.config == "paper"
    p = _paper_params(args.params) if paper else load_params(args.params)
    if p.train.threads:
        torch.set_num_threads(p.train.threads)
    V = args.vocab or (30522 if paper else 7917)
    peak, peak_src = peak_flops(device, args.peak)
    result: dict = {"machine": machine(str(device)), "versions": versions(), "device": device.type, "note": args.note,
                    "load_average_at_start": os.getloadavg()[0]}
    if paper:
        cuda = device.type == "cuda"
        batch, steps = args.batch or (64 if cuda else 0), args.steps or (10 if cuda else 3)
        lengths = [int(x) for x in args.lengths.split(",")]
        result.update(config="paper (params/lm1b.yaml model; synthetic tokens)", vocab=V, steps=steps,
                      precision=p.train.precision if cuda else "float32", compile=bool(p.train.compile and cuda),
                      runs=run_paper(p, V, batch, steps, device, lengths))
        out = args.out or f"benchmarks/results/train_step_paper_{device.type}.json"
    else:
        result.update(run_default(p, V, args.steps or 20, device))
        out = args.out or "benchmarks/results/train_step.json"
    if device.type == "cpu" and not args.peak:  # a busy machine lowers either measurement: keep the better one
        peak = max(peak, matmul_peak())
    result.update(peak_flops=peak, peak=peak_src)
    for r in [result] + [k for row in result.get("runs", []) for k in row["kernels"].values()]:
        if "achieved_flops" in r:
            r["mfu"] = r["achieved_flops"] / peak
    if paper:
        for row in result["runs"]:
            for k, r in row["kernels"].items():
                print(f"L={row['seq_len']:<5} {k:<12} {r['tokens_per_s']:8,.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  "
                      f"{r['ratio_to_mask']:.2f}x mask")
    else:
        print(f"train step: {result['tokens_per_s']:,.0f} tok/s, {result['achieved_flops'] / 1e9:.1f} GFLOP/s = "
              f"{100 * result['mfu']:.0f}% of {peak / 1e9:.0f} GFLOP/s peak "
              f"({result['machine']}, {result['parameters']:,} params)")
    result["load_average_at_end"] = os.getloadavg()[0]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def _paper_params(base: str) -> Params:
    """params.yaml with params/lm1b.yaml merged in (the paper's model, optimiser and kernel settings)."""
    return parse_params(deep_merge(read_yaml(base), read_yaml("params/lm1b.yaml")))


if __name__ == "__main__":
    main()
