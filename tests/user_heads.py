"""A head defined outside mtl, loaded by a task spec as "user_heads:MeanPoolRegression"."""

import jax.numpy as jnp
from flax import nnx

from mtl.models.heads import Head, real_rows


class MeanPoolRegression(Head):
    """Mean of the token states, a linear map to one number, squared error."""

    label_kind = "scalar"
    metric_names = ("mse",)

    def __init__(self, hidden_size, labels, *, rngs, scale: float = 1.0):
        self.scale = scale
        self.out = nnx.Linear(hidden_size, 1, rngs=rngs)

    def __call__(self, encoded, batch, *, dropout_rng=None):
        mask = batch["attention_mask"][..., None]
        pooled = (encoded.last_hidden_state * mask).sum(1) / jnp.maximum(mask.sum(1), 1)
        return self.out(pooled)[:, 0] * self.scale

    def loss(self, logits, batch):
        return jnp.sum(jnp.square(logits - batch["labels"]) * batch["weights"]) / jnp.sum(batch["weights"])

    def predict(self, logits, batch):
        return {"score": logits}

    def decode(self, predictions, batch):
        return [float(predictions["score"][i]) for i in real_rows(batch)]

    def score(self, predicted, references):
        return {"mse": float(jnp.mean((jnp.asarray(predicted) - jnp.asarray(references)) ** 2))}
