"""dispersion: Fig. 3 data per kernel on validation text: h(t; Q), D(Q) and the between-t gradient variance.

For each t of a midpoint grid, x_t ~ q_t(. | x_0) is drawn for 2 x ``dispersion.sequences`` validation
sequences; the same tokens give the posterior entropy h(t; Q) (semdlm.dispersion) and, split in two halves,
two independent gradients of L_t = mean_i -log p_theta(x_0^i | x_t) at the trained parameters. One process for
every kernel: a few seconds each on a 2-core CPU.
"""

from __future__ import annotations

import time

import torch

from pipeline.artifacts import (
    DISPERSION,
    Vocab,
    load_denoiser,
    load_kernel,
    load_split,
    load_unigram,
    load_vocab,
)
from pipeline.common import StageError, write_json
from semdlm.config import Params
from semdlm.dispersion import between_t_variance, dispersion, mean_posterior_entropy, midpoint_times
from semdlm.kernels import Kernel
from semdlm.loss import token_ce
from semdlm.model import Denoiser


def gradient(model: Denoiser, kernel: Kernel, x0: torch.Tensor, xt: torch.Tensor, state: torch.Tensor,
             t: float) -> torch.Tensor:
    """Flattened d L_t / d theta on one batch (the unweighted denoising CE of the paper's Sec. 3.2.3)."""
    model.zero_grad(set_to_none=True)
    seen = state if model.num_states else None
    logits = kernel.constrain(model(xt, torch.full((x0.shape[0],), t, dtype=torch.float32), seen), xt, seen)
    token_ce(logits, x0).mean().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def measure(params: Params, kernel_name: str, vocab: Vocab, m: torch.Tensor, valid: torch.Tensor) -> dict:
    """Fig. 3 numbers of one kernel; ``m`` is the train unigram (the per-token data law of the posterior)."""
    cfg = params.dispersion
    kernel = load_kernel(kernel_name, params, vocab)
    model = load_denoiser(kernel_name)
    n = cfg.sequences
    x0 = valid[: 2 * n]
    times = midpoint_times(cfg.times, params.train.t_eps)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    h, ga, gb = [], [], []
    for t in times.tolist():
        xt, state = kernel.corrupt(x0, torch.full((x0.shape[0],), t, dtype=torch.float64), gen)
        h.append(mean_posterior_entropy(kernel, m, xt, t))
        ga.append(gradient(model, kernel, x0[:n], xt[:n], state[:n], t))
        gb.append(gradient(model, kernel, x0[n:], xt[n:], state[n:], t))
    h = torch.tensor(h, dtype=torch.float64)
    between, noise = between_t_variance(torch.stack(ga), torch.stack(gb))
    return {"times": times.tolist(), "posterior_entropy": h.tolist(), "dispersion": dispersion(h),
            "mean_posterior_entropy": float(h.mean()), "grad_var_between": between, "grad_noise": noise,
            "sequences": n, "wall_s": time.perf_counter() - start}


def run(params: Params) -> None:
    valid = load_split("valid")
    if len(valid) < 2 * params.dispersion.sequences:
        raise StageError(
            f"dispersion.sequences={params.dispersion.sequences} needs {2 * params.dispersion.sequences} validation "
            f"sequences but the valid split has {len(valid)}; lower dispersion.sequences"
        )
    vocab = load_vocab()
    m = load_unigram(vocab)
    write_json(DISPERSION, {k: measure(params, k, vocab, m, valid) for k in params.kernels})
