"""TrainState: everything the jitted step reads and writes, as one pytree.

Host-side progress (each task stream's position, the best score, early-stopping patience)
lives in the checkpoint's metadata beside it; see mtl.checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    """Attributes:
      step: number of train steps taken (int32 scalar).
      params: {"model": the MultiTaskModel's nnx.Param state, "log_vars": [num_tasks] learned
        log-variances for uncertainty weighting (unused under static weighting)}.
      opt_state: the optax state.
      rng: raw key data of the run's base key; step s uses fold_in(key, s), so there is no RNG
        state to carry and a resumed run draws the same dropout masks.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Any, tx, seed: int) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jax.random.key_data(jax.random.key(seed)))

    def step_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
