"""The HF fast tokenizer that sits beside a checkpoint's weights, with padding left to mtl.

Some tokenizer.json files carry padding and truncation settings (the packaged MiniLM pads and
truncates everything to 128). Those settings would silently fix every sequence length, so they
are cleared on load: the data pipeline pads to its own length buckets and truncates to the
task's max length, per call.
"""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mtl.assets import resolve_model
from mtl.errors import MtlError

# Files a fast tokenizer can be built from. Without any of them transformers 5 quietly builds
# an empty vocabulary from config.json alone, which maps every word to [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def load_tokenizer(name_or_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load the fast tokenizer of a model name or directory, with no baked-in padding/truncation."""
    directory = resolve_model(name_or_dir)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise MtlError(f"{directory}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    except (OSError, ValueError) as e:
        raise MtlError(f"{directory}: cannot load a tokenizer ({e})") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise MtlError(f"{directory}: no fast tokenizer (tokenizer.json) could be built")
    backend.no_padding()
    backend.no_truncation()
    return tokenizer
