"""Models: the shared encoder, the task heads and the multi-task model that joins them."""

from mtl.models.encoder import Encoder, EncoderConfig, EncoderOutput
from mtl.models.heads import HEADS, Head, build_head, get_head, register_head
from mtl.models.model import MultiTaskModel

__all__ = [
    "HEADS",
    "Encoder",
    "EncoderConfig",
    "EncoderOutput",
    "Head",
    "MultiTaskModel",
    "build_head",
    "get_head",
    "register_head",
]
