"""mtl: transfer learning for NLP in JAX.

The public API, for research scripts; the `mtl` CLI is a thin layer over these names.

The names load on first use (PEP 562): `import mtl` itself imports neither JAX nor transformers,
so `mtl --help` and the CLI's usage errors answer at once instead of after 3-4 s of imports.
"""

import importlib
import os
from typing import TYPE_CHECKING, Any

# mtl uses transformers for tokenizers and configs only, so its import-time advice that
# "PyTorch was not found" is expected noise on every command; set the variable to 0 to see it.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# name -> the module that defines it
_PUBLIC = {
    "DEFAULT_MODEL": "mtl.assets",
    "resolve_model": "mtl.assets",
    "TaskData": "mtl.data.pipeline",
    "load_task_data": "mtl.data.pipeline",
    "MtlError": "mtl.errors",
    "Encoder": "mtl.models.encoder",
    "EncoderConfig": "mtl.models.encoder",
    "EncoderOutput": "mtl.models.encoder",
    "MultiTaskModel": "mtl.models.model",
    "TaskSpec": "mtl.tasks",
    "load_task": "mtl.tasks",
    "load_tasks": "mtl.tasks",
    "load_tokenizer": "mtl.tokenizer",
}

__all__ = [  # the names of _PUBLIC, written out for tools that read __all__ without running it
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

if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from mtl.assets import DEFAULT_MODEL, resolve_model
    from mtl.data.pipeline import TaskData, load_task_data
    from mtl.errors import MtlError
    from mtl.models.encoder import Encoder, EncoderConfig, EncoderOutput
    from mtl.models.model import MultiTaskModel
    from mtl.tasks import TaskSpec, load_task, load_tasks
    from mtl.tokenizer import load_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:  # `from mtl import hf` then imports the submodule
        raise AttributeError(f"module 'mtl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
