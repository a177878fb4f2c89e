"""A minimal pure-JAX BERT classification train step: the floor for framework overhead.

No modules, no registries, no sharding: a dict of arrays, one jitted function with donated
buffers, the same model as mtl's step (post-LayerNorm BERT, exact GELU, tanh pooler, linear
classifier, cross-entropy, global-norm clipping and AdamW from optax, dropout where HF BERT has
it). bench_train.py times it in the same run as mtl and PyTorch: mtl / this is mtl's own
overhead, and torch / this is what XLA:CPU's kernels make of the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def init(key: jax.Array, *, vocab: int, hidden: int, layers: int, intermediate: int, positions: int = 512,
         labels: int = 3) -> dict:
    keys = iter(jax.random.split(key, 8 * layers + 8))

    def dense(n_in, n_out):
        return {"w": 0.02 * jax.random.normal(next(keys), (n_in, n_out)), "b": jnp.zeros((n_out,))}

    def norm():
        return {"scale": jnp.ones((hidden,)), "bias": jnp.zeros((hidden,))}

    return {
        "word": 0.02 * jax.random.normal(next(keys), (vocab, hidden)),
        "position": 0.02 * jax.random.normal(next(keys), (positions, hidden)),
        "token_type": 0.02 * jax.random.normal(next(keys), (2, hidden)),
        "embed_norm": norm(),
        "layers": [{"q": dense(hidden, hidden), "k": dense(hidden, hidden), "v": dense(hidden, hidden),
                    "o": dense(hidden, hidden), "attn_norm": norm(), "ffn_in": dense(hidden, intermediate),
                    "ffn_out": dense(intermediate, hidden), "ffn_norm": norm()} for _ in range(layers)],
        "pooler": dense(hidden, hidden),
        "classifier": dense(hidden, labels),
    }


def _norm(x, p, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["w"] + p["b"]


def loss_fn(params: dict, batch: dict, key: jax.Array | None, *, heads: int, rate: float = 0.1) -> jax.Array:
    keys = iter(jax.random.split(key, 4 * len(params["layers"]) + 2)) if key is not None else None

    def dropout(x):
        if keys is None:
            return x
        return jnp.where(jax.random.bernoulli(next(keys), 1.0 - rate, x.shape), x / (1.0 - rate), 0.0)

    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, t = ids.shape
    x = params["word"][ids] + params["position"][:t][None] + params["token_type"][batch["token_type_ids"]]
    x = dropout(_norm(x, params["embed_norm"]))
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    d = x.shape[-1] // heads
    for p in params["layers"]:
        q, k, v = (_dense(x, p[n]).reshape(b, t, heads, d) for n in ("q", "k", "v"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + bias
        probs = dropout(jax.nn.softmax(scores, axis=-1))
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
        x = _norm(x + dropout(_dense(context, p["o"])), p["attn_norm"])
        h = jax.nn.gelu(_dense(x, p["ffn_in"]), approximate=False)
        x = _norm(x + dropout(_dense(h, p["ffn_out"])), p["ffn_norm"])
    pooled = dropout(jnp.tanh(_dense(x[:, 0], params["pooler"])))
    logits = _dense(pooled, params["classifier"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def make_step(tx: optax.GradientTransformation, *, heads: int, dropout: bool):
    """jitted `(params, opt_state, batch, step) -> (params, opt_state, loss)`, buffers donated."""

    def step(params, opt_state, batch, step):
        key = jax.random.fold_in(jax.random.key(0), step) if dropout else None
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key, heads=heads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))
