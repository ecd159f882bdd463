"""Text tokenization: a Hugging Face ``tokenizer.json`` read offline by the ``tokenizers`` package,
and fixed-length id batches for BERT-family encoders (``models/pretrained/bert.py``).

``encode_batch`` follows what sentence-transformers does for one sentence per example
(``[CLS] tokens [SEP]``, longest-first truncation to ``max_len`` keeping both special tokens, right
padding with the pad id) but pads to a fixed ``max_len`` so every batch has one shape under ``jit``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tokenizers

DEFAULT_PAD_TOKEN = "[PAD]"


def load_tokenizer(tokenizer_json_path: str | os.PathLike, vocab_size: int | None = None,
                   config_path: str | os.PathLike | None = None) -> tokenizers.Tokenizer:
    """The tokenizer in ``tokenizer_json_path`` (a Hugging Face ``tokenizer.json``; no network).

    ``vocab_size``: the model's vocabulary size (``config.json``'s ``vocab_size``; ``config_path``
    names that file in the error); a tokenizer with a different size (added tokens included) is
    refused, since its ids would index the wrong embedding rows.
    """
    path = os.fspath(tokenizer_json_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    tokenizer = tokenizers.Tokenizer.from_file(path)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and size != vocab_size:
        model_file = os.fspath(config_path) if config_path is not None else "the model config"
        raise ValueError(f"tokenizer {path} has {size} tokens but {model_file} has vocab_size {vocab_size}: "
                         "they do not belong to the same model")
    return tokenizer


def pad_id(tokenizer: tokenizers.Tokenizer) -> int:
    """The tokenizer's pad id: its padding setting's ``pad_id``, else the id of ``[PAD]``."""
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    token_id = tokenizer.token_to_id(DEFAULT_PAD_TOKEN)
    if token_id is None:
        raise ValueError(f"tokenizer has no padding setting and no {DEFAULT_PAD_TOKEN} token: pass one that does")
    return int(token_id)


def encode_batch(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Token ids [N, max_len] int32 of ``texts`` (N strings): the tokenizer's post-processor template
    (``[CLS] ... [SEP]`` for BERT), truncated to ``max_len`` tokens (special tokens kept), right-padded
    with the pad id (0 for BERT).

    Sets the tokenizer's truncation and padding to ``max_len`` (as Hugging Face's fast tokenizers do
    per call) when they differ.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, got one string")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
    texts = list(texts)
    if not texts:
        return np.zeros((0, max_len), np.int32)
    pad = pad_id(tokenizer)
    truncation = tokenizer.truncation
    if truncation is None or truncation["max_length"] != max_len or truncation["stride"] != 0:
        tokenizer.enable_truncation(max_len)
    padding = tokenizer.padding
    if padding is None or padding["length"] != max_len or padding["pad_id"] != pad or padding["direction"] != "right":
        pad_token = tokenizer.id_to_token(pad) or DEFAULT_PAD_TOKEN
        tokenizer.enable_padding(direction="right", pad_id=pad, pad_token=pad_token, length=max_len)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=True)
    return np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), max_len)
