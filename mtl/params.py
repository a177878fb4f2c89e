"""Parameter trees as flat {dotted name: value} dicts, e.g. "encoder.layers.query.kernel".

Used by HF conversion, transfer and inference. Looped layers (nnx.List) have integer keys,
which become and come back from digit components ("encoder.layers.0.query.kernel").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import traverse_util


def flatten(tree: Mapping) -> dict[str, Any]:
    return {".".join(map(str, path)): v for path, v in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(
        {tuple(int(p) if p.isdigit() else p for p in name.split(".")): v for name, v in flat.items()}
    )
