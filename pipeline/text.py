"""Model ids -> text: the one decoder of samples and reference rows (the sample, evaluate, reference and report
stages all turn ids into text with it)."""

from __future__ import annotations

import functools

from pipeline import assets
from pipeline.artifacts import Vocab


@functools.cache
def _bert_decoder():  # noqa: ANN202 - transformers type
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=assets.tokenizer())


def decode(vocab: Vocab, rows: list[list[int]]) -> list[str]:
    """Model ids -> text as MDLM / BD3-LM decode samples (transformers ``batch_decode`` of bert-base-uncased):
    every special token stays as text ("[UNK]", "[CLS]", ...), nothing is deleted; the same for samples and
    reference rows."""
    return _bert_decoder().batch_decode([vocab.ids[r].tolist() for r in rows], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=True)
