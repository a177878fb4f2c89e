"""MultiTaskModel: one shared encoder, one head per task.

The task is a static Python string: a jitted step specialises on it (one compile per task and
length bucket), and inside the step everything is a pure function of the model state.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

from mtl.errors import MtlError
from mtl.models.encoder import Encoder
from mtl.models.heads import Batch, Head


class MultiTaskModel(nnx.Module):
    """A shared `Encoder` and a `{task name: Head}` dict."""

    def __init__(self, encoder: Encoder, heads: Mapping[str, Head]):
        self.encoder = encoder
        self.heads = nnx.Dict(dict(heads))

    def head(self, task: str) -> Head:
        """`task`'s head; an unknown task is an MtlError listing the model's tasks."""
        if task not in self.heads:
            raise MtlError(f"task {task!r} has no head in this model; tasks: {sorted(self.heads)}")
        return self.heads[task]

    def __call__(self, task: str, batch: Batch, *, dropout_rng: jax.Array | None = None,
                 frozen_below: int = 0) -> jax.Array:
        """The task head's logits for a batch (see mtl.data for the batch's arrays). A multiple-choice
        batch's [B, K, T] inputs are encoded as B*K rows, which its head regroups.

        `frozen_below`: the encoder's (its embeddings and lowest N layers take no gradient)."""
        head = self.head(task)
        encoder_rng = head_rng = None
        if dropout_rng is not None:
            encoder_rng, head_rng = jax.random.split(dropout_rng)
        inputs = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        if inputs[0].ndim == 3:  # multiple choice, [B, K, T]: each choice is a row of its own
            inputs = tuple(None if x is None else x.reshape(-1, x.shape[-1]) for x in inputs)
        encoded = self.encoder(*inputs, dropout_rng=encoder_rng, frozen_below=frozen_below)
        return head(encoded, batch, dropout_rng=head_rng)

    def loss(self, task: str, batch: Batch, *, dropout_rng: jax.Array | None = None,
             frozen_below: int = 0) -> tuple[jax.Array, jax.Array]:
        """(scalar loss, logits) for a batch of `task`."""
        logits = self(task, batch, dropout_rng=dropout_rng, frozen_below=frozen_below)
        return self.head(task).loss(logits, batch), logits
