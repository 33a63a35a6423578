"""dispersion: Fig. 3 data per kernel on validation text: h(t; Q), D(Q) and the between-t gradient variance.

For each t of a midpoint grid, x_t ~ q_t(. | x_0) is drawn for 2 x ``dispersion.sequences`` validation
sequences; the same tokens give the posterior entropy h(t; Q) (semdlm.dispersion) and, split in two halves,
two independent gradients of L_t = mean_i -log p_theta(x_0^i | x_t) at the trained parameters; both for the model of
the kernel entry (``kernels.<name>.latent_state``: the x_t-only posterior and network of the paper's model, or the
latent-state posterior and the network that sees the state). One process for
every kernel: a few seconds each on a 2-core CPU. Everything runs on ``dispersion.device`` (the network in the
training precision, the posterior entropies in float64, the draws from a generator on that device).
"""

from __future__ import annotations

import time

import torch

from pipeline.artifacts import DISPERSION, Vocab, load_split, load_vocab
from pipeline.common import StageError, write_json
from pipeline.loaders import load_denoiser, load_kernel, load_unigram
from semdlm.config import Params
from semdlm.devices import autocast, on_device, resolve_device
from semdlm.dispersion import between_t_variance, dispersion, mean_posterior_entropy, midpoint_times
from semdlm.kernels import Kernel
from semdlm.loss import token_ce
from semdlm.model import Denoiser


def gradient(model: Denoiser, kernel: Kernel, x0: torch.Tensor, xt: torch.Tensor, state: torch.Tensor,
             t: float, precision: str, latent: bool) -> torch.Tensor:
    """Flattened d L_t / d theta on one batch (the unweighted denoising CE of the paper's Sec. 3.2.3), on the
    device of ``x0`` in the training ``precision``; ``latent``: the model sees the latent state."""
    model.zero_grad(set_to_none=True)
    seen = state if latent else None
    with autocast(x0.device, precision):
        logits = model(xt, torch.full((x0.shape[0],), t, dtype=torch.float32, device=x0.device), seen)
        ce = token_ce(logits, x0, kernel, xt, seen)
    ce.mean().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def measure(params: Params, kernel_name: str, vocab: Vocab, unigram: torch.Tensor, x0: torch.Tensor) -> dict:
    """Fig. 3 numbers of one kernel on the device of ``x0`` (2 x dispersion.sequences validation rows); ``unigram``:
    the train unigram (the per-token data law of the posterior)."""
    cfg, device = params.dispersion, x0.device
    kernel = on_device(load_kernel(kernel_name, params, vocab), device)
    latent = params.kernels[kernel_name].latent_state
    model = load_denoiser(kernel_name, latent).to(device)
    n = cfg.sequences
    times = midpoint_times(cfg.times, params.train.t_eps)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.perf_counter()
    h, ga, gb = [], [], []
    for t in times.tolist():
        xt, state = kernel.corrupt(x0, torch.full((x0.shape[0],), t, dtype=torch.float64, device=device), gen)
        h.append(mean_posterior_entropy(kernel, unigram, xt, t, state if latent else None))
        ga.append(gradient(model, kernel, x0[:n], xt[:n], state[:n], t, params.train.precision, latent))
        gb.append(gradient(model, kernel, x0[n:], xt[n:], state[n:], t, params.train.precision, latent))
    h = torch.tensor(h, dtype=torch.float64)
    between, noise = between_t_variance(torch.stack(ga), torch.stack(gb))
    return {"times": times.tolist(), "posterior_entropy": h.tolist(), "dispersion": dispersion(h),
            "mean_posterior_entropy": float(h.mean()), "grad_var_between": between, "grad_noise": noise,
            "model": "latent-state" if latent else "paper", "sequences": n, "device": str(device),
            "dispersion_s": time.perf_counter() - start}


def run(params: Params) -> None:
    device = resolve_device(params.dispersion.device, "dispersion.device")
    validation = load_split("validation")
    if len(validation) < 2 * params.dispersion.sequences:
        raise StageError(
            f"dispersion.sequences={params.dispersion.sequences} needs {2 * params.dispersion.sequences} validation "
            f"sequences but the validation split has {len(validation)}; lower dispersion.sequences"
        )
    vocab = load_vocab()
    unigram = load_unigram(vocab).to(device)
    x0 = validation[: 2 * params.dispersion.sequences].to(device)
    write_json(DISPERSION, {k: measure(params, k, vocab, unigram, x0) for k in params.kernels})
