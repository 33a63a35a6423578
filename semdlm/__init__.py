"""semdlm: semantic diffusion language models (SemDLM+, arXiv 2606.15327) and their baselines."""

__version__ = "0.1.0"
