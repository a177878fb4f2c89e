"""Hugging Face checkpoints <-> `Encoder`: one name table, used in both directions.

A checkpoint is a directory with config.json and model.safetensors (or a sharded
model.safetensors.index.json). Import maps every tensor through `ARCHITECTURES[model_type]`'s
table of name patterns; export walks the same table backwards, so export is the exact inverse
of import by construction.

Import is strict:
  - a key that matches no pattern (and is not in the architecture's explicit `ignored` list of
    buffers and HF pretraining/task heads) is fatal; so is a key that matches two patterns, or
    that appears both with and without the `bert.`/`roberta.`/`distilbert.` prefix;
  - every parameter of the target encoder must be filled, and shapes must agree exactly.
Every error is an `MtlError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.assets import resolve_model
from mtl.errors import MtlError
from mtl.models.encoder import Encoder, EncoderConfig
from mtl.params import flatten, stack_layers, unflatten, unstack_layers

log = logging.getLogger(__name__)

LAYER = "{i}"  # placeholder for the layer index in both HF and mtl name templates


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape(LAYER), r"(\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parameter: HF name template, mtl path template, and whether to transpose.

    torch.nn.Linear stores weight as [out, in]; nnx.Linear's kernel is [in, out].
    """

    hf: str
    mtl: str
    transpose: bool = False

    @functools.cached_property
    def _hf_regex(self) -> re.Pattern:
        return _template_regex(self.hf)

    @functools.cached_property
    def _mtl_regex(self) -> re.Pattern:
        return _template_regex(self.mtl)

    def translate(self, name: str, to: str) -> str | None:
        """`name` rewritten into the other side's template (to="mtl" or "hf"), or None."""
        source, target = (self._hf_regex, self.mtl) if to == "mtl" else (self._mtl_regex, self.hf)
        match = source.match(name)
        if match is None:
            return None
        return target.replace(LAYER, match.group(1)) if match.groups() else target


def _translate(name: str, rules: tuple[Rule, ...], to: str) -> list[tuple[str, Rule]]:
    """Every (translated name, rule) whose template matches `name`."""
    return [(out, rule) for rule in rules if (out := rule.translate(name, to)) is not None]


def _rules(modules: list[tuple[str, str, str]]) -> tuple[Rule, ...]:
    """Expand (hf module, mtl module, kind) rows into per-parameter rules."""
    params = {
        "linear": [("weight", "kernel", True), ("bias", "bias", False)],
        "norm": [("weight", "scale", False), ("bias", "bias", False)],
        "embed": [("weight", "embedding", False)],
    }
    return tuple(
        Rule(f"{hf}.{hf_p}", f"{mtl}.{mtl_p}", transpose)
        for hf, mtl, kind in modules
        for hf_p, mtl_p, transpose in params[kind]
    )


_BERT_RULES = _rules([
    ("embeddings.word_embeddings", "embeddings.word", "embed"),
    ("embeddings.position_embeddings", "embeddings.position", "embed"),
    ("embeddings.token_type_embeddings", "embeddings.token_type", "embed"),
    ("embeddings.LayerNorm", "embeddings.norm", "norm"),
    ("encoder.layer.{i}.attention.self.query", "layers.{i}.query", "linear"),
    ("encoder.layer.{i}.attention.self.key", "layers.{i}.key", "linear"),
    ("encoder.layer.{i}.attention.self.value", "layers.{i}.value", "linear"),
    ("encoder.layer.{i}.attention.output.dense", "layers.{i}.attention_out", "linear"),
    ("encoder.layer.{i}.attention.output.LayerNorm", "layers.{i}.attention_norm", "norm"),
    ("encoder.layer.{i}.intermediate.dense", "layers.{i}.ffn_in", "linear"),
    ("encoder.layer.{i}.output.dense", "layers.{i}.ffn_out", "linear"),
    ("encoder.layer.{i}.output.LayerNorm", "layers.{i}.ffn_norm", "norm"),
    ("pooler.dense", "pooler", "linear"),
])

