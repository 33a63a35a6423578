"""Training-step throughput: tokens/s, model FLOP utilisation (MFU) and per-kernel step time as a ratio to mask.

    python benchmarks/train_step.py [--params params.yaml] [--steps 20]          # the embedded default's model
    python benchmarks/train_step.py --profile params/bbc.yaml [--torch-profile 5]  # a profile's model
    python benchmarks/train_step.py --config paper [--batch 64] [--steps 10]    # 110M model, L = 128 and 1024

The step is the trainer's own: ``semdlm.training.draw_batch`` then ``optimizer_step`` (the Eq. 120 loss, clipping,
AdamW, the learning-rate schedule and the EMA of the params; bf16 autocast and optional torch.compile on CUDA), one
micro-batch per step on one device, on synthetic tokens (``semdlm.stand_ins``). The peak is the GPU's dense bf16
FLOP/s from its data sheet (or ``--peak``); on a CPU it is a float32 matmul measured in the same run, twice: the
1024 x 1024 square (``peak_flops``) and the step's own GEMMs at this size (``shape_peak``: every linear layer's forward,
grad-input and grad-weight matmul at B x L rows, each timed alone; their FLOPs over their summed time), so the step's
share of each is reported (``mfu``, ``mfu_shapes``). ``--profile`` merges a params profile into ``--params`` (for
``data.source: synthetic`` the vocabulary is the language's words + 5 specials); ``--torch-profile N`` profiles N
steps with ``torch.profiler`` and stores the ops with the largest self CPU time.
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
from collections.abc import Callable
from pathlib import Path

import torch

from semdlm.config import (
    SYNTHETIC,
    KernelConfig,
    Params,
    load_params,
    merge_params,
    parse_params,
    read_profile,
    read_yaml,
)
from semdlm.data import SPECIALS
from semdlm.kernels import Kernel, masking
from semdlm.model import Denoiser
from semdlm.provenance import machine, versions
from semdlm.stand_ins import random_kernel, random_rows
from semdlm.training import TrainState, corrupt_batch, draw_batch, optimizer_step

GPU_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                 "A10": 125e12}  # dense (no sparsity) bf16 tensor-core FLOP/s, vendor data sheets
StepFn = Callable[[Kernel, KernelConfig], float]
PAPER_LENGTHS = {"lm1b": 128, "owt": 1024}


def time_matmul(fn, flops: float, reps: int, rounds: int = 3) -> float:
    """Best of ``rounds`` timings of ``reps`` calls of ``fn`` (FLOP/s, ``flops`` per call)."""
    for _ in range(2):
        fn()
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = max(best, flops * reps / (time.perf_counter() - t0))
    return best


def matmul_peak(n: int = 1024, reps: int = 20, rounds: int = 3) -> float:
    """Best of ``rounds`` timings of ``reps`` float32 n x n matmuls (FLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return time_matmul(lambda: a @ b, 2 * n**3, reps, rounds)


def step_gemms(model: Denoiser, rows: int) -> list[dict]:
    """The dense matmuls of one training step of ``model`` on ``rows`` = B x L tokens: for every linear layer applied
    to all tokens (each block's qkv, proj and MLP, the weight-tied output head) with weight [n_out, n_in], the
    forward [rows, n_in] x [n_in, n_out] (``F.linear``), the grad-input [rows, n_out] x [n_out, n_in] and the
    grad-weight [n_out, rows] x [rows, n_in] matmul, as autograd runs them (the last on transposed views). The
    time-conditioning layers (B rows, not B x L) and attention (inside scaled_dot_product_attention) are left out,
    as ``model_flops_per_token`` leaves them out of the 6 x parameters."""
    layers = [("head", model.embed.weight, True)]  # F.linear(h, embed.weight, bias)
    for block in model.blocks:
        layers += [("qkv", block.qkv.weight, block.qkv.bias is not None),
                   ("proj", block.proj.weight, block.proj.bias is not None),
                   ("mlp_in", block.mlp[0].weight, block.mlp[0].bias is not None),
                   ("mlp_out", block.mlp[2].weight, block.mlp[2].bias is not None)]
    calls: dict[tuple[str, int, int, bool], int] = {}
    for name, w, bias in layers:
        key = (name, *w.shape, bias)
        calls[key] = calls.get(key, 0) + 1
    out = []
    for (name, n_out, n_in, bias), count in calls.items():
        for kind, (m, k, n) in (("forward", (rows, n_in, n_out)), ("grad_input", (rows, n_out, n_in)),
                                ("grad_weight", (n_out, rows, n_in))):
            out.append({"layer": name, "kind": kind, "m": m, "k": k, "n": n, "bias": bias and kind == "forward",
                        "calls": count, "flops": 2 * m * k * n})
    return out


def shape_peak(gemms: list[dict], reps: int = 20) -> tuple[float, list[dict]]:
    """float32 FLOP/s of the step's GEMM mix (``step_gemms``), each GEMM timed alone (best of 3 rounds of ``reps``):
    the FLOPs of all of them, each as often as the step calls it, over the time they take at their measured rates;
    and the per-GEMM figures (each entry with its ``flops_per_s``, replaced where the entry already had one)."""
    total_flops = total_s = 0.0
    rows = []
    for g in gemms:
        m, k, n = g["m"], g["k"], g["n"]
        if g["kind"] == "forward":  # F.linear(x [m, k], w [n, k], bias [n])
            x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n) if g["bias"] else None

            def fn(x=x, w=w, b=b):
                return torch.nn.functional.linear(x, w, b)
        elif g["kind"] == "grad_input":  # dy [m, k] @ w [k, n]
            dy, w = torch.randn(m, k), torch.randn(k, n)

            def fn(dy=dy, w=w):
                return dy @ w
        else:  # dy.t() [m, k] @ x [k, n], dy [k, m] contiguous as autograd holds it
            dy, x = torch.randn(k, m), torch.randn(k, n)

            def fn(dy=dy, x=x):
                return dy.t() @ x
        rate = time_matmul(fn, g["flops"], reps)
        rows.append({**g, "flops_per_s": rate})
        total_flops += g["flops"] * g["calls"]
        total_s += g["flops"] * g["calls"] / rate
    return total_flops / total_s, rows


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
               device: torch.device) -> tuple[dict[str, list[float]], Denoiser, StepFn]:
    """Seconds of each timed optimiser step (the trainer's step: draw_batch + optimizer_step) per kernel, after
    warm-up, B sequences of length L per step.

    The kernels take turns on one model, step by step, so that a change in the machine's load hits all alike; its
    latent-state table is sized for the kernel with the most states (the network's cost is the same for all).
    Also returns the model and the timed step (kernel, its config -> seconds).
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
    return times, model, step


def run_default(p: Params, V: int, steps: int, device: torch.device, profile_steps: int = 0) -> dict:
    """The params' model, batch and length on the mask kernel: mean (and min, median) step time over ``steps``
    timed steps; on a CPU also the step's GEMMs at this size (``shape_peak``) and, with ``profile_steps``, a
    ``torch.profiler`` table of that many more steps."""
    L, B = p.data.seq_len, p.train.batch_size
    kernel = masking(V, V - 1)
    kcfg = p.kernels.get("mask", KernelConfig())
    times, model, step = time_steps(p, {"mask": (kernel, kcfg)}, V, L, B, steps, device)
    ts = sorted(times["mask"])
    dt = sum(ts) / steps
    tok_s = B * L / dt
    fpt = model_flops_per_token(model, L)
    out = {"parameters": model.num_parameters(), "batch": B, "seq_len": L, "vocab": V,
           "d_model": p.model.d_model, "n_layers": p.model.n_layers, "flops_per_token": fpt, "step_s": dt,
           "step_s_min": ts[0], "step_s_median": ts[len(ts) // 2], "tokens_per_s": tok_s,
           "achieved_flops": tok_s * fpt, "achieved_flops_min_step": B * L / ts[0] * fpt}
    if device.type == "cpu":
        gemms = step_gemms(model, B * L)
        out["gemm_flops_share"] = sum(g["flops"] * g["calls"] for g in gemms) / (B * L * fpt)
        out["shape_peak_flops"], out["gemms"] = shape_peak(gemms)
    if profile_steps:
        out["torch_profile"] = torch_profile(lambda: step(kernel, kcfg), profile_steps)
    return out


def torch_profile(step, steps: int, top: int = 25) -> dict:
    """``torch.profiler`` over ``steps`` calls of ``step``: the table printed, and per op (the ``top`` by self CPU
    time) its share of the total self CPU time, milliseconds per step and calls per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {"steps": steps, "self_cpu_ms_per_step": total / 1e3 / steps,
            "ops": [{"op": e.key, "share": e.self_cpu_time_total / total,
                     "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
                    for e in rows]}


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
        times, model, _ = time_steps(p, kernels, V, L, B, steps, device)
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
    ap.add_argument("--profile", default="", help="a params profile merged into --params (e.g. params/bbc.yaml)")
    ap.add_argument("--vocab", type=int, default=0,
                    help="vocabulary size (default: a synthetic language's words + 5 specials, else 7917; "
                         "paper: 30522)")
    ap.add_argument("--torch-profile", type=int, default=0, metavar="N",
                    help="params: profile N more steps with torch.profiler (table printed, top ops in the JSON)")
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
    if paper:
        p = _paper_params(args.params)
    elif args.profile:
        p = parse_params(merge_params(read_yaml(args.params), read_profile(args.profile)))
    else:
        p = load_params(args.params)
    if p.train.threads:
        torch.set_num_threads(p.train.threads)
    V = args.vocab or (30522 if paper else default_vocab(p))
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
        result.update(params=args.params, profile=args.profile or None)
        result.update(run_default(p, V, args.steps or 20, device, args.torch_profile))
        out = args.out or "benchmarks/results/train_step.json"
    if device.type == "cpu" and not args.peak:  # a busy machine lowers either measurement: keep the better one
        peak = max(peak, matmul_peak())
    result.update(peak_flops=peak, peak=peak_src)
    for r in [result] + [k for row in result.get("runs", []) for k in row["kernels"].values()]:
        if "achieved_flops" in r:
            r["mfu"] = r["achieved_flops"] / peak
    if "shape_peak_flops" in result:  # measured again after the steps: keep the better one
        result["shape_peak_flops"] = max(result["shape_peak_flops"], shape_peak(result["gemms"])[0])
        result["mfu_shapes"] = result["achieved_flops"] / result["shape_peak_flops"]
    if paper:
        for row in result["runs"]:
            for k, r in row["kernels"].items():
                print(f"L={row['seq_len']:<5} {k:<12} {r['tokens_per_s']:8,.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  "
                      f"{r['ratio_to_mask']:.2f}x mask")
    else:
        print(f"train step: {result['tokens_per_s']:,.0f} tok/s, {result['achieved_flops'] / 1e9:.1f} GFLOP/s = "
              f"{100 * result['mfu']:.0f}% of {peak / 1e9:.0f} GFLOP/s peak "
              f"({result['machine']}, {result['parameters']:,} params)")
        if "mfu_shapes" in result:
            print(f"  = {100 * result['mfu_shapes']:.0f}% of the {result['shape_peak_flops'] / 1e9:.0f} GFLOP/s that "
                  f"the step's own GEMMs reach alone at B x L = {result['batch'] * result['seq_len']:,} rows "
                  f"(GEMMs: {100 * result['gemm_flops_share']:.0f}% of the model FLOPs)")
            for g in result["gemms"]:
                print(f"    {g['layer']:<8} {g['kind']:<11} [{g['m']}, {g['k']}] x [{g['k']}, {g['n']}] "
                      f"x{g['calls']}: {g['flops_per_s'] / 1e9:6.1f} GFLOP/s")
    result["load_average_at_end"] = os.getloadavg()[0]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def default_vocab(p: Params) -> int:
    """The vocabulary of ``p``'s data when it is known without the pipeline: a synthetic language's compact vocabulary
    (its states x cluster_size words and the 5 specials); else BBC News's 7,917 (params/bbc.yaml)."""
    if p.data.source == SYNTHETIC and p.data.vocab == "compact":
        return p.data.synthetic.states * p.data.synthetic.cluster_size + len(SPECIALS)
    return 7917


def _paper_params(base: str) -> Params:
    """params.yaml with params/lm1b.yaml merged in (the paper's model, optimiser and kernel settings)."""
    return parse_params(merge_params(read_yaml(base), read_profile("params/lm1b.yaml")))


if __name__ == "__main__":
    main()
