"""mtl: transfer learning for NLP in JAX.

The public API, for research scripts; the `mtl` CLI is a thin layer over these names.
"""

from mtl.assets import DEFAULT_MODEL, resolve_model
from mtl.errors import MtlError
from mtl.models.encoder import Encoder, EncoderConfig, EncoderOutput
from mtl.tokenizer import load_tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "Encoder",
    "EncoderConfig",
    "EncoderOutput",
    "MtlError",
    "load_tokenizer",
    "resolve_model",
]