_DISTILBERT_RULES = _rules([
    ("embeddings.word_embeddings", "embeddings.word", "embed"),
    ("embeddings.position_embeddings", "embeddings.position", "embed"),
    ("embeddings.LayerNorm", "embeddings.norm", "norm"),
    ("transformer.layer.{i}.attention.q_lin", "layers.{i}.query", "linear"),
    ("transformer.layer.{i}.attention.k_lin", "layers.{i}.key", "linear"),
    ("transformer.layer.{i}.attention.v_lin", "layers.{i}.value", "linear"),
    ("transformer.layer.{i}.attention.out_lin", "layers.{i}.attention_out", "linear"),
    ("transformer.layer.{i}.sa_layer_norm", "layers.{i}.attention_norm", "norm"),
    ("transformer.layer.{i}.ffn.lin1", "layers.{i}.ffn_in", "linear"),
    ("transformer.layer.{i}.ffn.lin2", "layers.{i}.ffn_out", "linear"),
    ("transformer.layer.{i}.output_layer_norm", "layers.{i}.ffn_norm", "norm"),
])

# HF config.json key -> EncoderConfig field.
_BERT_CONFIG = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "hidden_act": "hidden_act",
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
    "pad_token_id": "pad_token_id",
    "initializer_range": "initializer_range",
}
_DISTILBERT_CONFIG = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_layers",
    "n_heads": "num_heads",
    "hidden_dim": "intermediate_size",
    "activation": "hidden_act",
    "dropout": "hidden_dropout",
    "attention_dropout": "attention_dropout",
    "max_position_embeddings": "max_position_embeddings",
    "pad_token_id": "pad_token_id",
    "initializer_range": "initializer_range",
    "sinusoidal_pos_embds": "sinusoidal_positions",
}

