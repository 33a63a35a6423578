"""Small offline assets for tests: a tiny params file and a tiny randomly initialised causal evaluator LM."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "data": {"source": "bbcnews", "seq_len": 16, "max_docs": 60, "min_count": 3, "validation_fraction": 0.1},
    "graph": {"k_max": 8, "chunk_size": 256},
    "prior": {"min_count": 3, "tau": 0.5},
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2},
    "train": {"steps": 6, "batch_size": 8, "lr": 0.003, "warmup_steps": 2, "eval_every": 3, "eval_batches": 1,
              "val_sequences": 128, "val_repeats": 2, "bound_steps": 8, "ckpt_every": 2, "log_every": 2},
    "kernels": {"mask": {}},
    "sampler": {"steps": 4, "num_samples": 4, "batch_size": 4},
    "eval": {"batch_size": 4, "num_reference": 4},
}


def tiny_evaluator(path: Path) -> Path:
    """A 1-layer GPT-2 with the bert-base-uncased tokenizer, saved like any local HF model directory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from pipeline import assets

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast(tokenizer_object=assets.tokenizer(), bos_token="[CLS]", eos_token="[SEP]",
                                  pad_token="[PAD]", unk_token="[UNK]")
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


GPT2_LAYOUT_WORDS = ("<|endoftext|>", "the", "cat", "sat", "on", "mat", "a", "dog", "[", "unk", "]")


def gpt2_layout_evaluator(path: Path) -> Path:
    """A 1-layer GPT-2 whose tokenizer has GPT-2's special-token layout: BOS = EOS = UNK = <|endoftext|> (id 0),
    no pad token, nothing added by default; a hand-enumerable word-level vocabulary (GPT2_LAYOUT_WORDS)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    if (path / "config.json").exists():
        return path
    eos = GPT2_LAYOUT_WORDS[0]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(GPT2_LAYOUT_WORDS)}, unk_token=eos))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=eos, eos_token=eos, unk_token=eos)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(GPT2_LAYOUT_WORDS), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_params(path: Path, evaluator: Path, **overrides: dict) -> Path:
    """The repository's params.yaml with TINY_PARAMS and ``overrides`` merged in (every key stays present)."""
    from semdlm.config import deep_merge

    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_PARAMS)
    params["eval"]["model"] = str(evaluator)
    params = deep_merge(params, overrides)
    params["kernels"] = overrides.get("kernels", TINY_PARAMS["kernels"])
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path
