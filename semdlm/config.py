"""Frozen dataclass configs, one per params.yaml section, validated on construction; params files read and merged.

A bad value raises ``ConfigError`` with a one-line message naming the key, the value and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

PACKINGS = ("wrap", "cls_sep")  # data.packing: BD3-LM's wrap; [CLS] doc [SEP] cut into rows (text: report)
PROTOCOLS = ("auto", "mdlm", "windows")  # eval.protocol: MDLM's gen PPL or [BOS] text [EOS] windows (text: evaluate)


class ConfigError(ValueError):
    """A params.yaml value that cannot be used; the message names it and says how to fix it."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check_device(value: str, key: str) -> None:
    """A device setting: ``auto`` (CUDA when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:<n>``."""
    _check(isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None,
           f"{key}={value!r} is not a device; use auto (CUDA when available), cpu, cuda or cuda:<index>")


SYNTHETIC = "synthetic"  # data.source of the seeded language whose law is known (semdlm/synthetic.py)


@dataclass(frozen=True)
class SyntheticConfig:
    """``data.synthetic``: the hidden Markov language of ``data.source: synthetic`` (semdlm/synthetic.py).

    ``states`` hidden states, each emitting from its own cluster of ``cluster_size`` MiniLM-close whole-word
    tokens (drawn from the ``pool`` most frequent ones); transition rows ~ Dirichlet(``transition_concentration``)
    (small = peaked = a low entropy rate), emission rows ~ Dirichlet(``emission_concentration``) over the cluster.
    ``sequences`` rows in all (``data.validation_fraction`` of them held out). ``seed`` fixes the language (clusters and
    probabilities); ``data.seed`` the corpus drawn from it.
    """

    states: int = 32
    cluster_size: int = 16
    transition_concentration: float = 0.1
    emission_concentration: float = 1.0
    sequences: int = 20000
    pool: int = 4000
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.states >= 2, f"data.synthetic.states={self.states} must be >= 2 (e.g. 32)")
        _check(self.cluster_size >= 2, f"data.synthetic.cluster_size={self.cluster_size} must be >= 2 (e.g. 16)")
        _check(self.pool >= self.states * self.cluster_size,
               f"data.synthetic.pool={self.pool} must be >= states x cluster_size = "
               f"{self.states * self.cluster_size}; raise pool or lower states / cluster_size")
        for key in ("transition_concentration", "emission_concentration"):
            value = getattr(self, key)
            _check(0.01 <= value <= 1e3 and math.isfinite(value),
                   f"data.synthetic.{key}={value} must be in [0.01, 1000] (a Dirichlet concentration; small = peaked)")
        _check(self.sequences >= 2,
               f"data.synthetic.sequences={self.sequences} must be >= 2 (train and validation rows)")


@dataclass(frozen=True)
class DataConfig:
    source: str = "bbcnews"  # synthetic (params.yaml), bbcnews, lm1b / openwebtext / wikitext103, a .txt, a hub id
    path: str = ""  # lm1b / openwebtext / wikitext103: local copy (save_to_disk dir, parquet dir/file); "" = hub id
    text_field: str = "text"
    hf_split: str = "train"
    seq_len: int = 64
    validation_fraction: float = 0.05
    max_docs: int = 0  # 0 = all documents
    vocab: str = "compact"  # "compact" (ids seen >= min_count in train + specials) or "full" (30,522)
    min_count: int = 10
    seed: int = 0
    workers: int = 1  # tokenizer processes (named sources stream through them)
    shard_sequences: int = 65536  # packed sequences per parquet shard of data/tokens/<split>/
    packing: str = "cls_sep"  # "wrap": BD3-LM (doc [CLS] ..., rows [CLS] + L-2 + [CLS]); "cls_sep": [CLS] doc [SEP]
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # used by source: synthetic only

    def __post_init__(self) -> None:
        if isinstance(self.synthetic, dict):  # the nested params mapping, checked key by key like a section
            object.__setattr__(self, "synthetic", section(SyntheticConfig, self.synthetic, "data.synthetic"))
        _check(isinstance(self.synthetic, SyntheticConfig),
               f"data.synthetic={self.synthetic!r} must be a mapping of its keys, e.g. {{states: 32}}")
        _check(self.workers >= 1, f"data.workers={self.workers} must be >= 1")
        _check(self.shard_sequences >= 1, f"data.shard_sequences={self.shard_sequences} must be >= 1")
        _check(self.seq_len >= 8, f"data.seq_len={self.seq_len} is too short; use seq_len >= 8 (e.g. 64)")
        _check(0 < self.validation_fraction < 1,
               f"data.validation_fraction={self.validation_fraction} must be in (0, 1)")
        _check(self.vocab in ("compact", "full"), f"data.vocab={self.vocab!r}: use 'compact' or 'full'")
        _check(self.min_count >= 1, f"data.min_count={self.min_count} must be >= 1")
        _check(self.max_docs >= 0, f"data.max_docs={self.max_docs} must be >= 0 (0 = all)")
        _check(self.packing in PACKINGS, f"data.packing={self.packing!r} is unknown; use 'wrap' (BD3-LM) or 'cls_sep'")


