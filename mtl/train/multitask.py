"""Multi-task training: which task each step trains, how task losses combine, the pure steps.

Each task gets its own jitted `(state, batch) -> (state, metrics)` (the task is part of the
compiled program, so a run compiles once per task and length bucket). The task of step s is a
pure function of (seed, s), like the batches, so a resumed run trains the same tasks in the
same order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtl.models.heads import Batch
from mtl.sharding import StepShardings
from mtl.train.optim import frozen_below, trained_part, with_frozen
from mtl.train.state import Metrics, TrainState, TrainStep, make_update


class TaskSampler:
    """Picks the task of each step.

    proportional: p_t ~ n_t (train examples); temperature: p_t ~ n_t ** (1/T), which flattens
    the mix as T grows (T=1 is proportional, T->inf uniform); uniform; round_robin: cycle;
    rates: p_t ~ the given `rates` (mixing rates set by hand).
    """

    def __init__(self, sizes: Sequence[int], *, strategy: str, temperature: float, seed: int,
                 rates: Sequence[float] | None = None):
        sizes = np.asarray(sizes, np.float64)
        self.strategy = strategy
        self.seed = seed
        self.num_tasks = len(sizes)
        if strategy == "proportional":
            weights = sizes
        elif strategy == "temperature":
            weights = sizes ** (1.0 / temperature)
        elif strategy == "rates":
            if rates is None or len(rates) != len(sizes):
                raise ValueError(f"sampling 'rates' needs one rate per task, got {rates}")
            weights = np.asarray(rates, np.float64)
        else:
            weights = np.ones_like(sizes)
        self.probabilities = weights / weights.sum()

    def task_at(self, step: int) -> int:
        """The index of the task `step` trains: a pure function of (seed, step), so resumes agree."""
        if self.strategy == "round_robin":
            return step % self.num_tasks
        u = np.random.default_rng([self.seed, step, 0x7A5C]).random()
        return int(min(np.searchsorted(np.cumsum(self.probabilities), u, side="right"), self.num_tasks - 1))


def make_train_steps(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    tasks: Sequence[str],
    weights: Sequence[float],
    *,
    weighting: str,
    skip_nonfinite: bool,
    dropout: bool,
    shardings: StepShardings | None = None,
    frozen: Any | None = None,
) -> dict[str, TrainStep]:
    """{task: train step}, each a pure `(state, batch) -> (state, metrics)`.

    A step runs two jitted programs: the task's gradient (compiled per task and length bucket)
    and the optimizer update, which does not depend on the task or the batch shape and so is
    compiled once for the whole run instead of once per (task, bucket). `rest` is the model's
    non-trainable state (constants). With `shardings` (mtl.sharding.Layout.step_shardings),
    both are jitted with explicit in/out shardings: batch rows split over the data axes,
    params and gradients laid out by the rules table.

    `frozen` (mtl.train.optim.frozen_mask) names the parameters the optimizer leaves alone. The
    gradient program takes no gradient for a wholly frozen one (it returns None there), so a
    frozen encoder costs its forward pass only. A scanned stack frozen in part gets exact zeros
    on its frozen slices: the encoder runs its frozen layers as a scan of their own, with no
    backward pass (the encoder's `frozen_below`).
    """
    weights = jnp.asarray(weights, jnp.float32)
    below = frozen_below(frozen)

    def gradients(state: TrainState, batch: Batch, *, task: str, index: int):
        rng = state.step_key() if dropout else None

        def loss_fn(trained):
            params = with_frozen(frozen, trained, state.params)
            model = nnx.merge(graphdef, params["model"], rest)
            task_loss, _ = model.loss(task, batch, dropout_rng=rng, frozen_below=below)
            if weighting == "uncertainty":
                # Kendall et al. 2018: L / (2 sigma^2) + log sigma, with s = log sigma^2 learned.
                s = params["log_vars"][index]
                return 0.5 * jnp.exp(-s) * task_loss + 0.5 * s, task_loss
            return weights[index] * task_loss, task_loss

        (total, task_loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained_part(frozen, state.params))
        return grads, {"loss": task_loss, "total_loss": total}

    update = make_update(tx, skip_nonfinite=skip_nonfinite, shardings=shardings)
    layout = shardings.gradients() if shardings is not None else {}

    def make(task: str, index: int):
        grad_fn = jax.jit(functools.partial(gradients, task=task, index=index), **layout)

        def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
            grads, metrics = grad_fn(state, batch)
            return update(state, grads, metrics)

        step.gradients = grad_fn  # exposed so tests can count traces per (task, bucket)
        return step

    return {task: make(task, i) for i, task in enumerate(tasks)}


def make_predict_steps(graphdef: nnx.GraphDef, rest: nnx.State, tasks: Sequence[str],
                       shardings: StepShardings | None = None) -> dict[str, Any]:
    """{task: jitted (model params, batch) -> predictions}, deterministic (no dropout)."""

    def predict(model_params, batch, *, task: str):
        model = nnx.merge(graphdef, model_params, rest)
        logits = model(task, batch)
        return model.head(task).predict(logits, batch)

    layout = shardings.predict(shardings.state.params["model"]) if shardings is not None else {}
    return {task: jax.jit(lambda p, b, task=task: predict(p, b, task=task), **layout) for task in tasks}
