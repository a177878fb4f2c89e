"""Typed configuration files: YAML onto dataclass schemas, validated at load.

Every schema (task specs now, experiment configs with the trainer) is a dataclass. OmegaConf
merges a YAML file and dotted `key=value` overrides onto it, which rejects unknown keys,
wrong types and missing required values. `load_structured` turns OmegaConf's errors into one
`MtlError` line naming the file and the full key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtl.errors import MtlError

T = TypeVar("T")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML mapping; syntax errors name the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MtlError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise MtlError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise MtlError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MtlError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def load_structured(
    schema: type[T],
    data: Mapping[str, Any],
    *,
    where: str,
    overrides: Sequence[str] = (),
) -> T:
    """Validate `data` (plus dotted `key=value` overrides) against the dataclass `schema`.

    Raises:
      MtlError: "<where>: key 'a.b': <what is wrong>" for an unknown key, a value of the wrong
        type, or a missing required value; or a malformed override.
    """
    for override in overrides:
        if "=" not in override or not override.split("=", 1)[0]:
            raise MtlError(f"override {override!r}: expected key=value")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(schema),
            OmegaConf.create(dict(data)),
            OmegaConf.from_dotlist(list(overrides)),
        )
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        message = str(e).splitlines()[0]
        raise MtlError(f"{where}: key {key!r}: {message}" if key else f"{where}: {message}") from None


def to_yaml(obj: Any) -> str:
    """A dataclass instance as YAML (for writing the resolved config into a workdir)."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj))
