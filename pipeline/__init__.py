"""DVC stage commands for semdlm (``python -m pipeline <stage>``): params, file I/O and MLflow only."""
