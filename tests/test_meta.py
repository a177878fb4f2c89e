"""Meta-learning algorithms on a tiny encoder: each one computes what its paper defines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import Encoder, EncoderConfig
from mtl.config import OptimSection
from mtl.errors import MtlError
from mtl.models.heads import ClassificationHead, TokenClassificationHead
from mtl.models.model import MultiTaskModel
from mtl.train.meta import HEAD, MetaLearner, make_adapt_predict, make_meta_step
from mtl.train.optim import build_optimizer, frozen_mask
from mtl.train.state import TrainState

from conftest import loop_trip_counts

WAYS, SHOTS, QUERIES, LENGTH = 2, 2, 3, 8


def _model(kind="class", dtype="float32", seed=0, scan_layers=True, num_layers=2):
    config = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=num_layers, num_heads=2, intermediate_size=32,
                           max_position_embeddings=32, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    rngs = nnx.Rngs(seed)
    if kind == "class":
        head = ClassificationHead(16, [str(i) for i in range(WAYS)], rngs=rngs, pooling="mean", dropout=0.0)
    else:
        head = TokenClassificationHead(16, ["O", "B-0", "I-0", "B-1", "I-1"], rngs=rngs, dropout=0.0)
    model = MultiTaskModel(Encoder(config, rngs=rngs), {HEAD: head})
    if dtype == "float64":  # heads are built in float32
        nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float64), nnx.state(model, nnx.Param)))
    return model, config


def _learner(algorithm, kind="class", **options):
    model, config = _model(kind, dtype=options.pop("dtype", "float32"), scan_layers=options.pop("scan_layers", True),
                           num_layers=options.pop("num_layers", 2))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    learner = MetaLearner(graphdef, rest, config, algorithm=algorithm, kind=kind, **options)
    return learner, learner.init_params(params)


def _batch(rng, rows, kind):
    ids = rng.integers(3, 50, size=(rows, LENGTH)).astype(np.int32)
    mask = np.ones((rows, LENGTH), np.int32)
    mask[:, LENGTH - 2:] = rng.integers(0, 2, size=(rows, 2))
    mask[:, LENGTH - 1] *= mask[:, LENGTH - 2]
    per_class = rows // WAYS
    if kind == "class":
        labels = np.repeat(np.arange(WAYS, dtype=np.int32), per_class)
    else:
        labels = rng.integers(0, 2 * WAYS + 1, size=(rows, LENGTH)).astype(np.int32)
        labels[:, 0] = -100
        labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": labels, "weights": np.ones((rows,), np.float32)}


def _episodes(count=1, kind="class", seed=0):
    rng = np.random.default_rng(seed)
    episodes = [{"support": _batch(rng, WAYS * SHOTS, kind), "query": _batch(rng, WAYS * QUERIES, kind)}
                for _ in range(count)]
    return jax.tree.map(lambda *x: np.stack(x), *episodes)


def _one(episodes, i=0):
    return jax.tree.map(lambda x: x[i], episodes)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _random_unit_direction(rng, like):
    """A random direction of norm 1 in the space of `like`'s leaves."""
    direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), like)
    norm = np.linalg.norm(_flat(direction))
    return jax.tree.map(lambda d: d / norm, direction)


def _moved(tree, direction, distance):
    return jax.tree.map(lambda p, d: p + distance * d, tree, direction)


def _meta_batch_of_one(episodes, i):
    return jax.tree.map(lambda x: x[i:i + 1], episodes)


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def test_maml_meta_gradient_matches_finite_differences(x64):
    """Second-order MAML differentiates through the inner step: its gradient along random
    directions equals central differences of the post-adaptation query loss.

    Tolerance: along a unit direction in float64 with eps = 1e-5, the central difference's
    truncation error is ~eps^2 |L'''| / 6 (measured: ~1e-8 relative, shrinking 100x per 10x in
    eps, as it should) and its rounding error ~1e-16 / eps ~ 1e-11, so 1e-6 relative is loose for
    a correct gradient; the first-order gradient (FOMAML) is off by 60% or more on these episodes.
    """
    learner, meta_params = _learner("maml", dtype="float64", inner_lr=0.5, inner_steps=2)
    episodes = _episodes(2)
    loss = jax.jit(lambda p: jax.vmap(learner.task_loss, in_axes=(None, 0))(p, episodes)[0].mean())
    grads, _ = jax.jit(learner.meta_gradients)(meta_params, episodes)
    fomaml = MetaLearner(learner.graphdef, learner.rest, learner.encoder, algorithm="fomaml", inner_lr=0.5, inner_steps=2)
    fo_grads, _ = jax.jit(fomaml.meta_gradients)(meta_params, episodes)
    rng = np.random.default_rng(1)
    eps = 1e-5
    for _ in range(3):
        direction = _random_unit_direction(rng, meta_params)
        numeric = (float(loss(_moved(meta_params, direction, eps))) -
                   float(loss(_moved(meta_params, direction, -eps)))) / (2 * eps)
        analytic = float(_flat(grads) @ _flat(direction))
        first_order = float(_flat(fo_grads) @ _flat(direction))
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
        assert abs(first_order - numeric) > 0.1 * abs(numeric)  # the check tells the two apart


