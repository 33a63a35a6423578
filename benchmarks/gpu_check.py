"""Helpers of benchmarks/gpu_check.sh (run from the temporary copy it makes, which is the working directory):

    python benchmarks/gpu_check.py toy WORK                       # WORK/toy.yaml: the --dry-run sizes
    python benchmarks/gpu_check.py summary WORK STEP SAMPLING OUT DRY   # the one table, and OUT as JSON

``summary`` reads the parts' logs (WORK/<part>.log: a time stamp per line) and status files, the metrics of the
repro and the two benchmarks' JSON files; it exits 1 when a part failed or timed out.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import yaml

PARTS = ("repro", "train_step", "sampling")
CPU_STAGES = ("tokenize", "graph", "prior", "evaluator_lm", "report", "track")


def toy(work: Path) -> None:
    """The tests' tiny params and evaluator over the merged gpu-quick params, the masking kernel only (a stage
    process costs seconds on a small CPU: the four kernels' twelve stages would triple the dry run), every device
    the CPU."""
    from tests.tiny import TINY_PARAMS, tiny_evaluator

    params = {k: dict(v) for k, v in TINY_PARAMS.items()}
    params["train"].update(steps=4, device="cpu")
    params["sampler"].update(steps=[4, 8], device="cpu")
    params["eval"].update(model=str(tiny_evaluator(work / "tiny-lm")), device="cpu")
    params["dispersion"] = {"times": 2, "sequences": 2, "device": "cpu"}
    params["kernels"] = {"mask": yaml.safe_load(Path("params.yaml").read_text())["kernels"]["mask"]}
    (work / "toy.yaml").write_text(yaml.safe_dump(params))


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def stage_times(log: Path, end: float) -> dict[str, float]:
    """Seconds per stage of `dvc repro`: from its "Running stage" line to the next one (or the end of the part)."""
    starts = []
    for line in log.read_text().splitlines() if log.exists() else []:
        stamp, _, text = line.partition(" ")
        if m := re.match(r"Running stage '([^']+)'", text):
            starts.append((m.group(1), float(stamp)))
    return {name: (starts[i + 1][1] if i + 1 < len(starts) else end) - t for i, (name, t) in enumerate(starts)}


def stage_row(name: str, seconds: float, train_device: str) -> dict:
    """Device and headline figure of one repro stage, from its metrics file (empty where it wrote none)."""
    kind, _, kernel = name.partition("@")
    metrics = Path("metrics") / kernel
    row = {"part": "repro", "stage": name, "seconds": seconds, "device": "cpu", "figure": ""}
    if kind == "train":
        t = read(metrics / "train.json")
        row["device"] = train_device
        if t:
            row["figure"] = (f"{t['tokens_per_s']:,.0f} tok/s; bound {t['val_nelbo']:.2f} vs unigram "
                             f"{t['unigram_validation_ce']:.2f} nats/token")
    elif kind == "sample":
        s = read(metrics / "sample.json")
        row["device"] = s.get("device", "?")
        row["figure"] = ", ".join(f"{r['samples_per_s']:.1f} samples/s @{k}" for k, r in s.get("by_steps", {}).items())
    elif kind == "evaluate":
        e = read(metrics / "eval.json")
        row["device"] = e.get("device", "?")
        row["figure"] = ", ".join(f"gen PPL {r['gen_ppl']:,.0f} @{k} (entropy {r['entropy']:.2f})"
                                  for k, r in e.get("by_steps", {}).items())
    elif kind == "reference":
        r = read(Path("metrics/reference.json"))
        row["device"] = r.get("device", "?")
        if r:
            row["figure"] = (f"held-out gen PPL {r['heldout_text']['gen_ppl']:,.0f}, unigram samples "
                             f"{r['unigram_samples']['gen_ppl']:,.0f}")
    elif kind == "dispersion":
        d = read(Path("metrics/dispersion.json"))
        row["device"] = next(iter(d.values()), {}).get("device", "?")
        row["figure"] = ", ".join(f"D {k} {v['dispersion']:.3f}" for k, v in d.items())
    elif kind not in CPU_STAGES:
        row["device"] = "?"
    return row


def benchmark_rows(step: dict, sampling: dict, status: dict) -> list[dict]:
    """One row per length of the step benchmark (mask, with the other kernels' range) and per sampling run."""
    rows = []
    secs = {p: status[p]["end"] - status[p]["start"] for p in ("train_step", "sampling") if p in status}
    if "runs" in step:
        for run in step["runs"]:
            k = run["kernels"]
            ratios = [r["ratio_to_mask"] for r in k.values()]
            rows.append({"part": "train_step", "stage": f"paper L={run['seq_len']} B={run['batch']}",
                         "device": step["device"], "tokens_per_s": k["mask"]["tokens_per_s"], "mfu": k["mask"]["mfu"],
                         "figure": f"{k['mask']['tokens_per_s']:,.0f} tok/s, MFU {100 * k['mask']['mfu']:.1f} % "
                                   f"(mask; kernels {min(ratios):.2f}-{max(ratios):.2f}x mask)"})
    elif step:
        rows.append({"part": "train_step", "stage": f"params L={step['seq_len']} B={step['batch']}",
                     "device": step["device"], "tokens_per_s": step["tokens_per_s"], "mfu": step["mfu"],
                     "figure": f"{step['tokens_per_s']:,.0f} tok/s, MFU {100 * step['mfu']:.1f} %"})
    if rows:
        rows[0]["seconds"] = secs.get("train_step")
    start = len(rows)
    for r in sampling.get("rows", []):
        hours = f"; 1,000 x 1,024 x 1,024 steps: {r['projected_hours']:.2f} h" if "projected_hours" in r else ""
        rows.append({"part": "sampling", "stage": f"{r['kernel']} {r['sampler']} L={r['seq_len']} B={r['batch']} "
                                                  f"S={r['steps']}",
                     "device": sampling["device"], "samples_per_s": r["samples_per_s"],
                     "nfe_over_steps": r["nfe_over_steps"], "projected_hours": r.get("projected_hours"),
                     "figure": f"{r['samples_per_s']:.2f} samples/s, NFE/S {r['nfe_over_steps']:.2f}{hours}"})
    if len(rows) > start:
        rows[start]["seconds"] = secs.get("sampling")
    return rows


def summary(work: Path, step_json: Path, sampling_json: Path, out: Path, dry: bool) -> int:
    from semdlm.config import ConfigError, load_params
    from semdlm.devices import resolve_device

    status = {p: read(work / f"{p}.status") for p in PARTS if (work / f"{p}.status").exists()}
    try:
        train_device = str(resolve_device(load_params().train.device, "train.device"))
    except ConfigError:
        train_device = "none"
    repro_end = status.get("repro", {}).get("end", 0.0)
    rows = [stage_row(name, s, train_device) for name, s in stage_times(work / "repro.log", repro_end).items()]
    if "repro" in status:
        rows.append({"part": "repro", "stage": "dvc repro (all)", "seconds": repro_end - status["repro"]["start"],
                     "device": "", "figure": ""})
    rows += benchmark_rows(read(step_json), read(sampling_json), status)
    failed = {p: s for p, s in status.items() if s["rc"] != 0}
    failed.update({p: {"rc": "not run"} for p in PARTS if p not in status})
    step = read(step_json)
    result = {"dry_run": dry, "machine": step.get("machine") or read(sampling_json).get("machine", "?"),
              "total_s": sum(s["end"] - s["start"] for s in status.values()),
              "parts": {p: {"rc": s["rc"], "seconds": s["end"] - s["start"], "limit_s": s["limit_s"],
                            "timed_out": s["rc"] in (124, 137)} for p, s in status.items()},
              "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(r["stage"]) for r in rows) if rows else 10
    print(f"\ngpu_check{' --dry-run' if dry else ''} on {result['machine']}: {result['total_s']:.0f} s in all")
    print(f"{'part':<11} {'stage':<{width}} {'seconds':>8}  {'device':<7} figure")
    for r in rows:
        sec = r.get("seconds")
        sec = f"{sec:8.1f}" if isinstance(sec, float) and math.isfinite(sec) else " " * 8
        print(f"{r['part']:<11} {r['stage']:<{width}} {sec}  {r['device']:<7} {r['figure']}")
    for p, s in failed.items():
        print(f"FAILED: {p} (exit status {s['rc']}{', timed out' if s['rc'] in (124, 137) else ''}; "
              f"see its output above)")
    print(f"wrote {out}")
    return 1 if failed else 0


def main() -> None:
    cmd, work = sys.argv[1], Path(sys.argv[2])
    if cmd == "toy":
        toy(work)
    else:
        step, sampling, out, dry = sys.argv[3:7]
        raise SystemExit(summary(work, Path(step), Path(sampling), Path(out), dry == "1"))


if __name__ == "__main__":
    main()
