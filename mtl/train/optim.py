"""The optax chain an experiment trains with, built from its `optim` section.

    clip_by_global_norm -> adamw(schedule, decay mask) or sgd -> layer-wise scale -> (partition) -> MultiSteps

- schedule: linear warmup over warmup_ratio of the updates, then linear or cosine decay to 0,
  or constant.
- weight decay, as in HF's recipes, applies to kernels and embeddings, not to biases or
  LayerNorm scales.
- layer-wise learning-rate decay (LLRD) and freezing the lowest N layers are one static
  factor per parameter: depth d of D gets layer_decay ** (D - d), and frozen depths get 0. With
  scanned layers the factor is an array along the layer axis.
- freeze_encoder uses optax.partition with set_to_zero, so a frozen encoder also carries no
  Adam moments.
- grad_accum > 1 wraps everything in optax.MultiSteps.
- clipping multiplies by one factor rather than dividing each element as optax does, so XLA
  keeps no clipped copy of the gradients (see clip_by_global_norm).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl.config import OptimSection
from mtl.errors import MtlError
from mtl.models.encoder import EncoderConfig


def _names(path) -> tuple[str, ...]:
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


def schedule(cfg: OptimSection, total_updates: int) -> optax.Schedule:
    warmup = int(cfg.warmup_ratio * total_updates)
    decay_steps = max(total_updates - warmup, 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, warmup + decay_steps, 0.0)
    after = (optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps) if cfg.schedule == "linear"
             else optax.constant_schedule(cfg.learning_rate))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for model parameters that get weight decay: kernels and embedding tables (not
    biases, norms, loss weights or Meta-SGD's learned learning rates)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: _names(p)[0] == "model" and _names(p)[-1] in ("kernel", "embedding"), params)


def depth_factors(params: Any, encoder: EncoderConfig, layer_decay: float | None, freeze_layers: int,
                  head_lr_scale: float = 1.0) -> Any | None:
    """Per-parameter update scale for LLRD, frozen lower layers and a faster top, or None when
    none applies.

    Depth 0 is the embeddings, depth i+1 encoder layer i, depth L+1 everything above (pooler,
    heads, loss weights), which gets head_lr_scale. Frozen depths (0..freeze_layers) get 0.
    """
    if layer_decay in (None, 1.0) and freeze_layers == 0 and head_lr_scale == 1.0:
        return None
    top = encoder.num_layers + 1
    decay = 1.0 if layer_decay is None else layer_decay

    def factor_at(depth: np.ndarray) -> np.ndarray:
        scale = np.where(depth == top, head_lr_scale, decay ** (top - depth))
        return np.where(depth <= freeze_layers if freeze_layers else False, 0.0, scale).astype(np.float32)

    def factor(path, leaf):
        names = _names(path)
        if "encoder" not in names:
            return jnp.float32(factor_at(np.array(top)))
        if "embeddings" in names:
            return jnp.float32(factor_at(np.array(0)))
        if "layers" in names:
            after = names[names.index("layers") + 1]
            if after.isdigit():  # looped layers: one scalar each
                return jnp.float32(factor_at(np.array(int(after) + 1)))
            per_layer = factor_at(np.arange(1, encoder.num_layers + 1))  # scanned: [L] along axis 0
            return jnp.asarray(per_layer.reshape((-1,) + (1,) * (leaf.ndim - 1)))
        return jnp.float32(factor_at(np.array(top)))  # pooler

    return jax.tree_util.tree_map_with_path(factor, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm's clipping, applied as one scalar factor, min(1, max_norm / norm).

    optax divides every element by the norm. XLA counts a division as too costly to repeat in
    each of its consumers (Adam's two moments), so it stored the whole clipped gradient: a
    parameter-sized temporary every step (91 MB for MiniLM), which on CPU is fresh memory the
    kernel faults in each step (22 thousand page faults; a MiniLM train step took 2274 ms with
    optax's clip, 2226 ms with this one, alternating in one process). A multiplication is
    recomputed in place. Below the threshold the factor is exactly 1, as optax leaves those
    gradients; above it the result can differ from optax's in the last bit.
    """
    def clip(updates, params):
        del params
        factor = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates)

    return optax.stateless(clip)


def build_optimizer(cfg: OptimSection, params: Any, encoder: EncoderConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer for `params` ({"model": nnx.State, "log_vars": array}) over total_steps."""
    if cfg.freeze_layers > encoder.num_layers:
        raise MtlError(f"key 'optim.freeze_layers': {cfg.freeze_layers} is more than the encoder's "
                       f"{encoder.num_layers} layers")
    total_updates = max(total_steps // cfg.grad_accum, 1)
    parts = []
    if cfg.clip_norm is not None:
        parts.append(clip_by_global_norm(cfg.clip_norm))
    if cfg.optimizer == "sgd":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule(cfg, total_updates)))
    else:
        parts.append(optax.adamw(schedule(cfg, total_updates), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, mask=decay_mask))
    factors = depth_factors(params, encoder, cfg.layer_decay, cfg.freeze_layers, cfg.head_lr_scale)
    if factors is not None:
        parts.append(optax.stateless(lambda updates, _: jax.tree.map(jnp.multiply, updates, factors)))
    tx = optax.chain(*parts)
    if cfg.freeze_encoder:
        labels = jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if "encoder" in _names(p) else "train", params)
        tx = optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


def learning_rate_at(cfg: OptimSection, total_steps: int, step: int) -> float:
    """The scheduled learning rate after `step` training steps (for logging)."""
    return float(schedule(cfg, max(total_steps // cfg.grad_accum, 1))(step // cfg.grad_accum))