def test_fomaml_is_the_query_gradient_at_the_adapted_params(x64):
    # float64: the two sides are separately compiled programs, whose float32 sums round apart
    # (up to 1.2e-6 of the largest gradient); in float64 they agree to rounding.
    learner, meta_params = _learner("fomaml", dtype="float64", inner_lr=0.3, inner_steps=2)
    episode = _one(_episodes(1))
    grads, _ = jax.jit(learner.meta_gradients)(meta_params, jax.tree.map(lambda x: x[None], episode))
    _, _, adapted = jax.jit(learner.adapted_query_logits)(meta_params, episode)
    _, slow = learner.split(meta_params["model"])

    def query_loss(params):
        model = nnx.merge(learner.graphdef, params, learner.rest)
        return model.loss(HEAD, episode["query"])[0]

    expected = jax.jit(jax.grad(query_loss))(nnx.merge_state(adapted, slow))
    np.testing.assert_allclose(_flat(grads["model"]), _flat(expected), rtol=1e-10, atol=1e-14)
    assert np.abs(_flat(expected)).max() > 0


@pytest.mark.parametrize("kind", ["class", "tags"])
def test_anil_adapts_only_the_head(kind):
    learner, meta_params = _learner("anil", kind=kind, inner_lr=0.5, inner_steps=3)
    fast, slow = learner.split(meta_params["model"])
    assert {p[0] for p, _ in nnx.to_flat_state(fast)} == {"heads"}
    episode = _one(_episodes(1, kind))
    logits, losses, adapted = learner.adapted_query_logits(meta_params, episode)
    assert float(losses[-1]) < float(losses[0])  # the head did adapt
    # The adapted model is the original encoder with the adapted head: same query logits.
    model = nnx.merge(learner.graphdef, nnx.merge_state(adapted, slow), learner.rest)
    np.testing.assert_allclose(logits, model(HEAD, episode["query"]), rtol=1e-5, atol=1e-6)
    for before, after in zip(jax.tree.leaves(slow), jax.tree.leaves(learner.split(meta_params["model"])[1]), strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_top_layer_adaptation_moves_only_the_top_layers(scan_layers):
    learner, meta_params = _learner("fomaml", adapt="top", adapt_layers=1, inner_lr=0.5, scan_layers=scan_layers,
                                    proto_init=True)
    fast, _ = learner.split(meta_params["model"])
    _, _, adapted = jax.jit(learner.adapted_query_logits)(meta_params, _one(_episodes(1)))
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)), fast, adapted)
    flat = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(moved)}
    names = {p[:3] for p in flat}
    assert ("encoder", "embeddings") not in {p[:2] for p in flat}
    if scan_layers:  # stacked [L, ...]: layer 0 stays, layer 1 moves
        query = flat[("encoder", "layers", "query", "kernel")]
        assert query[0].max() == 0 and query[1].max() > 0
    else:
        assert ("encoder", "layers", "0") not in names and ("encoder", "layers", "1") in names
    assert flat[("heads", HEAD, "out", "kernel")].max() > 0


