"""The library objects that stages build from upstream outs: the train unigram, a kernel, a trained denoiser."""

from __future__ import annotations

import torch

from pipeline.artifacts import Vocab, load_graph, load_prior, model_path
from pipeline.common import StageError, require
from semdlm.config import Params
from semdlm.kernels import Kernel, family, get_kernel
from semdlm.model import Denoiser
from semdlm.prior import smoothed_unigram


def load_unigram(vocab: Vocab) -> torch.Tensor:
    """The smoothed train unigram m over x_0 ([V] float64, 0 on [MASK])."""
    return torch.from_numpy(smoothed_unigram(load_prior()["count"].numpy(), vocab.mask))


def load_kernel(name: str, params: Params, vocab: Vocab) -> Kernel:
    if name not in params.kernels:
        raise StageError(
            f"kernel {name!r} is not in params.yaml kernels ({', '.join(params.kernels)}); add a kernels.{name} section"
        )
    prior = load_prior()
    cfg = params.kernels[name]
    try:
        neighbours = load_graph()[0] if family(cfg.type, name).uses_graph else None
        return get_kernel(cfg.type, cfg, mask_id=vocab.mask, valid=prior["valid"], unigram_nu=prior["nu"],
                          neighbours=neighbours, name=name)
    except ValueError as e:
        raise StageError(str(e)) from None


def load_denoiser(kernel: str, latent: bool | None = None) -> Denoiser:
    """The trained model of ``kernel`` (weights-only load: no pickle of code); with ``latent`` (the kernel entry's
    ``latent_state``) it must be the model that entry names."""
    path = require(model_path(kernel), f"train@{kernel}")
    try:
        model = Denoiser.load(path)
    except Exception as e:  # noqa: BLE001
        raise StageError(
            f"{path} is not a usable model ({e.__class__.__name__}); run `dvc repro train@{kernel}`"
        ) from None
    if latent is not None and (model.num_states > 0) != latent:
        raise StageError(f"{path} is {'a latent-state' if model.num_states else 'an x_t-only'} model but "
                         f"kernels.{kernel}.latent_state is {str(latent).lower()}; run `dvc repro train@{kernel}`")
    return model
