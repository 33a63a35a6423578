"""The library objects that stages build from upstream outs: the train unigram, a kernel, a trained denoiser."""

from __future__ import annotations

import torch

from pipeline.artifacts import Vocab, load_graph, load_prior, model_path
from pipeline.common import StageError, require
from semdlm.config import Params
from semdlm.kernels import Kernel, build_kernel
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
    neighbours = load_graph()[0] if name in ("knn", "semdlm_plus") else None
    try:
        return build_kernel(name, cfg, mask_id=vocab.mask, valid=prior["valid"], unigram_nu=prior["nu"],
                            neighbours=neighbours)
    except ValueError as e:
        raise StageError(str(e)) from None


def load_denoiser(kernel: str) -> Denoiser:
    """The trained model of ``kernel`` (weights-only load: no pickle of code)."""
    path = require(model_path(kernel), f"train@{kernel}")
    try:
        return Denoiser.load(path)
    except Exception as e:  # noqa: BLE001
        raise StageError(
            f"{path} is not a usable model ({e.__class__.__name__}); run `dvc repro train@{kernel}`"
        ) from None