@pytest.mark.parametrize("scan_layers", [True, False])
def test_top_layer_maml_equals_maml_through_the_whole_model(x64, scan_layers):
    """With adapt: top the lower layers run once, outside the inner loop. The meta-gradient
    equals a plain MAML written over the whole model, whose inner step leaves everything but
    the head, the pooler and the top layer where it is."""
    learner, meta_params = _learner("maml", adapt="top", adapt_layers=1, inner_lr=0.5, inner_steps=2,
                                    proto_init=True, dtype="float64", scan_layers=scan_layers)
    episodes = _episodes(2)

    def model(p):
        return nnx.merge(learner.graphdef, p, learner.rest)

    def moves(path, x):  # where the inner step reaches: a scalar, or [L, 1, ...] for stacked layers
        names = tuple(str(getattr(k, "key", k)) for k in path)
        if names[0] == "heads" or names[:2] == ("encoder", "pooler"):
            return 1.0
        if names[:2] == ("encoder", "layers") and scan_layers:
            return np.array([0.0, 1.0]).reshape((2,) + (1,) * (x.ndim - 1))
        return float(names[:3] == ("encoder", "layers", "1"))

    def with_proto_head(params, support):  # Proto-MAML: W = 2c, b = -|c|^2 from the mean-pooled support
        m = model(params)
        hidden = m.encoder(support["input_ids"], support["attention_mask"]).last_hidden_state
        mask = support["attention_mask"][..., None]
        onehot = jax.nn.one_hot(support["labels"], WAYS)
        protos = (onehot.T @ ((hidden * mask).sum(1) / mask.sum(1))) / onehot.sum(0)[:, None]
        m.heads[HEAD].out.kernel[...] = 2.0 * protos.T
        m.heads[HEAD].out.bias[...] = -jnp.sum(protos**2, -1)
        return nnx.state(m, nnx.Param)

    def reference_loss(meta_params, episode):
        params = with_proto_head(meta_params["model"], episode["support"])
        for _ in range(2):
            grads = jax.grad(lambda p: model(p).loss(HEAD, episode["support"])[0])(params)
            params = jax.tree_util.tree_map_with_path(lambda path, p, g: p - 0.5 * moves(path, p) * g, params, grads)
        return model(params).loss(HEAD, episode["query"])[0]

    expected = jax.jit(jax.grad(lambda p: jax.vmap(reference_loss, in_axes=(None, 0))(p, episodes).mean()))(meta_params)
    grads, _ = jax.jit(learner.meta_gradients)(meta_params, episodes)
    np.testing.assert_allclose(_flat(grads), _flat(expected), rtol=1e-9, atol=1e-12)
    assert np.abs(_flat(grads["model"])).max() > 0


@pytest.mark.parametrize("algorithm", ["maml", "meta_sgd"])
def test_all_parameter_maml_equals_maml_over_the_whole_word_table(x64, algorithm):
    """With adapt: all the inner loop adapts only the word-table rows of the episode's tokens
    (padding included, whose row stays frozen). The adapted parameters, the meta-gradient and
    Meta-SGD's learning-rate gradient equal a plain MAML whose inner step moves the whole table."""
    learner, meta_params = _learner(algorithm, inner_lr=0.5, inner_steps=2, dtype="float64")
    if algorithm == "meta_sgd":  # a different rate per entry, so a row mix-up shows
        rng = np.random.default_rng(2)
        meta_params["inner_lr"] = jax.tree.map(lambda x: x * rng.uniform(0.5, 1.5, x.shape), meta_params["inner_lr"])
    episodes = _episodes(2)
    for part in ("support", "query"):
        episodes[part]["input_ids"] = np.where(episodes[part]["attention_mask"] > 0, episodes[part]["input_ids"], 0)
    def model(p):
        return nnx.merge(learner.graphdef, p, learner.rest)

    def reference_adapt(meta_params, episode):
        params = meta_params["model"]
        fast, slow = learner.split(params)
        lrs = meta_params["inner_lr"] if algorithm == "meta_sgd" else jax.tree.map(lambda _: 0.5, fast)
        for _ in range(2):
            grads = jax.grad(lambda f: model(nnx.merge_state(f, slow)).loss(HEAD, episode["support"])[0])(fast)
            fast = jax.tree.map(lambda p, g, lr: p - lr * g, fast, grads, lrs)
        return fast, slow

    def reference_loss(meta_params, episode):
        fast, slow = reference_adapt(meta_params, episode)
        return model(nnx.merge_state(fast, slow)).loss(HEAD, episode["query"])[0]

    adapted, reference_adapted = jax.jit(learner.adapted_query_logits), jax.jit(reference_adapt)
    for i in range(2):
        np.testing.assert_allclose(_flat(adapted(meta_params, _one(episodes, i))[2]),
                                   _flat(reference_adapted(meta_params, _one(episodes, i))[0]), rtol=1e-12, atol=1e-14)
    expected = jax.jit(jax.grad(lambda p: jax.vmap(reference_loss, in_axes=(None, 0))(p, episodes).mean()))(meta_params)
    grads, _ = jax.jit(learner.meta_gradients)(meta_params, episodes)
    np.testing.assert_allclose(_flat(grads), _flat(expected), rtol=1e-9, atol=1e-12)
    def table(tree):
        return np.asarray(tree["encoder"]["embeddings"]["word"]["embedding"][...])
    assert np.abs(table(grads["model"])).max() > 0 and not table(grads["model"])[0].any()  # the padding row
    if algorithm == "meta_sgd":
        assert np.abs(table(grads["inner_lr"])).max() > 0


