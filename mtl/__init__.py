"""mtl: transfer learning for NLP in JAX.

The public API, for research scripts; the `mtl` CLI is a thin layer over these names.
"""

import os

# mtl uses transformers for tokenizers and configs only, so its import-time advice that
# "PyTorch was not found" is expected noise on every command; set the variable to 0 to see it.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from mtl.assets import DEFAULT_MODEL, resolve_model
from mtl.data.pipeline import TaskData, load_task_data
from mtl.errors import MtlError
from mtl.models.encoder import Encoder, EncoderConfig, EncoderOutput
from mtl.models.model import MultiTaskModel
from mtl.tasks import TaskSpec, load_task, load_tasks
from mtl.tokenizer import load_tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "Encoder",
    "EncoderConfig",
    "EncoderOutput",
    "MtlError",
    "MultiTaskModel",
    "TaskData",
    "TaskSpec",
    "load_task",
    "load_task_data",
    "load_tasks",
    "load_tokenizer",
    "resolve_model",
]
