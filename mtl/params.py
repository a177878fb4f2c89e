"""Parameter trees as flat {dotted name: value} dicts, e.g. "encoder.layers.query.kernel", and
pytree paths as names (`path_names`, for the masks and rules that pick parameters by name).

Used by HF conversion, transfer and inference. Looped layers (nnx.List) have integer keys,
which become and come back from digit components ("encoder.layers.0.query.kernel"). Scanned
layers hold one [num_layers, ...] array per name ("encoder.layers.query.kernel");
`unstack_layers` and `stack_layers` move between the two, so that checkpoints and HF weights
do not depend on the layout a run chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util


def flatten(tree: Mapping) -> dict[str, Any]:
    """A nested dict as `{dotted name: leaf}`, e.g. `encoder.layers.0.query.kernel`."""
    return {".".join(map(str, path)): v for path, v in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """The inverse of `flatten`: digit parts become int keys, as NNX keys list items."""
    return traverse_util.unflatten_dict(
        {tuple(int(p) if p.isdigit() else p for p in name.split(".")): v for name, v in flat.items()}
    )


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A pytree path as names, e.g. ("model", "encoder", "layers", "query", "kernel").

    Leaves inside an nnx Variable end in GetAttrKey("value"); that wrapper is dropped so the
    last name is the parameter's own (without this, no parameter would ever match "kernel").
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    out = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        out.append(str(key))
    return tuple(out)


def _is_stacked(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and not name[len(prefix):].split(".", 1)[0].isdigit()


def unstack_layers(flat: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Present stacked layer params `{prefix}{rest}` ([L, ...]) as per-layer `{prefix}{i}.{rest}`
    entries; anything else (looped layers included) passes through. Abstract values
    (jax.ShapeDtypeStruct, from eval_shape) stay abstract."""
    out = {}
    for name, value in flat.items():
        if not _is_stacked(name, prefix):
            out[name] = value
            continue
        rest = name[len(prefix):]
        for i in range(value.shape[0]):
            out[f"{prefix}{i}.{rest}"] = (jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
                                          if isinstance(value, jax.ShapeDtypeStruct) else value[i])
    return out


def stack_layers(flat: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Inverse of `unstack_layers`: per-layer `{prefix}{i}.{rest}` entries become one stacked
    `{prefix}{rest}` array each."""
    out, layers = {}, {}
    for name, value in flat.items():
        if name.startswith(prefix) and not _is_stacked(name, prefix):
            i, rest = name[len(prefix):].split(".", 1)
            layers.setdefault(rest, {})[int(i)] = value
        else:
            out[name] = value
    for rest, by_index in layers.items():
        out[f"{prefix}{rest}"] = np.stack([np.asarray(by_index[i]) for i in range(len(by_index))])
    return out