def _whole_and_frozen_meta_gradients(learner, meta_params, frozen, episodes):
    """The compiled meta-gradient programs of the whole model and of the model under `frozen`,
    and their gradients."""
    programs = tuple(jax.jit(lambda p, e, f=f: learner.meta_gradients(p, e, f)).lower(meta_params, episodes).compile()
                     for f in (None, frozen))
    return programs, tuple(program(meta_params, episodes)[0] for program in programs)


@pytest.mark.parametrize("algorithm, options, flops_below", [
    ("anil", {}, 0.35),  # the encoder runs outside the inner loop: forward only once frozen (measured 0.27)
    ("maml", {}, 0.7),  # the inner loop still adapts the encoder: no weight gradients of the outer pass (0.61)
    ("maml", {"adapt": "top"}, 0.55),  # (0.46)
], ids=["anil", "maml", "maml-top"])
def test_a_frozen_encoder_takes_no_meta_gradient(x64, algorithm, options, flops_below):
    """optim.freeze_encoder holds the encoder's initialisation still, so its meta-gradient is not
    computed at all; the head's is the one the whole model's meta-gradient gives it."""
    learner, meta_params = _learner(algorithm, dtype="float64", scan_layers=False, **options)
    cfg = OptimSection(learning_rate=1e-3, warmup_ratio=0.0, freeze_encoder=True)
    frozen = frozen_mask(meta_params, learner.encoder, cfg)
    episodes = _episodes(2)
    (whole, part), (whole_grads, grads) = _whole_and_frozen_meta_gradients(learner, meta_params, frozen, episodes)
    assert jax.tree.leaves(grads["model"]["encoder"]) == []
    for a, b in zip(jax.tree.leaves(grads["model"]["heads"]), jax.tree.leaves(whole_grads["model"]["heads"]), strict=True):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-15)
    flops = part.cost_analysis()["flops"], whole.cost_analysis()["flops"]
    assert flops[0] < flops_below * flops[1], flops
    # The optimizer leaves the encoder where it was.
    tx = build_optimizer(cfg, meta_params, learner.encoder, total_steps=10)
    step = make_meta_step(learner, tx, skip_nonfinite=False, frozen=frozen)
    state, _ = step(TrainState.create(jax.tree.map(jnp.copy, meta_params), tx, seed=0), episodes)  # it donates
    for a, b in zip(jax.tree.leaves(state.params["model"]["encoder"]), jax.tree.leaves(meta_params["model"]["encoder"]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("algorithm, options, whole_loops, frozen_loops", [
    # The encoder runs on the meta-parameters, once for the support set and once for the query
    # set: forward and backward, a scan over all 3 layers each; frozen, over the upper 2 (the
    # frozen layer runs alone, where XLA unrolls a 1-step scan).
    ("anil", {}, [3, 3, 3, 3], [2, 2, 2, 2]),
    ("protonet", {}, [3, 3, 3, 3], [2, 2, 2, 2]),
    # The 2 layers below the adapted top one: then the frozen one and the trained one, each alone.
    ("maml", {"adapt": "top", "adapt_layers": 1}, [2, 2, 2, 2], []),
    # The inner loop adapts the frozen layer, and the meta-gradient of the layers above passes
    # through that adaptation: nothing may be cut (the optimizer zeroes the frozen rows).
    ("maml", {}, None, None),
], ids=["anil", "protonet", "maml-top", "maml"])
def test_a_scanned_stack_frozen_in_part_takes_no_meta_gradient_through_its_frozen_layers(
        x64, algorithm, options, whole_loops, frozen_loops):
    """optim.freeze_layers=1 of a scanned 3-layer stack: where the encoder runs on the
    meta-parameters, the frozen layer runs as a scan of its own, with no backward pass. The
    meta-gradient is the whole model's, with exact zeros in the frozen layer's rows."""
    learner, meta_params = _learner(algorithm, dtype="float64", num_layers=3, **options)
    frozen = frozen_mask(meta_params, learner.encoder, OptimSection(freeze_layers=1))
    episodes = _episodes(2)
    (whole, part), (whole_grads, grads) = _whole_and_frozen_meta_gradients(learner, meta_params, frozen, episodes)
    assert jax.tree.leaves(grads["model"]["encoder"]["embeddings"]) == []  # wholly frozen: not computed
    stacks = zip(jax.tree.leaves(grads["model"]["encoder"]["layers"]),
                 jax.tree.leaves(whole_grads["model"]["encoder"]["layers"]), strict=True)
    for a, b in stacks:
        assert np.abs(b[1:]).max() > 0
        np.testing.assert_allclose(a[1:], b[1:], rtol=1e-10, atol=1e-15)
        if whole_loops is None:
            np.testing.assert_allclose(a[0], b[0], rtol=1e-10, atol=1e-15)
        else:
            assert not a[0].any()
    for a, b in zip(jax.tree.leaves(grads["model"]["heads"]), jax.tree.leaves(whole_grads["model"]["heads"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-15)

    if whole_loops is not None:
        assert (loop_trip_counts(whole), loop_trip_counts(part)) == (whole_loops, frozen_loops)


def test_meta_sgd_learning_rates_get_gradients():
    learner, meta_params = _learner("meta_sgd", inner_lr=0.1)
    assert jax.tree.structure(meta_params["inner_lr"]) == jax.tree.structure(learner.split(meta_params["model"])[0])
    grads, _ = jax.jit(learner.meta_gradients)(meta_params, _episodes(2))
    lr_grads = _flat(grads["inner_lr"])
    assert lr_grads.size == _flat(meta_params["inner_lr"]).size and np.abs(lr_grads).max() > 0
    assert np.isfinite(lr_grads).all()


def test_reptile_step_interpolates_toward_the_adapted_params():
    learner, meta_params = _learner("reptile", adapt="top", inner_lr=0.3, inner_steps=3)
    episodes = _episodes(2)
    epsilon = 0.25
    tx = build_optimizer(OptimSection(optimizer="sgd", learning_rate=epsilon, schedule="constant", warmup_ratio=0.0,
                                      weight_decay=0.0, clip_norm=None), meta_params, learner.encoder, 10)
    state = TrainState.create(meta_params, tx, seed=0)
    step = make_meta_step(learner, tx, skip_nonfinite=False)
    theta = jax.tree.map(np.asarray, meta_params["model"])
    adapted = [learner.adapted_query_logits(meta_params, _one(episodes, i))[2] for i in range(2)]
    new_state, _ = step(state, episodes)
    fast0, slow = learner.split(theta)
    mean_adapted = jax.tree.map(lambda a, b: (a + b) / 2, *adapted)
    expected = jax.tree.map(lambda t, phi: t + epsilon * (phi - t), fast0, mean_adapted)
    np.testing.assert_allclose(_flat(learner.split(new_state.params["model"])[0]), _flat(expected), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(_flat(learner.split(new_state.params["model"])[1]), _flat(slow))


@pytest.mark.parametrize("kind", ["class", "tags"])
def test_protonet_logits_are_negative_squared_distances_to_class_means(kind):
    learner, meta_params = _learner("protonet", kind=kind)
    episode = _one(_episodes(1, kind))
    logits, _, _ = learner.adapted_query_logits(meta_params, episode)
    params = meta_params["model"]
    def feats(part):
        return np.asarray(learner.features(learner.encode(params, episode[part]), episode[part]), np.float64)
    support, query = feats("support"), feats("query")
    labels = np.asarray(episode["support"]["labels"])
    classes = 2 * WAYS + 1 if kind == "tags" else WAYS
    means = np.stack([support[labels == c].mean(0) if (labels == c).any() else np.zeros(support.shape[-1])
                      for c in range(classes)])
    expected = -((query[..., None, :] - means) ** 2).sum(-1)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_proto_maml_head_starts_at_the_prototypes():
    learner, meta_params = _learner("fomaml", adapt="head", proto_init=True, inner_steps=1, inner_lr=0.0)
    proto, _ = _learner("protonet")
    episode = _one(_episodes(1))
    logits, _, _ = learner.adapted_query_logits(meta_params, episode)
    distance, _, _ = proto.adapted_query_logits(meta_params, episode)
    # W = 2c, b = -|c|^2: logits = distance logits + |q|^2, a per-row constant (same softmax).
    np.testing.assert_allclose(jax.nn.softmax(logits), jax.nn.softmax(distance), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algorithm, options", [
    ("maml", {}), ("maml", {"adapt": "top"}), ("anil", {}), ("protonet", {}), ("fomaml", {"proto_init": True}),
], ids=["maml", "maml-top", "anil", "protonet", "proto-maml"])
def test_adapt_predict_predicts_each_episode_as_adapted(algorithm, options):
    """make_adapt_predict (meta-test and evaluation) gives, for each episode of a stacked batch,
    the argmax of its query logits after first-order adaptation. On a scanned encoder, whose
    nnx.scan refuses Variables from an outer trace level: ProtoNet once failed here, at its
    first evaluation, where training had run. (The meta-trainer tests run it looped.)"""
    learner, meta_params = _learner(algorithm, scan_layers=True, inner_lr=0.2, inner_steps=2, **options)
    episodes = _episodes(2)
    predicted = make_adapt_predict(learner, steps=2)(meta_params, episodes)
    for i in range(2):
        logits, _, _ = learner.adapted_query_logits(meta_params, _one(episodes, i), steps=2, first_order=True)
        np.testing.assert_array_equal(predicted[i], np.argmax(logits, -1))


@pytest.mark.parametrize("algorithm", ["maml", "meta_sgd", "protonet"])
def test_vmapped_meta_batch_equals_mean_of_per_task_gradients(algorithm):
    learner, meta_params = _learner(algorithm, inner_lr=0.2, inner_steps=2)
    episodes = _episodes(3)
    meta_gradients = jax.jit(learner.meta_gradients)  # one compile per meta-batch size, not op by op
    grads, metrics = meta_gradients(meta_params, episodes)
    singles = [meta_gradients(meta_params, _meta_batch_of_one(episodes, i)) for i in range(3)]
    mean = jax.tree.map(lambda *g: sum(g) / 3, *[g for g, _ in singles])
    np.testing.assert_allclose(_flat(grads), _flat(mean), rtol=1e-4, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(np.mean([float(m["loss"]) for _, m in singles]), rel=1e-5)


def test_meta_step_traces_once():
    learner, meta_params = _learner("maml", inner_lr=0.1)
    tx = build_optimizer(OptimSection(learning_rate=1e-3), meta_params, learner.encoder, 10)
    state = TrainState.create(meta_params, tx, seed=0)
    step = make_meta_step(learner, tx, skip_nonfinite=False)
    losses = []
    for i in range(3):
        state, metrics = step(state, _episodes(2, seed=i))
        losses.append(float(metrics["loss"]))
    assert step.gradients._cache_size() == 1
    assert all(np.isfinite(losses)) and int(state.step) == 3


def test_remat_gives_the_same_meta_gradient():
    plain, meta_params = _learner("maml", inner_lr=0.2, inner_steps=2)
    remat = MetaLearner(plain.graphdef, plain.rest, plain.encoder, algorithm="maml", inner_lr=0.2, inner_steps=2, remat=True)
    episodes = _episodes(2)
    np.testing.assert_allclose(_flat(jax.jit(remat.meta_gradients)(meta_params, episodes)[0]),
                               _flat(jax.jit(plain.meta_gradients)(meta_params, episodes)[0]), rtol=1e-5, atol=1e-7)


def test_unknown_algorithm_and_adapt_are_errors():
    model, config = _model()
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    with pytest.raises(MtlError, match="meta algorithm 'mamll' is unknown; known: .*'maml'"):
        MetaLearner(graphdef, rest, config, algorithm="mamll")
    with pytest.raises(MtlError, match="meta.adapt 'middle' is unknown"):
        MetaLearner(graphdef, rest, config, algorithm="maml", adapt="middle")
    with pytest.raises(MtlError, match="adapt_layers must be in 1..2"):
        MetaLearner(graphdef, rest, config, algorithm="maml", adapt="top", adapt_layers=3)


def test_optimizer_choice():
    _, meta_params = _learner("reptile")
    cfg = OptimSection(optimizer="sgd", learning_rate=0.5, schedule="constant", warmup_ratio=0.0, clip_norm=None,
                       weight_decay=0.0)
    tx = build_optimizer(cfg, meta_params, EncoderConfig(num_layers=2), 10)
    grads = jax.tree.map(jnp.ones_like, meta_params)
    updates, _ = tx.update(grads, tx.init(meta_params), meta_params)
    assert set(np.unique(_flat(updates))) == {-0.5}
