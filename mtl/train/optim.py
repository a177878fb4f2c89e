"""The optax chain an experiment trains with, built from its `optim` section.

    partition(frozen: set_to_zero,
              trained: (zero frozen slices) -> clip_by_global_norm -> adamw(schedule, decay mask) or sgd
                       -> layer-wise scale) -> MultiSteps

- schedule: linear warmup over warmup_ratio of the updates, then linear or cosine decay to 0,
  or constant.
- weight decay, as in HF's recipes, applies to kernels and embeddings, not to biases or
  LayerNorm scales.
- layer-wise learning-rate decay (LLRD) is one static factor per parameter: depth d of D gets
  layer_decay ** (D - d). With scanned layers the factor is an array along the layer axis.
- freezing (freeze_encoder, freeze_layers; `frozen_mask` says what) puts every wholly frozen
  parameter in optax.partition's set_to_zero part: it carries no Adam moments, and its gradient
  neither counts in the clipping norm nor needs computing: the multi-task and meta steps
  differentiate `trained_part` only. A scanned layer stack frozen only in part is one array:
  its frozen slices get a zero gradient before clipping and a zero factor after AdamW, so
  weight decay does not move them either; the encoder skips their backward (`frozen_below`).
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
from mtl.params import path_names


def schedule(cfg: OptimSection, total_updates: int) -> optax.Schedule:
    """The learning rate by update: linear warmup over `warmup_ratio` of the updates, then linear
    or cosine decay to 0, or constant (optim.schedule)."""
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
    def decays(path: tuple[Any, ...], _leaf: Any) -> bool:
        names = path_names(path)
        return names[0] == "model" and names[-1] in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def _depth(names: tuple[str, ...], leaf: Any, encoder: EncoderConfig) -> np.ndarray:
    """A parameter's depth: 0 for the embeddings, i+1 for encoder layer i, L+1 for everything
    above (pooler, heads, loss weights). A scanned layer stack gets an array, [L, 1, ...] along
    its layer axis."""
    top = encoder.num_layers + 1
    if "encoder" not in names:
        return np.array(top)
    if "embeddings" in names:
        return np.array(0)
    if "layers" in names:
        after = names[names.index("layers") + 1]
        if after.isdigit():  # looped layers: one depth each
            return np.array(int(after) + 1)
        return np.arange(1, top).reshape((-1,) + (1,) * (np.ndim(leaf) - 1))
    return np.array(top)  # pooler


def _frozen_depths(depth: np.ndarray, freeze_layers: int) -> np.ndarray:
    """True at the depths freeze_layers=N freezes: the embeddings and the lowest N layers."""
    return depth <= freeze_layers if freeze_layers else np.zeros_like(depth, bool)


def frozen_mask(params: Any, encoder: EncoderConfig, cfg: OptimSection) -> Any | None:
    """What the config freezes, per parameter: True (all of it) or False, or for a scanned layer
    stack frozen only in part, a bool array along its layer axis. None when nothing is frozen.

    freeze_encoder freezes everything under the encoder, its pooler included; freeze_layers=N
    the embeddings and the lowest N layers.
    """
    if not cfg.freeze_encoder and cfg.freeze_layers == 0:
        return None

    def frozen(path, leaf):
        names = path_names(path)
        if cfg.freeze_encoder and "encoder" in names:
            return True
        below = _frozen_depths(_depth(names, leaf, encoder), cfg.freeze_layers)
        return bool(below.all()) if below.all() or not below.any() else below

    return jax.tree_util.tree_map_with_path(frozen, params)


def frozen_below(frozen: Any | None) -> int:
    """How many lower layers a scanned stack frozen in part holds still, 0 when none is: the
    encoder's `frozen_below`, which runs them with no backward pass."""
    for mask in jax.tree.leaves(frozen):
        if isinstance(mask, np.ndarray):  # [L, 1, ...] along the layer axis
            return int(mask.reshape(len(mask), -1)[:, 0].sum())
    return 0


def trained_part(frozen: Any | None, params: Any) -> Any:
    """`params` with None for every wholly frozen parameter (`frozen`: frozen_mask's): what a
    train step differentiates. A frozen parameter then costs no gradient computation at all."""
    if frozen is None:
        return params
    return jax.tree.map(lambda m, p: None if m is True else p, frozen, params)


def with_frozen(frozen: Any | None, trained: Any, params: Any) -> Any:
    """The parameters a loss reads: `trained` (from trained_part), with each wholly frozen one
    taken from `params` as a constant of the differentiation."""
    if frozen is None:
        return trained
    return jax.tree.map(lambda m, t, p: p if m is True else t, frozen, trained, params)


def depth_factors(params: Any, encoder: EncoderConfig, layer_decay: float | None, freeze_layers: int,
                  head_lr_scale: float = 1.0) -> Any | None:
    """Per-parameter update scale for LLRD, frozen lower layers and a faster top, or None when
    none applies.

    Depth d of D = L+1 gets layer_decay ** (D - d); the top (pooler, heads, loss weights) gets
    head_lr_scale. Frozen depths (0..freeze_layers) get 0, which matters only for the frozen
    slices of a scanned stack: wholly frozen parameters never reach this factor.
    """
    if layer_decay in (None, 1.0) and freeze_layers == 0 and head_lr_scale == 1.0:
        return None
    top = encoder.num_layers + 1
    decay = 1.0 if layer_decay is None else layer_decay

    def factor(path, leaf):
        depth = _depth(path_names(path), leaf, encoder)
        scale = np.where(depth == top, head_lr_scale, decay ** (top - depth))
        return jnp.asarray(np.where(_frozen_depths(depth, freeze_layers), 0.0, scale).astype(np.float32))

    return jax.tree_util.tree_map_with_path(factor, params)


def _map_trained(fn, mask_like: Any, updates: Any) -> Any:
    """fn(mask_leaf, update) over the updates optax.partition hands its trained part; the
    frozen leaves there are MaskedNodes, which stay as they are."""
    return jax.tree.map(lambda m, u: u if isinstance(u, optax.MaskedNode) else fn(m, u), mask_like, updates)


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


def build_optimizer(cfg: OptimSection, params: Any, encoder: EncoderConfig,
                    total_steps: int) -> optax.GradientTransformation:
    """The optimizer for `params` ({"model": nnx.State, "log_vars": array}) over total_steps."""
    if cfg.freeze_layers > encoder.num_layers:
        raise MtlError(f"key 'optim.freeze_layers': {cfg.freeze_layers} is more than the encoder's "
                       f"{encoder.num_layers} layers")
    total_updates = max(total_steps // cfg.grad_accum, 1)
    frozen = frozen_mask(params, encoder, cfg)
    parts = []
    if frozen_below(frozen):
        # A scanned stack frozen in part: its frozen slices' gradients must not count in the norm.
        def zero_slices(m, g):
            return jnp.where(m, jnp.zeros_like(g), g) if isinstance(m, np.ndarray) else g

        parts.append(optax.stateless(lambda updates, _: _map_trained(zero_slices, frozen, updates)))
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
        parts.append(optax.stateless(lambda updates, _: _map_trained(jnp.multiply, factors, updates)))
    tx = optax.chain(*parts)
    if frozen is not None:
        labels = jax.tree.map(lambda m: "frozen" if m is True else "train", frozen)
        tx = optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


def learning_rate_at(cfg: OptimSection, total_steps: int, step: int) -> float:
    """The scheduled learning rate after `step` training steps (for logging)."""
    return float(schedule(cfg, max(total_steps // cfg.grad_accum, 1))(step // cfg.grad_accum))
