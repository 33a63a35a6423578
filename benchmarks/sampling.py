"""Sampling cost per sampler: network function evaluations (NFE) / S and samples/s, on the device.

    python benchmarks/sampling.py [--params params.yaml] [--num 16] [--models models]   # the trained models
    python benchmarks/sampling.py --config paper [--batch 0] [--steps 128] [--lengths 128,1024]

Default: the trained models of the pipeline (``--models``/<kernel>/model.pt: `dvc repro` first), mask and, when it
is trained, semdlm_plus, each with ancestral / tau_leaping / blockwise (no correctors) at S = 32/64/128, and cached vs
plain ancestral on the masking model as a ratio, measured in one run. The kernels' tables are synthetic ones of the
model's vocabulary (``semdlm.stand_ins``: uniform nu and x_0 law, a random [V, graph.k_max] neighbour table): the
same shapes, so the same cost, as the pipeline's. Targets: NFE <= 1.1 x S for every sampler; the cache >= 1.5x
faster at S >= 128 on the masking model. Writes benchmarks/results/sampling.json.

``--config paper``: the 110M model of params/lm1b.yaml with random weights, V = 30,522, a random [V, k_max]
neighbour table, and the profile's sampler settings (Eq. 23 penalties included), for mask and semdlm_plus with
ancestral and blockwise at L = 128 and 1,024: NFE / S, samples/s, and the projected time of 1,000 samples at
L = 1,024 x 1,024 steps (target: under 1 GPU-hour). Writes benchmarks/results/sampling_paper_<device>.json.

Both run on ``--device`` (auto = CUDA when available): the network in the training precision (bf16 autocast on
CUDA), the float64 sampling arithmetic and the generator on the same device, as the sample stage does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from semdlm.config import ConfigError, KernelConfig, ModelConfig, SamplerConfig, load_params, read_yaml, section
from semdlm.devices import in_precision, on_device, resolve_device
from semdlm.kernels import Kernel, masking
from semdlm.model import Denoiser
from semdlm.penalties import penalty
from semdlm.provenance import machine, versions
from semdlm.samplers import Denoise, SampleResult, Transform, get_sampler
from semdlm.stand_ins import random_kernel, uniform_unigram

PROJECT_SAMPLES, PROJECT_LEN, PROJECT_STEPS = 1000, 1024, 1024  # the projection: OWT-size sampling (Table 3)


def timed(device: torch.device, fn: Callable[..., SampleResult], *args: object) -> tuple[SampleResult, float]:
    """``fn(*args)`` without gradients, and its wall seconds (the device's queue drained at both ends)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        res = fn(*args)
    sync()
    return res, time.perf_counter() - t0


def run_sampler(name: str, denoise: Denoise, latent: bool, kernel: Kernel, num: int, L: int, S: int,
                cfg: SamplerConfig, gen: torch.Generator, x0: torch.Tensor,
                transform: Transform | None) -> SampleResult:
    """One batch with the library sampler ``name`` (``ancestral_plain``: ancestral without the cache) at S steps and
    ``cfg``'s other settings, no correctors; ``latent``: the model sees each token's latent state."""
    sampler = "ancestral" if name == "ancestral_plain" else name
    run_cfg = dataclasses.replace(cfg, name=sampler, steps=S, corrector_steps=0, cache=name == "ancestral",
                                  projection=cfg.projection and sampler == "blockwise")
    return get_sampler(sampler)(denoise, kernel, run_cfg, num, L, latent=latent, generator=gen, unigram=x0,
                                transform=transform)


def run_params(args: argparse.Namespace, device: torch.device) -> dict:
    """The pipeline's trained models at S = 32/64/128 with the params' sampler settings (no penalties)."""
    p = load_params(args.params)
    cfg = p.sampler
    gen = torch.Generator().manual_seed(0)
    rows = []
    paths = {k: Path(args.models) / k / "model.pt" for k in ("mask", "semdlm_plus") if k in p.kernels}
    trained = {k: path for k, path in paths.items() if path.exists()}
    for kname, path in trained.items():
        model = Denoiser.load(path).to(device)
        V = model.vocab_size
        kernel = random_kernel(kname, p.kernels[kname], V, gen, p.graph.k_max, model.mask_id)
        kernel, x0 = on_device(kernel, device), uniform_unigram(V, model.mask_id).to(device)
        denoise = in_precision(model, device, p.train.precision)
        names = ["ancestral", "blockwise", "tau_leaping"] + (["ancestral_plain"] if kname == "mask" else [])
        for S in (32, 64, 128):
            for name in names:
                gen = torch.Generator(device=device).manual_seed(0)
                res, wall = timed(device, run_sampler, name, denoise, model.num_states > 0, kernel, args.num,
                                  model.seq_len, S, cfg, gen, x0, None)
                rows.append({"kernel": kname, "sampler": name, "seq_len": model.seq_len, "batch": args.num,
                             "steps": S, "nfe": res.nfe, "nfe_over_steps": res.nfe / S, "wall_s": wall,
                             "samples_per_s": args.num / wall})
    speedup = {}
    for S in (32, 64, 128):
        r = {x["sampler"]: x for x in rows if x["kernel"] == "mask" and x["steps"] == S}
        if "ancestral_plain" in r:
            speedup[S] = r["ancestral_plain"]["wall_s"] / r["ancestral"]["wall_s"]
    return {"config": "params (trained models)", "num_samples": args.num, "rows": rows, "cache_speedup_mask": speedup}


def run_paper(args: argparse.Namespace, device: torch.device) -> dict:
    """params/lm1b.yaml's model (random weights) and sampler at each length, mask and semdlm_plus."""
    raw = read_yaml(args.profile)
    model_cfg = section(ModelConfig, raw["model"], "model")
    cfg = section(SamplerConfig, raw["sampler"], "sampler")
    precision = raw["train"]["precision"]
    V = args.vocab
    gen = torch.Generator().manual_seed(0)
    plus_cfg = section(KernelConfig, {"type": "semdlm_plus", **(raw.get("kernels", {}).get("semdlm_plus") or {})},
                       "kernels.semdlm_plus")
    plus = random_kernel("semdlm_plus", plus_cfg, V, gen)
    kernels = {"mask": on_device(masking(V, V - 1), device), "semdlm_plus": on_device(plus, device)}
    sims = torch.rand(plus.neighbours.shape, dtype=torch.float64, generator=gen)  # random graph similarities
    transform = penalty(cfg.lambda_freq, cfg.lambda_sem, cfg.window, plus.neighbours.to(device), sims.to(device))
    x0 = uniform_unigram(V).to(device)  # x_0 never [MASK]
    # one model for both kernels; the latent-state model's state table is the larger kernel's (the cost is the same)
    widest = max(kernels.values(), key=lambda k: k.num_states)
    rows = []
    for L in (int(x) for x in args.lengths.split(",")):
        B = args.batch or (64 if L <= 128 else 32)
        torch.manual_seed(0)
        model = Denoiser.for_kernel(model_cfg, widest, L, plus_cfg.latent_state).to(device).eval()
        denoise = in_precision(model, device, precision)
        with torch.no_grad():  # warm-up: CUDA context, kernels and allocator before the first timing
            zeros = torch.zeros(B, L, dtype=torch.long, device=device)
            denoise(zeros, torch.ones(B, device=device), zeros if model.num_states else None)
        for kname, kernel in kernels.items():
            for name in args.samplers.split(","):
                g = torch.Generator(device=device).manual_seed(0)
                res, wall = timed(device, run_sampler, name, denoise, model.num_states > 0, kernel, B, L, args.steps,
                                  cfg, g, x0, transform)
                row = {"kernel": kname, "sampler": name, "seq_len": L, "batch": B, "steps": args.steps, "nfe": res.nfe,
                       "nfe_over_steps": res.nfe / args.steps, "wall_s": wall, "samples_per_s": B / wall,
                       "s_per_step": wall / args.steps}
                if L == PROJECT_LEN:  # the cost of a step does not depend on S: scale to 1,024 steps, 1,000 samples
                    row["projected_hours"] = math.ceil(PROJECT_SAMPLES / B) * PROJECT_STEPS * row["s_per_step"] / 3600
                rows.append(row)
                print(f"L={L:<5} {kname:<12} {name:<10} NFE/S {row['nfe_over_steps']:.2f}  "
                      f"{row['samples_per_s']:8.2f} samples/s", flush=True)
        parameters = model.num_parameters()
    return {"config": f"paper ({args.profile} model and sampler, random weights, V = {V})",
            "precision": precision if device.type == "cuda" else "float32", "parameters": parameters,
            "projection": {"samples": PROJECT_SAMPLES, "seq_len": PROJECT_LEN, "steps": PROJECT_STEPS}, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("params", "paper"), default="params")
    ap.add_argument("--params", default="params.yaml", help="params: the pipeline's params file")
    ap.add_argument("--num", type=int, default=16, help="params: samples per run")
    ap.add_argument("--models", default="models", help="params: the folder of the trained <kernel>/model.pt")
    ap.add_argument("--profile", default="params/lm1b.yaml", help="paper: model, sampler and kernel settings")
    ap.add_argument("--vocab", type=int, default=30522, help="paper: vocabulary size")
    ap.add_argument("--lengths", default="128,1024", help="paper: sequence lengths")
    ap.add_argument("--batch", type=int, default=0, help="paper: samples per batch (default 64 at L <= 128, else 32)")
    ap.add_argument("--steps", type=int, default=128, help="paper: sampling steps S")
    ap.add_argument("--samplers", default="ancestral,blockwise", help="paper: samplers to time")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:<n>")
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. other jobs running)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    try:
        device = resolve_device(args.device, "--device")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    result = {"machine": machine(str(device)), "versions": versions(), "device": str(device), "note": args.note,
              "load_average_at_start": os.getloadavg()[0]}
    result.update(run_paper(args, device) if args.config == "paper" else run_params(args, device))
    result["load_average_at_end"] = os.getloadavg()[0]
    out = Path(args.out or ("benchmarks/results/sampling.json" if args.config == "params"
                            else f"benchmarks/results/sampling_paper_{device.type}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'kernel':<12} {'sampler':<16} {'L':>5} {'B':>4} {'S':>5} {'NFE':>5} {'NFE/S':>6} {'samples/s':>10}")
    for r in result["rows"]:
        print(f"{r['kernel']:<12} {r['sampler']:<16} {r['seq_len']:>5} {r['batch']:>4} {r['steps']:>5} {r['nfe']:>5} "
              f"{r['nfe_over_steps']:>6.2f} {r['samples_per_s']:>10.2f}"
              + (f"  1,000 x L 1,024 x 1,024 steps: {r['projected_hours']:.2f} h" if "projected_hours" in r else ""))
    if "cache_speedup_mask" in result:
        print("cache speedup (plain / cached wall time, mask):",
              {k: round(v, 2) for k, v in result["cache_speedup_mask"].items()})
    print(f"({result['machine']}) wrote {out}")


if __name__ == "__main__":
    main()