@dataclass(frozen=True)
class GraphConfig:
    k_max: int = 16
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        _check(self.k_max >= 1, f"graph.k_max={self.k_max} must be >= 1")
        _check(self.chunk_size >= 1, f"graph.chunk_size={self.chunk_size} must be >= 1")


@dataclass(frozen=True)
class PriorConfig:
    min_count: int = 10
    tau: float = 0.5

    def __post_init__(self) -> None:
        _check(self.min_count >= 1, f"prior.min_count={self.min_count} must be >= 1")
        _check(0 <= self.tau <= 1, f"prior.tau={self.tau} must be in [0, 1] (Eq. 119)")


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    time_conditioning: bool = True
    cond_dim: int = 0  # width of the time embedding feeding adaLN; 0 = d_model (MDLM/BD3-LM small: 128)

    def __post_init__(self) -> None:
        _check(self.cond_dim >= 0, f"model.cond_dim={self.cond_dim} must be >= 0 (0 = d_model)")
        _check(self.d_model > 0 and self.n_layers > 0, "model.d_model and model.n_layers must be > 0")
        _check(
            self.n_heads > 0 and self.d_model % self.n_heads == 0 and (self.d_model // self.n_heads) % 2 == 0,
            f"model.n_heads={self.n_heads} must divide d_model={self.d_model} into an even head size",
        )
        _check(0 <= self.dropout < 1, f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.98  # AdamW beta2 (MDLM / BD3-LM: 0.999)
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0
    t_eps: float = 1e-3
    antithetic: bool = True  # low-discrepancy t: one uniform offset per batch, strided
    eval_every: int = 100
    eval_batches: int = 8
    val_sequences: int = 256  # validation sequences scored by the final bound
    val_repeats: int = 2  # independent (t, x_t) draws per validation sequence in the final bound
    bound_steps: int = 8  # T of the discrete-time validation ELBO (docs/likelihood.md)
    ckpt_every: int = 100
    log_every: int = 10
    threads: int = 0  # torch intra-op threads; 0 = torch default, under torchrun the node's cores // its ranks
    seed: int = 0
    devices: int = 1  # processes (GPUs); > 1: the dvc stage launches torchrun --nproc_per_node=devices
    grad_accum: int = 1  # micro-batches per optimiser step on each device; batch_size is the global batch
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    precision: str = "bf16"  # "bf16": autocast to bfloat16 on CUDA (CPU always float32); "fp32"
    compile: bool = False  # torch.compile the denoiser
    ema: float = 0.0  # EMA decay of the weights used for validation, sampling and model.pt; 0 = off
    deterministic: bool = False  # torch.use_deterministic_algorithms (+ CUBLAS_WORKSPACE_CONFIG on CUDA)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
        _check(self.devices >= 1 and self.grad_accum >= 1,
               f"train.devices={self.devices}, train.grad_accum={self.grad_accum} must be >= 1")
        _check(self.batch_size % (self.devices * self.grad_accum) == 0,
               f"train.batch_size={self.batch_size} must be divisible by devices x grad_accum = "
               f"{self.devices * self.grad_accum}; change one of them")
        _check(self.device in ("auto", "cpu", "cuda"), f"train.device={self.device!r}: use auto, cpu or cuda")
        _check(self.precision in ("bf16", "fp32"), f"train.precision={self.precision!r}: use bf16 or fp32")
        _check(0 <= self.ema < 1, f"train.ema={self.ema} must be in [0, 1) (0 = off; MDLM uses 0.9999)")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        _check(self.lr > 0 and math.isfinite(self.lr), f"train.lr={self.lr} must be a positive number")
        _check(0 < self.t_eps < 1, f"train.t_eps={self.t_eps} must be in (0, 1)")
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
               f"train.adam_beta1={self.adam_beta1}, adam_beta2={self.adam_beta2} must be in [0, 1) (MDLM: 0.9, 0.999)")
        _check(self.adam_eps > 0, f"train.adam_eps={self.adam_eps} must be > 0 (MDLM: 1e-8)")
        _check(self.threads >= 0, f"train.threads={self.threads} must be >= 0 (0 = automatic)")
        for k in ("eval_every", "eval_batches", "ckpt_every", "log_every", "val_sequences", "val_repeats",
                  "bound_steps"):
            _check(getattr(self, k) >= 1, f"train.{k}={getattr(self, k)} must be >= 1; set a positive integer")


@dataclass(frozen=True)
class KernelConfig:
    """One ``kernels.<name>`` entry: its family, its model and the hyperparameters named as in Eq. 118-119 (unused
    ones are ignored by simple kernels). ``parse_params`` sets ``type`` to the entry's key when the entry names
    none and the key is a family name, so ``kernels: {mask: {}}`` stays valid."""

    type: str = "mask"  # family: mask (Eq. 5), uniform (Eq. 6), knn (Eq. 7), semdlm_plus (Eq. 117)
    latent_state: bool = False  # ours: the denoiser also sees each token's mixture branch; false = the paper's model
    alpha_min: float = 0.0
    beta: float = 1.0  # exponent of the retention schedule alpha_t
    beta_max: float = 1.0
    eta: float = 2.0
    k_max: int = 16
    gamma: float = 1.0
    k: int = 8  # fixed neighbourhood of the knn kernel
    nu: str = "uniform"  # global jump distribution: "uniform" over valid ids or "unigram" (prior stage)
    lambda_chg: float = 1.0  # Eq. 120 weight of positions the kernel changed
    lambda_same: float = 1.0  # Eq. 120 weight of unchanged positions
    time_weight: str = "elbo"  # "elbo": -alpha'_t / (1 - alpha_t) on the CE (the mask NELBO); "none": Eq. 3

    def __post_init__(self) -> None:
        _check(self.nu in ("uniform", "unigram"), f"nu={self.nu!r} is unknown; use 'uniform' or 'unigram'")
        _check(self.k >= 1 and self.k_max >= 1, f"k={self.k}, k_max={self.k_max} must be >= 1")
        _check(self.time_weight in ("elbo", "none"), f"time_weight={self.time_weight!r}: use 'elbo' or 'none'")
        _check(
            self.lambda_chg >= 0 and self.lambda_same >= 0 and self.lambda_chg + self.lambda_same > 0,
            f"lambda_chg={self.lambda_chg}, lambda_same={self.lambda_same} must be >= 0, not both 0",
        )


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "ancestral"  # "ancestral" (the model's exact reverse step), "tau_leaping" (+ PC), "blockwise"
    steps: int | tuple[int, ...] = 64  # one count, or a list: one sample set per count (Table 3 columns, Fig. 7)
    cache: bool = True  # ancestral + mask: no network call at steps where nothing is revealed
    corrector_steps: int = 0  # tau_leaping, blockwise: corrector steps after each predictor step
    strides: int = 2  # blockwise: semi-autoregressive blocks (paper: 2)
    top_p: float = 1.0  # blockwise: nucleus truncation of the clean proposal
    top_k: int = 0  # blockwise: top-k truncation of the clean proposal (0 = off)
    rho: float = 1.0  # blockwise: confidence exponent of Eq. 121
    freeze_threshold: float = 1.0  # blockwise: freeze a position once p(x_t^i | x_t) exceeds this (1 = never)
    projection: bool = False  # blockwise: App. E.1's literal reading of Eq. 121 (docs/samplers.md); False = ours
    lambda_freq: float = 0.0  # Eq. 23 frequency penalty
    lambda_sem: float = 0.0  # Eq. 23 semantic-frequency penalty
    window: int = 16  # Eq. 23 window: positions on each side counted in n_W
    num_samples: int = 32
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"  # network and float64 sampling arithmetic: auto (CUDA when available), cpu, cuda[:n]

    def __post_init__(self) -> None:
        check_device(self.device, "sampler.device")
        if isinstance(self.steps, list):
            object.__setattr__(self, "steps", tuple(self.steps))
        counts = self.step_counts
        _check(
            len(counts) >= 1 and all(isinstance(s, int) and not isinstance(s, bool) for s in counts)
            and len(set(counts)) == len(counts),
            f"sampler.steps={list(counts)} must be an integer or a list of distinct integers, e.g. [16, 64]",
        )
        _check(min(counts) >= 1, f"sampler.steps={self.steps} must be >= 1")
        _check(self.strides >= 1, f"sampler.strides={self.strides} must be >= 1")
        _check(self.corrector_steps >= 0, f"sampler.corrector_steps={self.corrector_steps} must be >= 0")
        _check(self.corrector_steps == 0 or self.name != "ancestral",
               f"sampler.corrector_steps={self.corrector_steps} has no effect with sampler.name=ancestral; "
               "use tau_leaping or blockwise, or set it to 0")
        _check(not self.projection or self.name == "blockwise",
               f"sampler.projection=true has no effect with sampler.name={self.name}; use blockwise or set it false")
        _check(min(counts) >= self.strides,
               f"sampler.steps={self.steps} must be >= sampler.strides={self.strides}")
        _check(0 < self.top_p <= 1, f"sampler.top_p={self.top_p} must be in (0, 1]")
        _check(self.top_k >= 0, f"sampler.top_k={self.top_k} must be >= 0 (0 = no top-k truncation)")
        _check(self.rho >= 0, f"sampler.rho={self.rho} must be >= 0 (Eq. 121)")
        _check(0 < self.freeze_threshold <= 1, f"sampler.freeze_threshold={self.freeze_threshold} must be in (0, 1]")
        _check(self.lambda_freq >= 0 and self.lambda_sem >= 0,
               f"sampler.lambda_freq={self.lambda_freq}, lambda_sem={self.lambda_sem} must be >= 0")
        _check(self.window >= 1, f"sampler.window={self.window} must be >= 1")
        _check(self.num_samples >= 1, f"sampler.num_samples={self.num_samples} must be >= 1")
        _check(self.batch_size >= 1, f"sampler.batch_size={self.batch_size} must be >= 1")

    @property
    def step_counts(self) -> tuple[int, ...]:
        """The sampling-step counts, ascending: one sample set (and one evaluation) each."""
        return tuple(sorted(self.steps)) if isinstance(self.steps, tuple) else (self.steps,)


@dataclass(frozen=True)
class EvalConfig:
    model: str = "smollm2-offline"  # packaged offline evaluator, or a HF id (gpt2-large) / local path
    dtype: str = "float32"
    batch_size: int = 16
    num_reference: int = 32  # held-out texts and unigram samples scored as reference rows
    min_entropy: float = 4.8  # Table 3 threshold (nats); marked, not hidden; applied only where ln L >= it
    protocol: str = "auto"  # gen PPL: "mdlm", "windows"; "auto" = mdlm for gpt2-large, else windows
    device: str = "auto"  # where the evaluator scores: auto (CUDA when available), cpu, cuda[:n]

    def __post_init__(self) -> None:
        check_device(self.device, "eval.device")
        _check(self.protocol in PROTOCOLS,
               f"eval.protocol={self.protocol!r} is unknown; use 'mdlm' (MDLM's gen PPL), 'windows' or 'auto'")
        _check(self.dtype in ("float32", "bfloat16"), f"eval.dtype={self.dtype!r}: use float32 or bfloat16")
        _check(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be >= 1")
        _check(self.num_reference >= 1, f"eval.num_reference={self.num_reference} must be >= 1")

    @property
    def gen_ppl_protocol(self) -> str:
        """The protocol ``auto`` stands for: MDLM's with the paper's evaluator gpt2-large, else ``windows``."""
        if self.protocol != "auto":
            return self.protocol
        return "mdlm" if self.model.rstrip("/").split("/")[-1] == "gpt2-large" else "windows"


@dataclass(frozen=True)
class DispersionConfig:
    """Fig. 3 / App. B.6 measurement on validation data: a midpoint grid of ``times`` diffusion times, and
    per time two independent halves of ``sequences`` sequences (their difference estimates the gradient noise)."""

    times: int = 8
    sequences: int = 4
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available), cpu, cuda[:n]

    def __post_init__(self) -> None:
        check_device(self.device, "dispersion.device")
        _check(self.times >= 2, f"dispersion.times={self.times} must be >= 2 (a variance over t needs two times)")
        _check(self.sequences >= 1, f"dispersion.sequences={self.sequences} must be >= 1")


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: dict[str, KernelConfig] = field(default_factory=lambda: {"mask": KernelConfig()})
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dispersion: DispersionConfig = field(default_factory=DispersionConfig)


T = TypeVar("T")


def section(cls: type[T], raw: dict[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from a params mapping, rejecting unknown keys and wrong types by name."""
    raw = dict(raw or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {where}.{close[0]}?" if close else f"known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key {where}.{key} in params.yaml; {hint}")
    for key, value in raw.items():
        default = getattr(cls(), key) if key in fields else None
        if isinstance(value, list) and "tuple" in str(fields[key].type):
            continue  # a list-valued key (sampler.steps): its element checks are the dataclass's
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}.{key}={value!r} must be true or false")
        if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
            raise ConfigError(f"{where}.{key}={value!r} must be an integer")
        if isinstance(default, float) and not isinstance(value, (int, float)):
            raise ConfigError(f"{where}.{key}={value!r} must be a number")
        if isinstance(default, float):
            raw[key] = float(value)
    try:
        return cls(**raw)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def parse_params(raw: dict[str, Any]) -> Params:
    """params.yaml as a whole -> Params, with unknown sections and keys rejected."""
    known = {f.name for f in dataclasses.fields(Params)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known sections: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown section {key!r} in params.yaml{hint}")
    if "latent_state" in (raw.get("model") or {}):
        raise ConfigError("model.latent_state moved to each kernel entry: delete it from model and set "
                          "kernels.<name>.latent_state (false = the paper's model, true = ours: the latent-state one)")
    kernels_raw = raw.get("kernels") or {"mask": {}}
    if not isinstance(kernels_raw, dict) or not kernels_raw:
        raise ConfigError("kernels must be a mapping of kernel name -> settings, e.g. {mask: {}}")
    kernels = {}
    for name, cfg in kernels_raw.items():
        cfg = dict(cfg or {})
        _check(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_]+", name) is not None,
               f"kernel name {name!r} in params.yaml kernels names stages and paths; use letters, digits and _")
        cfg.setdefault("type", name)  # a key that names a family may leave type out (checked by kernels.get_kernel)
        kernels[name] = section(KernelConfig, cfg, f"kernels.{name}")
    return Params(
        data=section(DataConfig, raw.get("data"), "data"),
        graph=section(GraphConfig, raw.get("graph"), "graph"),
        prior=section(PriorConfig, raw.get("prior"), "prior"),
        model=section(ModelConfig, raw.get("model"), "model"),
        train=section(TrainConfig, raw.get("train"), "train"),
        kernels=kernels,
        sampler=section(SamplerConfig, raw.get("sampler"), "sampler"),
        eval=section(EvalConfig, raw.get("eval"), "eval"),
        dispersion=section(DispersionConfig, raw.get("dispersion"), "dispersion"),
    )


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A params file (params.yaml or a profile) as a mapping ({} for an empty file)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} not found; run from the repository root or pass --params")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({e.__class__.__name__}); fix the file") from None


def read_profile(path: str | Path) -> dict[str, Any]:
    """A profile (a partial params file) with its ``extends:`` chain resolved: ``extends: bbc.yaml`` (a path beside
    the profile) is merged in first and the profile's own values over it; a profile's kernel set replaces its base's."""
    path = Path(path)
    raw, seen = read_yaml(path), [path.resolve()]
    while "extends" in raw:
        base_path = path.parent / str(raw.pop("extends"))
        if base_path.resolve() in seen:
            raise ConfigError(f"{path}: 'extends' loops through {base_path}; remove one of them")
        seen.append(base_path.resolve())
        base = read_yaml(base_path)
        raw = merge_params(base, raw)
        path = base_path
    return raw


def merge_params(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` (a profile) merged into ``base``: mapping by mapping, except that a kernel set replaces one."""
    merged = deep_merge(base, override)
    if "kernels" in override:
        merged["kernels"] = copy.deepcopy(override["kernels"])
    return merged


def load_params(path: str | Path = "params.yaml") -> Params:
    """A params file parsed and validated (a partial file, such as a profile, takes defaults for the rest)."""
    return parse_params(read_yaml(path))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, mapping by mapping (a copy: neither argument changes)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
