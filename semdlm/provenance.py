"""What a result was computed with: the versions of the packages in use and the machine, recorded beside every
training run (``train.json``), MLflow run and benchmark table, so that a number can be traced to them."""

from __future__ import annotations

import os
import platform
from importlib import metadata

# The distributions whose versions can change a number of the pipeline (the lock pins all of them and more).
PACKAGES = ("semdlm", "torch", "numpy", "pandas", "pyarrow", "transformers", "tokenizers", "safetensors", "gguf",
            "datasets", "dvc", "mlflow")


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """{"python": ..., package: version} for the installed ``packages`` ("not installed" where one is missing)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine(device: str = "cpu") -> str:
    """One line naming the machine: the GPU's name on CUDA, else the CPU's architecture, cores and torch threads."""
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")