# HF buffers, and the pretraining/task heads that HF base-model checkpoints carry beside the
# encoder. These are the only keys import may skip; anything else unknown is fatal.
_BERT_IGNORED = (
    r"embeddings\.position_ids", r"embeddings\.token_type_ids",
    r"cls\..+", r"lm_head\..+", r"classifier\..+", r"qa_outputs\..+",
)
_DISTILBERT_IGNORED = (
    r"embeddings\.position_ids",
    r"vocab_transform\..+", r"vocab_layer_norm\..+", r"vocab_projector\..+",
    r"pre_classifier\..+", r"classifier\..+", r"qa_outputs\..+",
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one HF model_type maps onto `Encoder`."""

    prefix: str  # base-model prefix in task checkpoints, e.g. "bert." in BertForMaskedLM
    hf_class: str  # the transformers class that loads what we export
    rules: tuple[Rule, ...]
    config_keys: Mapping[str, str]
    fixed: Mapping[str, Any]  # EncoderConfig fields implied by the architecture
    ignored: tuple[str, ...]


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("bert", "BertModel", _BERT_RULES, _BERT_CONFIG, {}, _BERT_IGNORED),
    "roberta": Architecture(
        "roberta", "RobertaModel", _BERT_RULES, _BERT_CONFIG,
        {"padding_aware_positions": True}, _BERT_IGNORED,
    ),
    "xlm-roberta": Architecture(
        "roberta", "XLMRobertaModel", _BERT_RULES, _BERT_CONFIG,
        {"padding_aware_positions": True}, _BERT_IGNORED,
    ),
    "distilbert": Architecture(
        "distilbert", "DistilBertModel", _DISTILBERT_RULES, _DISTILBERT_CONFIG,
        {"type_vocab_size": 0, "layer_norm_eps": 1e-12}, _DISTILBERT_IGNORED,
    ),
}

_RUN_OPTIONS = ("dtype", "param_dtype", "scan_layers", "remat_policy")


# --------------------------------------------------------------------------- config


def _architecture(model_type: Any, where: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise MtlError(
            f"{where}: model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def config_from_hf(hf_config: Mapping[str, Any], where: str = "config", **run_options: Any) -> EncoderConfig:
    """Map a HF config dict (with the transformers defaults filled in) to an EncoderConfig."""
    unknown = set(run_options) - set(_RUN_OPTIONS)
    if unknown:
        raise MtlError(f"unknown run option(s) {sorted(unknown)}; known: {list(_RUN_OPTIONS)}")
    model_type = hf_config.get("model_type")
    arch = _architecture(model_type, where)
    if hf_config.get("position_embedding_type") not in (None, "absolute"):
        raise MtlError(
            f"{where}: position_embedding_type {hf_config['position_embedding_type']!r} is not "
            "supported; only absolute position embeddings are"
        )
    for flag in ("is_decoder", "add_cross_attention"):
        if hf_config.get(flag):
            raise MtlError(f"{where}: {flag}=true is not supported; mtl encoders are bidirectional")
    fields = {"model_type": model_type, **arch.fixed}
    for hf_key, field in arch.config_keys.items():
        if hf_config.get(hf_key) is None:
            raise MtlError(f"{where}: missing required key {hf_key!r}")
        fields[field] = hf_config[hf_key]
    try:
        return EncoderConfig(**fields, **run_options, hf_config=dict(hf_config))
    except MtlError as e:  # a value the encoder cannot take: say which file it came from
        raise MtlError(f"{where}: {e}") from None


def config_to_hf(config: EncoderConfig) -> dict[str, Any]:
    """The config.json to write: the imported one (if any) with the architecture fields updated."""
    arch = _architecture(config.model_type, "config")
    out = dict(config.hf_config or {})
    for hf_key, field in arch.config_keys.items():
        out[hf_key] = getattr(config, field)
    for field, value in arch.fixed.items():
        if getattr(config, field) != value:
            raise MtlError(f"{config.model_type} requires {field}={value!r}, got {getattr(config, field)!r}")
    out["model_type"] = config.model_type
    out["architectures"] = [arch.hf_class]
    return out


def read_config(directory: Path, **run_options: Any) -> EncoderConfig:
    """Read `directory/config.json` through transformers' AutoConfig (which fills defaults)."""
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MtlError(f"{path}: cannot read config ({e})") from None
    if not isinstance(raw, dict):
        raise MtlError(f"{path}: expected a JSON object")
    _architecture(raw.get("model_type"), str(path))
    from transformers import AutoConfig

    full = AutoConfig.from_pretrained(str(directory)).to_dict()
    return config_from_hf(full, str(path), **run_options)


# --------------------------------------------------------------------------- tensors


def read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (single file or sharded), as host numpy arrays."""
    from safetensors import SafetensorError, safe_open

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise MtlError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({directory / f for f in weight_map.values()})
    else:
        hint = (" (it has pytorch_model.bin: re-save it with safetensors)"
                if (directory / "pytorch_model.bin").exists() else "")
        raise MtlError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors: dict[str, np.ndarray] = {}
    # framework="flax" reads bf16 (numpy's reader cannot); pin it to host memory.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        for file in files:
            try:
                with safe_open(str(file), framework="flax") as f:
                    for key in f.keys():
                        if key in tensors:
                            raise MtlError(f"{file}: key {key!r} appears in two shards")
                        tensors[key] = np.asarray(f.get_tensor(key))
            except (SafetensorError, OSError) as e:
                raise MtlError(f"{file}: not a readable safetensors file ({e})") from None
    return tensors


def hf_to_mtl_names(
    keys: list[str], arch: Architecture, where: str
) -> tuple[dict[str, tuple[str, Rule]], list[str]]:
    """Map HF keys to per-layer mtl names. Returns ({mtl name: (hf key, rule)}, ignored keys)."""
    prefix = arch.prefix + "."
    stripped: dict[str, str] = {}
    for key in keys:
        key_norm = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)  # pre-2019 BERT names
        key_norm = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key_norm)
        bare = key_norm[len(prefix):] if key_norm.startswith(prefix) else key_norm
        if bare in stripped:
            raise MtlError(f"{where}: ambiguous keys {stripped[bare]!r} and {key!r} both map to {bare!r}")
        stripped[bare] = key
    ignored_re = [re.compile(f"^{p}$") for p in arch.ignored]
    mapped: dict[str, tuple[str, Rule]] = {}
    ignored, unexpected = [], []
    for bare, key in stripped.items():
        hits = _translate(bare, arch.rules, to="mtl")
        if not hits:
            (ignored if any(rx.match(bare) for rx in ignored_re) else unexpected).append(key)
            continue
        if len(hits) > 1:
            raise MtlError(f"{where}: key {key!r} matches several rules: {[r.hf for _, r in hits]}")
        name, rule = hits[0]
        mapped[name] = (key, rule)
    if unexpected:
        raise MtlError(f"{where}: unexpected key(s) not used by a {arch.hf_class}: {sorted(unexpected)}")
    return mapped, ignored


def load_encoder(name_or_dir: str | os.PathLike, **run_options: Any) -> Encoder:
    """Build an `Encoder` from a HF checkpoint name or directory; see the module docstring."""
    directory = resolve_model(name_or_dir)
    config = read_config(directory, **run_options)
    arch = ARCHITECTURES[config.model_type]
    tensors = read_safetensors(directory)
    where = str(directory)
    mapped, ignored = hf_to_mtl_names(list(tensors), arch, where)
    if ignored:
        log.info("%s: skipped %d buffer/head key(s): %s", where, len(ignored), sorted(ignored))
    if config.with_pooler and not any(n.startswith("pooler.") for n in mapped):
        log.info("%s: checkpoint has no pooler; the encoder is built without one", where)
        config = config.replace(with_pooler=False)

    abstract = nnx.eval_shape(lambda: Encoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    expected = unstack_layers(flatten(pure), "layers.")
    extra = sorted(mapped[n][0] for n in set(mapped) - set(expected))
    if extra:  # matched a rule, but the config has no such parameter (e.g. a layer too many)
        raise MtlError(f"{where}: unexpected key(s) for this config.json: {extra}")
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise MtlError(f"{where}: missing key(s) for parameter(s) {missing}")
    per_layer: dict[str, np.ndarray] = {}
    for name, shape_struct in expected.items():
        key, rule = mapped[name]
        value = tensors[key].T if rule.transpose else tensors[key]
        if value.shape != shape_struct.shape:
            shown = value.shape[::-1] if rule.transpose else value.shape
            want = shape_struct.shape[::-1] if rule.transpose else shape_struct.shape
            raise MtlError(f"{where}: key {key!r} has shape {tuple(shown)}, the encoder expects {tuple(want)}")
        per_layer[name] = value.astype(shape_struct.dtype)
    stacked = stack_layers(per_layer, "layers.") if config.scan_layers else per_layer
    loaded = {n: jnp.asarray(v) for n, v in stacked.items()}
    nnx.replace_by_pure_dict(state, unflatten(loaded))
    return nnx.merge(graphdef, state)


def encoder_to_hf_tensors(encoder: Encoder) -> dict[str, np.ndarray]:
    """The encoder's parameters under their HF names and layouts (the inverse of import)."""
    config = encoder.config
    arch = _architecture(config.model_type, "encoder")
    flat = unstack_layers(flatten(nnx.to_pure_dict(nnx.state(encoder))), "layers.")
    out: dict[str, np.ndarray] = {}
    for name, value in flat.items():
        hits = _translate(name, arch.rules, to="hf")
        if len(hits) != 1:
            raise MtlError(f"encoder parameter {name!r} matches {len(hits)} export rules, expected 1")
        key, rule = hits[0]
        array = np.asarray(value)
        out[key] = np.ascontiguousarray(array.T if rule.transpose else array)
    return out


def save_encoder(encoder: Encoder, directory: str | os.PathLike) -> None:
    """Write config.json and model.safetensors that `transformers.AutoModel` loads strictly."""
    from safetensors.flax import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: jnp.asarray(v) for k, v in encoder_to_hf_tensors(encoder).items()}
    tmp = directory / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})  # transformers wants format=pt
    os.replace(tmp, directory / "model.safetensors")
    hf_config = config_to_hf(encoder.config)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
