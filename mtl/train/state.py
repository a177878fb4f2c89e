"""TrainState: everything the jitted step reads and writes, as one pytree.

Host-side progress (each task stream's position, the best score, early-stopping patience)
lives in the checkpoint's metadata beside it; see mtl.checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mtl.sharding import StepShardings


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
    def create(cls, params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
        """Step 0: `params`, the optimizer's initial state for them, and the RNG key of `seed`."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jax.random.key_data(jax.random.key(seed)))

    def step_key(self) -> jax.Array:
        """This step's key, folded from the run's: a resumed run draws the same dropout masks."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


# The step functions' types. A train step's batch is one task's batch; a meta step's, a meta-batch
# of episodes. Metrics stay on the device until the host logs them.
Metrics = dict[str, jax.Array]
TrainStep = Callable[[TrainState, Any], tuple[TrainState, Metrics]]
UpdateStep = Callable[[TrainState, Any, Metrics], tuple[TrainState, Metrics]]


def make_update(tx: optax.GradientTransformation, *, skip_nonfinite: bool,
                shardings: StepShardings | None = None) -> UpdateStep:
    """The jitted `(state, grads, metrics) -> (state, metrics)` that applies one optimizer update.

    Both trainers share it. It depends on neither the task nor the batch shape, so a run
    compiles it once. `grads` may hold None for a frozen parameter (make_train_steps' `frozen`);
    grad_norm is then the norm of the trained ones. `metrics["total_loss"]` is the loss the
    gradients came from; a non-finite loss or gradient norm sets `finite` False, and with
    `skip_nonfinite` keeps the old params and moments (the host counts the skip). The state is
    donated. With `shardings`, the state and gradients keep their layout on the mesh and the
    metrics come back replicated.
    """
    layout = shardings.update() if shardings is not None else {}

    @functools.partial(jax.jit, donate_argnums=(0,), **layout)
    def update(state: TrainState, grads: Any, metrics: Metrics) -> tuple[TrainState, Metrics]:
        grad_norm = optax.tree.norm(grads)
        # A frozen parameter has no gradient (None): optax sees zeros, which its partition's
        # set_to_zero never reads, and the parameter's buffer passes through untouched.
        full = jax.tree.map(lambda p, g: jnp.zeros_like(p) if g is None else g, state.params, grads)
        updates, opt_state = tx.update(full, state.opt_state, state.params)
        params = jax.tree.map(lambda p, g, u: p if g is None else optax.apply_updates(p, u),
                              state.params, grads, updates)
        finite = jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            def unless_nonfinite(new, old):
                return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

            params, opt_state = unless_nonfinite(params, state.params), unless_nonfinite(opt_state, state.opt_state)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, dict(metrics, grad_norm=grad_norm, finite=finite)

    return update
