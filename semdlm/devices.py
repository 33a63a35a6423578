"""Where tensors live and in which precision the network runs: a device setting resolved to a torch device, and the
training precision (bf16 autocast on CUDA, float32 on the CPU) for any call of the network."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from semdlm.config import ConfigError, check_device

if TYPE_CHECKING:  # a kernel is only moved here: the evaluator's stage resolves its device without the kernels
    from semdlm.kernels import Kernel


def resolve_device(value: str, key: str, index: int = 0) -> torch.device:
    """The torch device of a device setting (``key`` names it in errors): ``auto`` = CUDA when torch sees one, else
    the CPU; ``cuda`` and ``auto`` use CUDA device ``index`` (a rank's LOCAL_RANK), ``cuda:<n>`` device n."""
    check_device(value, key)
    if value == "auto":
        value = "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return torch.device("cpu")
    device = torch.device(value) if ":" in value else torch.device("cuda", index)
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={value} but torch sees no CUDA device; use {key}=auto or cpu")
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={value} but torch sees {torch.cuda.device_count()} CUDA device(s); "
                          f"use {key}=cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The network's precision (``train.precision``): bf16 autocast on CUDA for "bf16", else float32 (the CPU)."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def in_precision(model: Callable[..., torch.Tensor], device: torch.device,
                 precision: str) -> Callable[..., torch.Tensor]:
    """``model`` called under ``autocast(device, precision)``: the samplers' ``denoise`` in the training precision."""

    def call(*args: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model(*args)

    return call


def on_device(kernel: Kernel, device: torch.device) -> Kernel:
    """``kernel`` with its tables on ``device`` (kernels are built on the CPU: no copy there)."""
    return kernel if device.type == "cpu" else kernel.to(device)
