"""Models: the shared encoder (and, with the tasks issue, the task heads)."""

from mtl.models.encoder import Encoder, EncoderConfig, EncoderOutput

__all__ = ["Encoder", "EncoderConfig", "EncoderOutput"]
