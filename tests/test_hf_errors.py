"""Checkpoints that do not fit are fatal, with one message naming the file and the key."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mtl import Encoder, MtlError


def _copy_with_tensors(src, dst, edit):
    """Copy a checkpoint dir to `dst`, passing its tensor dict through `edit`."""
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    save_file(edit(dict(tensors)), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def bert_dir(tiny_hf):
    return tiny_hf["bert"][1]


def test_missing_key(bert_dir, tmp_path):
    def drop(t):
        del t["encoder.layer.1.output.dense.weight"]
        return t

    path = _copy_with_tensors(bert_dir, tmp_path / "ckpt", drop)
    with pytest.raises(MtlError, match=r"missing key.*layers\.1\.ffn_out\.kernel") as e:
        Encoder.from_pretrained(path)
    assert str(path) in str(e.value)


def test_unexpected_key(bert_dir, tmp_path):
    def add(t):
        t["encoder.layer.0.attention.self.extra.weight"] = np.zeros((2, 2), np.float32)
        return t

    path = _copy_with_tensors(bert_dir, tmp_path / "ckpt", add)
    with pytest.raises(MtlError, match=r"unexpected key.*encoder\.layer\.0\.attention\.self\.extra\.weight"):
        Encoder.from_pretrained(path)


def test_layer_beyond_config_is_unexpected(bert_dir, tmp_path):
    """A key for layer 2 of a 2-layer config names the layer in the error."""
    def add(t):
        t["encoder.layer.2.output.dense.bias"] = np.zeros((32,), np.float32)
        return t

    path = _copy_with_tensors(bert_dir, tmp_path / "ckpt", add)
    with pytest.raises(MtlError, match=r"unexpected key.*encoder\.layer\.2\.output\.dense\.bias"):
        Encoder.from_pretrained(path)


def test_wrong_shape(bert_dir, tmp_path):
    def reshape(t):
        t["encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)
        return t

    path = _copy_with_tensors(bert_dir, tmp_path / "ckpt", reshape)
    with pytest.raises(MtlError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight.*\(36, 32\).*\(37, 32\)"):
        Encoder.from_pretrained(path)


def test_ambiguous_prefixed_and_bare_key(bert_dir, tmp_path):
    def duplicate(t):
        t["bert.pooler.dense.bias"] = t["pooler.dense.bias"]
        return t

    path = _copy_with_tensors(bert_dir, tmp_path / "ckpt", duplicate)
    with pytest.raises(MtlError, match=r"ambiguous.*pooler\.dense\.bias"):
        Encoder.from_pretrained(path)


def test_unknown_model_type(bert_dir, tmp_path):
    path = _copy_with_tensors(bert_dir, tmp_path / "ckpt", lambda t: t)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MtlError, match=r"config\.json: model_type 'gpt2' is not supported; supported: \['bert', 'distilbert', 'roberta', 'xlm-roberta'\]"):
        Encoder.from_pretrained(path)


def test_unsupported_position_embeddings(bert_dir, tmp_path):
    path = _copy_with_tensors(bert_dir, tmp_path / "ckpt", lambda t: t)
    config = json.loads((path / "config.json").read_text())
    config["position_embedding_type"] = "relative_key"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MtlError, match=r"position_embedding_type 'relative_key' is not supported"):
        Encoder.from_pretrained(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_weights(bert_dir, tmp_path, damage):
    path = _copy_with_tensors(bert_dir, tmp_path / "ckpt", lambda t: t)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(b"not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(MtlError, match=r"model\.safetensors: not a readable safetensors file"):
        Encoder.from_pretrained(path)


def test_no_weights_file(bert_dir, tmp_path):
    (tmp_path / "ckpt").mkdir()
    shutil.copy(bert_dir / "config.json", tmp_path / "ckpt" / "config.json")
    with pytest.raises(MtlError, match=r"no model\.safetensors"):
        Encoder.from_pretrained(tmp_path / "ckpt")


def test_malformed_config(bert_dir, tmp_path):
    path = _copy_with_tensors(bert_dir, tmp_path / "ckpt", lambda t: t)
    (path / "config.json").write_text("{ not json")
    with pytest.raises(MtlError, match=r"config\.json: cannot read config"):
        Encoder.from_pretrained(path)


@pytest.mark.parametrize("key, value, message", [
    ("hidden_dropout_prob", 1.5, r"hidden_dropout 1\.5 must be in \[0, 1\]"),
    ("attention_probs_dropout_prob", -0.1, r"attention_dropout -0\.1 must be in \[0, 1\]"),
    ("hidden_act", "mish", r"hidden_act 'mish' is not supported"),
])
def test_config_value_the_encoder_cannot_take(bert_dir, tmp_path, key, value, message):
    path = _copy_with_tensors(bert_dir, tmp_path / "ckpt", lambda t: t)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(MtlError, match=r"ckpt[/\\]config\.json: " + message):
        Encoder.from_pretrained(path)


def test_unknown_run_option(bert_dir):
    with pytest.raises(MtlError, match=r"unknown run option\(s\) \['scan'\]"):
        Encoder.from_pretrained(bert_dir, scan=True)


def test_bad_run_option_values(bert_dir):
    with pytest.raises(MtlError, match=r"remat_policy 'sometimes' is unknown"):
        Encoder.from_pretrained(bert_dir, remat_policy="sometimes")
    with pytest.raises(MtlError, match=r"dtype 'float17' is not a dtype"):
        Encoder.from_pretrained(bert_dir, dtype="float17")


def test_directory_without_config(tmp_path):
    with pytest.raises(MtlError, match=r"is not a model directory \(no config\.json\)"):
        Encoder.from_pretrained(tmp_path)


def test_pre_2019_layernorm_names_load(bert_dir, tmp_path):
    """Old BERT checkpoints name LayerNorm parameters gamma/beta; HF renames them, so do we."""
    def rename(t):
        return {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                for k, v in t.items()}

    path = _copy_with_tensors(bert_dir, tmp_path / "ckpt", rename)
    assert any(k.endswith("LayerNorm.gamma") for k in load_file(path / "model.safetensors"))
    old, new = Encoder.from_pretrained(path), Encoder.from_pretrained(bert_dir)
    for got, want in zip(jax.tree.leaves(nnx.state(old)), jax.tree.leaves(nnx.state(new)), strict=True):
        np.testing.assert_array_equal(got, want)  # every LayerNorm scale and bias among them
