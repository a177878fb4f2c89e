"""Meta-learning as pure functions: one inner loop, the algorithms built on it, the meta step.

The model is a MultiTaskModel whose one head, "episode", has an output per episode class (or
per IOB2 tag over the episode's entity types). Its parameters split in two: the *fast* ones
that the inner loop adapts (chosen by `adapt`: the head, the head plus the top N encoder
layers and the pooler, or all; of the word-embedding table only the episode's tokens' rows,
the only ones with a gradient) and the *slow* rest. The inner loop is a `lax.scan` of SGD steps
on the support loss; a meta-batch is `jax.vmap`ped over its episodes; everything is jitted.

  maml      second order: the meta-gradient differentiates through the inner loop.
  fomaml    first order: the inner gradients are constants, so the meta-gradient is the query
            gradient at the adapted parameters.
  anil      MAML with only the head adapted (Raghu et al. 2020). The encoder runs once per
            episode, outside the inner loop.
  meta_sgd  MAML with a learned inner learning rate per parameter (Li et al. 2017).
  reptile   no query gradient: the meta-"gradient" is theta - adapted, so the optimizer moves
            theta toward the adapted parameters (Nichol et al. 2018).
  protonet  no inner loop: logits are negative squared distances to the class means of the
            support embeddings (Snell et al. 2017).
With `proto_init`, MAML-family heads start each episode from the class prototypes, W = 2c and
b = -|c|^2 (Proto-MAML, Triantafillou et al. 2020). A class with no support token (an I- tag no
support sentence has) gets the zero prototype. Meta-learning runs without dropout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtl.config import META_ADAPT, META_ALGORITHMS
from mtl.errors import MtlError
from mtl.models.encoder import EncoderConfig, EncoderOutput, at_least_float32
from mtl.models.heads import IGNORE, Batch, pool
from mtl.params import path_names
from mtl.sharding import StepShardings
from mtl.train.optim import frozen_below, trained_part, with_frozen
from mtl.train.state import Metrics, TrainState, TrainStep, make_update

ALGORITHMS, ADAPT = META_ALGORITHMS, META_ADAPT
HEAD = "episode"


class MetaLearner:
    """The pure functions of one meta-learning setup (see the module docstring).

    Args:
      graphdef, rest: from `nnx.split(model, nnx.Param, ...)` of the episode model.
      encoder: the encoder's config (layer count, scanned or looped).
      algorithm, adapt, adapt_layers, inner_steps, inner_lr, proto_init, remat, pooling: as the
        config's `meta` section; `pooling` is how classification episodes embed a text.
      kind: "class" or "tags", the episodes' label kind.
    """

    def __init__(self, graphdef: nnx.GraphDef, rest: nnx.State, encoder: EncoderConfig, *, algorithm: str,
                 adapt: str = "all", adapt_layers: int = 1, inner_steps: int = 1, inner_lr: float = 0.01,
                 proto_init: bool = False, remat: bool = False, pooling: str = "mean", kind: str = "class"):
        if algorithm not in ALGORITHMS:
            raise MtlError(f"meta algorithm {algorithm!r} is unknown; known: {list(ALGORITHMS)}")
        if adapt not in ADAPT:
            raise MtlError(f"meta.adapt {adapt!r} is unknown; known: {list(ADAPT)}")
        if algorithm == "anil":
            adapt = "head"
        if adapt == "top" and not 1 <= adapt_layers <= encoder.num_layers:
            raise MtlError(f"meta.adapt_layers must be in 1..{encoder.num_layers}, got {adapt_layers}")
        if inner_steps < 1 and algorithm != "protonet":
            raise MtlError(f"meta.inner_steps must be at least 1, got {inner_steps}")
        self.graphdef, self.rest, self.encoder = graphdef, rest, encoder
        self.algorithm, self.adapt, self.adapt_layers = algorithm, adapt, adapt_layers
        self.inner_steps, self.inner_lr = inner_steps, inner_lr
        self.proto_init, self.remat, self.pooling, self.kind = proto_init, remat, pooling, kind
        self.first_order = algorithm in ("fomaml", "reptile")

    # --------------------------------------------------------------- parameter split

    def _is_fast(self, path, _value) -> bool:
        names = path_names(path)
        if names[0] == "heads" or self.adapt == "all":
            return True
        if self.adapt == "head":
            return False
        if names[:2] == ("encoder", "pooler"):
            return True
        if names[:2] == ("encoder", "layers"):
            return not names[2].isdigit() or int(names[2]) >= self.encoder.num_layers - self.adapt_layers
        return False

    def split(self, model_params: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(fast, slow) parameters."""
        return nnx.split_state(model_params, self._is_fast, ...)

    def _update_mask(self, fast: nnx.State) -> Any:
        """1 where the inner loop may move a fast parameter; with scanned layers and adapt: top,
        a [L, 1, ...] mask that keeps the lower layers of a stacked parameter still."""

        def mask(path, leaf):
            names = path_names(path)
            if self.adapt == "top" and names[:2] == ("encoder", "layers") and not names[2].isdigit():
                top = np.arange(self.encoder.num_layers) >= self.encoder.num_layers - self.adapt_layers
                return jnp.asarray(top.astype(np.float32).reshape((-1,) + (1,) * (leaf.ndim - 1)))
            return jnp.float32(1.0)

        return jax.tree_util.tree_map_with_path(mask, fast)

    def init_params(self, model_params: nnx.State) -> dict:
        """The meta-parameters: {"model": the model's Params, "inner_lr": Meta-SGD's per-parameter
        learning rates (a tree like the fast params) or {}}."""
        inner_lr = {}
        if self.algorithm == "meta_sgd":
            fast, _ = self.split(model_params)
            inner_lr = jax.tree.map(lambda p: jnp.full(p.shape, self.inner_lr, jnp.float32), fast)
        return {"model": model_params, "inner_lr": inner_lr}

    @staticmethod
    def _is_word_table(path) -> bool:
        return path_names(path)[:3] == ("encoder", "embeddings", "word")

    def _word_table(self, tree: Any) -> jax.Array:
        return next(leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if self._is_word_table(path))

    def _on_word_table(self, tree: Any, fn: Callable[[jax.Array], jax.Array]) -> Any:
        """`tree` with `fn` applied to its word-embedding table."""
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: fn(leaf) if self._is_word_table(path) else leaf, tree)

    # ------------------------------------------------------------------ the model

    def _model(self, params: nnx.State):
        return nnx.merge(self.graphdef, params, self.rest)

    def encode(self, params: nnx.State, batch: Batch, vocab: jax.Array | None = None,
               frozen_below: int = 0) -> EncoderOutput:
        """The encoder's output on `batch`; with `vocab`, `params` hold only those tokens' word rows.
        `frozen_below`: the encoder's (no gradient reaches the embeddings and the lowest N layers)."""
        encoder = self._model(params).encoder
        return self._upper_layers(params, encoder.embed(batch["input_ids"], batch.get("token_type_ids"), vocab=vocab),
                                  batch, 0, frozen_below)

    def _lower_layers(self, params: nnx.State, batch: Batch, stop: int, frozen_below: int = 0) -> jax.Array:
        encoder = self._model(params).encoder
        return encoder.run_layers(encoder.embed(batch["input_ids"], batch.get("token_type_ids")),
                                  batch["attention_mask"], 0, stop, frozen_below=frozen_below)[0]

    def _upper_layers(self, params: nnx.State, hidden: jax.Array, batch: Batch, start: int,
                      frozen_below: int = 0) -> EncoderOutput:
        encoder = self._model(params).encoder
        last, _ = encoder.run_layers(hidden, batch["attention_mask"], start, frozen_below=frozen_below)
        return EncoderOutput(last, encoder.pool(last))

    def features(self, encoded: EncoderOutput, batch: Batch) -> jax.Array:
        """Embeddings the prototypes average: one per text, or one per token for NER."""
        if self.kind == "tags":
            return at_least_float32(encoded.last_hidden_state)
        return at_least_float32(pool(encoded, batch["attention_mask"], self.pooling))

    def _head_logits(self, params: nnx.State, encoded, batch: Batch) -> jax.Array:
        return self._model(params).head(HEAD)(encoded, batch)

    def _head_loss(self, params: nnx.State, logits: jax.Array, batch: Batch) -> jax.Array:
        return self._model(params).head(HEAD).loss(logits, batch)

    def num_classes(self, params: nnx.State) -> int:
        """The episode head's outputs: the ways, or the IOB2 tags over them for NER."""
        return len(self._model(params).head(HEAD).labels)

    # ----------------------------------------------------------------- prototypes

    @staticmethod
    def prototypes(features: jax.Array, labels: jax.Array, weights: jax.Array, num_classes: int) -> jax.Array:
        """[C, H] class means of `features` ([..., H]) by `labels` ([...], IGNORE and weight-0
        rows skipped); a class without examples gets the zero vector."""
        valid = ((labels != IGNORE) & (jnp.broadcast_to(weights, labels.shape) > 0)).reshape(-1)
        features = features.reshape(-1, features.shape[-1])
        labels = labels.reshape(-1)
        onehot = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes) * valid[:, None]
        return (onehot.T @ features) / jnp.maximum(onehot.sum(0), 1.0)[:, None]

    @staticmethod
    def distance_logits(features: jax.Array, prototypes: jax.Array) -> jax.Array:
        """Negative squared Euclidean distance of each feature vector to each prototype."""
        return -(jnp.sum(features**2, -1, keepdims=True) - 2.0 * features @ prototypes.T
                 + jnp.sum(prototypes**2, -1))

    def _weights_of(self, batch: Batch) -> jax.Array:
        return batch["weights"][:, None] if self.kind == "tags" else batch["weights"]

    def _with_proto_head(self, fast: nnx.State, protos: jax.Array) -> nnx.State:
        """Set the head's output layer to W = 2c, b = -|c|^2, so its logits equal the distance
        logits up to a per-example constant (Proto-MAML)."""
        values = {"kernel": 2.0 * protos.T, "bias": -jnp.sum(protos**2, -1)}

        def replace(path, leaf):
            names = path_names(path)
            if names[:3] == ("heads", HEAD, "out") and names[3] in values:
                return values[names[3]].astype(leaf.dtype)
            return leaf

        return jax.tree_util.tree_map_with_path(replace, fast)

    # ------------------------------------------------------------------ inner loop

    def adapt_fast(self, fast: nnx.State, inner_lr: Any, loss_of: Callable[[nnx.State], jax.Array], steps: int,
                   first_order: bool) -> tuple[nnx.State, jax.Array]:
        """`steps` (>= 1) SGD steps on `loss_of(fast)`; returns (adapted fast params, [steps] losses).

        With `first_order` the inner gradients are treated as constants. With `remat` each inner
        step is recomputed in the backward pass instead of stored, bounding second-order memory.
        """
        mask = self._update_mask(fast)
        lrs = inner_lr if self.algorithm == "meta_sgd" else jax.tree.map(lambda _: self.inner_lr, fast)

        def step(current, _):
            loss, grads = jax.value_and_grad(loss_of)(current)
            if first_order:
                grads = jax.lax.stop_gradient(grads)
            updated = jax.tree.map(lambda p, g, lr, m: p - lr * m * g, current, grads, lrs, mask)
            return updated, loss

        if self.remat:
            step = jax.checkpoint(step)
        # The first step outside the scan: under vmap a scan's carry is batched from the start, so
        # it would copy the meta-parameters once per task; here the tasks share them, and each
        # weight's support matmuls run as one over the whole meta-batch.
        adapted, first_loss = step(fast, None)
        adapted, losses = jax.lax.scan(step, adapted, length=steps - 1)
        return adapted, jnp.concatenate([first_loss[None], losses])

    def adapted_query_logits(self, meta_params: dict, episode: Mapping[str, Batch], *, steps: int | None = None,
                             first_order: bool | None = None,
                             frozen_below: int = 0) -> tuple[jax.Array, jax.Array, nnx.State]:
        """(query logits after adaptation, support losses per inner step, adapted fast params).

        `frozen_below=N`: the embeddings and the lowest N layers are frozen meta-parameters, so
        no meta-gradient needs to pass back through them where the encoder runs on the
        meta-parameters themselves: protonet, adapt: head, and the layers below adapt: top's.
        Where the inner loop adapts them (adapt: all), the meta-gradient of the layers above
        passes through that adaptation, so nothing is cut there."""
        params = meta_params["model"]
        support, query = episode["support"], episode["query"]
        steps = self.inner_steps if steps is None else steps
        first_order = self.first_order if first_order is None else first_order
        if self.algorithm == "protonet":
            protos = self.prototypes(self.features(self.encode(params, support, frozen_below=frozen_below), support),
                                     support["labels"], self._weights_of(support), self.num_classes(params))
            logits = self.distance_logits(self.features(self.encode(params, query, frozen_below=frozen_below), query),
                                          protos)
            return logits, jnp.zeros((0,)), None
        fast, slow = self.split(params)
        inner_lr = meta_params["inner_lr"]
        vocab = None
        if self.adapt == "all":
            # The inner loop adapts only the rows of the episode's tokens: the others get no
            # gradient, and a whole adapted vocabulary per task would cost a [V, H] gradient,
            # update and meta-gradient for each task of the meta-batch. Same values, same
            # gradients (each row's first copy is the one looked up, the repeats stay still).
            vocab = episode_vocabulary(episode)
            table = self._word_table(fast)
            rows = table[vocab]
            fast = self._on_word_table(fast, lambda _: rows)
            if self.algorithm == "meta_sgd":
                inner_lr = self._on_word_table(inner_lr, lambda t: t[vocab])

        def merged(f):
            # Fresh Variables for `slow` at the caller's trace level: nnx transforms inside the
            # model (the scanned layers) refuse Variables created at an outer level (jit, vmap).
            return nnx.merge_state(f, jax.tree.map(lambda x: x, slow))
        if self.adapt == "top":
            # The lower layers hold only slow params: run them once per episode, outside the loop.
            start = self.encoder.num_layers - self.adapt_layers
            below = {part: self._lower_layers(params, episode[part], start, frozen_below)
                     for part in ("support", "query")}

            def encode_part(p, part):
                return self._upper_layers(p, below[part], episode[part], start)
        else:
            def encode_part(p, part):  # adapt: head runs the encoder on the meta-parameters
                return self.encode(p, episode[part], vocab, frozen_below if self.adapt == "head" else 0)
        encoded_support = encode_part(merged(fast), "support") if self.adapt == "head" or self.proto_init else None
        if self.proto_init:
            protos = self.prototypes(self.features(encoded_support, support), support["labels"],
                                     self._weights_of(support), self.num_classes(params))
            fast = self._with_proto_head(fast, protos)
        if self.adapt == "head":  # the encoder is not adapted: run it once, outside the loop
            encoded = {"support": encoded_support, "query": encode_part(merged(fast), "query")}

            def logits_of(f, part):
                return self._head_logits(merged(f), encoded[part], episode[part])
        else:
            def logits_of(f, part):
                return self._head_logits(merged(f), encode_part(merged(f), part), episode[part])

        def support_loss(f):
            return self._head_loss(merged(f), logits_of(f, "support"), support)

        adapted, losses = self.adapt_fast(fast, inner_lr, support_loss, steps, first_order)
        logits = logits_of(adapted, "query")
        if vocab is not None:  # the adapted rows back into the whole table
            adapted = self._on_word_table(adapted, lambda t: table.at[vocab].add(t - rows))
        return logits, losses, adapted

    # ----------------------------------------------------------------- meta objective

    def query_accuracy(self, logits: jax.Array, query: Batch) -> jax.Array:
        """The fraction of the query's real labels (tokens, for NER) that `logits` rank first."""
        labels = query["labels"]
        valid = (labels != IGNORE) & (jnp.broadcast_to(self._weights_of(query), labels.shape) > 0)
        return jnp.sum((jnp.argmax(logits, -1) == labels) * valid) / jnp.maximum(valid.sum(), 1)

    def task_loss(self, meta_params: dict, episode: Mapping[str, Batch],
                  frozen_below: int = 0) -> tuple[jax.Array, dict]:
        """The query loss after adapting on the support set, and {accuracy, support_loss}."""
        logits, support_losses, _ = self.adapted_query_logits(meta_params, episode, frozen_below=frozen_below)
        loss = self._head_loss(meta_params["model"], logits, episode["query"])
        first_support = support_losses[0] if support_losses.shape[0] else loss
        return loss, {"accuracy": self.query_accuracy(logits, episode["query"]), "support_loss": first_support}

    def reptile_direction(self, meta_params: dict, episode: Mapping[str, Batch]) -> tuple[dict, jax.Array, dict]:
        """(theta - adapted, as a gradient-shaped tree; the query loss after adaptation; aux)."""
        fast0, slow = self.split(meta_params["model"])
        logits, support_losses, fast = self.adapted_query_logits(meta_params, episode)
        delta = nnx.merge_state(jax.tree.map(jnp.subtract, fast0, fast), jax.tree.map(jnp.zeros_like, slow))
        loss = self._head_loss(meta_params["model"], logits, episode["query"])
        grads = {"model": delta, "inner_lr": jax.tree.map(jnp.zeros_like, meta_params["inner_lr"])}
        accuracy = self.query_accuracy(logits, episode["query"])
        return grads, loss, {"accuracy": accuracy, "support_loss": support_losses[0]}

    def meta_gradients(self, meta_params: dict, episodes: Mapping[str, Batch],
                       frozen: Any | None = None) -> tuple[dict, dict]:
        """Gradients of the mean query loss over a meta-batch (episodes stacked on axis 0), and
        its metrics. Reptile returns the mean of theta - adapted instead.

        `frozen` (mtl.train.optim.frozen_mask of the meta-parameters): the meta-gradient of a
        wholly frozen parameter is not computed (None); nor, where adapted_query_logits can cut
        it, that of a scanned stack's frozen layers. The inner loop still adapts what is frozen
        if it is fast: freezing holds the initialisation still, not the adaptation."""
        if self.algorithm == "reptile":
            grads, losses, aux = jax.vmap(self.reptile_direction, in_axes=(None, 0))(meta_params, episodes)
            grads = jax.tree.map(lambda g: g.mean(0), grads)
            loss = losses.mean()
        else:
            below = frozen_below(frozen)

            def mean_loss(trained):
                p = with_frozen(frozen, trained, meta_params)
                losses, aux = jax.vmap(functools.partial(self.task_loss, frozen_below=below), in_axes=(None, 0))(
                    p, episodes)
                return losses.mean(), aux

            (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(trained_part(frozen, meta_params))
        metrics = {k: v.mean() for k, v in aux.items()}
        return grads, dict(metrics, loss=loss, total_loss=loss)


def episode_vocabulary(episode: Mapping[str, Batch]) -> jax.Array:
    """Every token id of an episode's support and query texts, ascending, with repeats: a fixed
    size under jit, and a repeated id's later rows are never looked up."""
    return jnp.sort(jnp.concatenate([episode[part]["input_ids"].reshape(-1) for part in ("support", "query")]))


def make_meta_step(learner: MetaLearner, tx: optax.GradientTransformation, *, skip_nonfinite: bool,
                   shardings: StepShardings | None = None, frozen: Any | None = None) -> TrainStep:
    """The jitted meta step `(state, episodes) -> (state, metrics)`: the meta-gradient program
    (exposed as `step.gradients`, compiled once: every meta-batch has the same shapes) and the
    optimizer update both trainers share. With `shardings`, the meta-batch's episodes are split
    over the data axes (each device adapts its own tasks) and params follow the rules table.
    `frozen`: see MetaLearner.meta_gradients."""
    layout = shardings.gradients() if shardings is not None else {}
    grad_fn = jax.jit(lambda state, episodes: learner.meta_gradients(state.params, episodes, frozen), **layout)
    update = make_update(tx, skip_nonfinite=skip_nonfinite, shardings=shardings)

    def step(state: TrainState, episodes: Mapping[str, Batch]) -> tuple[TrainState, Metrics]:
        grads, metrics = grad_fn(state, episodes)
        return update(state, grads, metrics)

    step.gradients = grad_fn
    return step


# (meta params, stacked episodes) -> predicted query labels per episode
AdaptPredict = Callable[[Any, Mapping[str, Batch]], jax.Array]


def make_adapt_predict(learner: MetaLearner, steps: int, shardings: StepShardings | None = None) -> AdaptPredict:
    """Jitted `(meta params, stacked episodes) -> query predictions [E, ...]` for meta-testing:
    adapt on each support set (first order: nothing differentiates through it) and predict."""
    layout = shardings.predict(shardings.state.params) if shardings is not None else {}

    @functools.partial(jax.jit, **layout)
    def predict(meta_params, episodes):
        def one(params, episode):
            logits, _, _ = learner.adapted_query_logits(params, episode, steps=steps, first_order=True)
            return jnp.argmax(logits, -1)

        # The parameters go in as vmap's argument, not a closure: a scanned encoder's nnx.scan
        # refuses Variables from an outer trace level (ProtoNet hands them straight to it).
        return jax.vmap(one, in_axes=(None, 0))(meta_params, episodes)

    return predict

