"""Shared fixtures: tiny random HF models (2 layers, hidden 32) and the real MiniLM."""

import os
import re

import jax
import numpy as np
import pytest
import torch
import transformers

from mtl.assets import DEFAULT_MODEL, resolve_model

# The `mtl` command keeps compiled programs in mtl's cache (mtl.assets.enable_compilation_cache).
# Tests, and the commands they run in subprocesses, compile afresh, so that no run depends on
# what an earlier one left there; tests/test_assets.py turns it back on where it is the subject.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
jax.config.update("jax_enable_compilation_cache", False)

# XLA spends longer compiling the tests' tiny programs than running them, and LLVM's optimisation
# of the emitted code is most of that: the second-order MAML gradient of a 2-layer, hidden-16
# encoder compiles in 9.3 s at the default level and 5.8 s at level 0, so that test took 18 s
# instead of 27 (2-core Zen 4 EPYC). XLA reads the flag when JAX starts its backend, on the first
# computation, after this; the commands tests run inherit it, and a test that gives a subprocess
# XLA_FLAGS of its own builds them with `xla_flags`.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a subprocess: the tests' fast compile and `flags`, not the caller's own."""
    return " ".join((FAST_COMPILE, *flags))


def default_codegen_env() -> dict:
    """The environment without the fast compile, for a subprocess that runs code as users do, where
    float32 rounding is under test: the level changes it (the README's encoder example, jitted
    against eager, differs by up to 1.3e-5 at level 0 on the real MiniLM)."""
    flags = os.environ["XLA_FLAGS"].replace(FAST_COMPILE, "").strip()
    return {**os.environ, "XLA_FLAGS": flags}


TINY = dict(vocab_size=99, max_position_embeddings=64)
BERT_LIKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **TINY)

# name -> (HF model class, HF config). Built from configs in the test: no downloads.
TINY_MODELS = {
    "bert": (transformers.BertModel, transformers.BertConfig(**BERT_LIKE)),
    "roberta": (transformers.RobertaModel, transformers.RobertaConfig(type_vocab_size=1, **BERT_LIKE)),
    "xlm-roberta": (transformers.XLMRobertaModel, transformers.XLMRobertaConfig(type_vocab_size=1, **BERT_LIKE)),
    "distilbert": (
        transformers.DistilBertModel,
        transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, **TINY),
    ),
}


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """{name: (torch model in eval mode, saved checkpoint dir)} for every tiny architecture."""
    out = {}
    for i, (name, (cls, config)) in enumerate(TINY_MODELS.items()):
        torch.manual_seed(i)
        model = cls(config).eval()
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        out[name] = (model, directory)
    return out


def padded_batch(pad_token_id: int, seed: int = 0):
    """Three sequences of length 11, two of them padded (at 7 and 3), with two segments."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 99, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad_token_id
    token_types = np.zeros_like(ids)
    token_types[0, 5:] = 1
    return ids, mask, token_types


def loop_trip_counts(compiled) -> list[int]:
    """The trip count of every loop XLA knows one for in a compiled program, ascending: how many
    layers each scan over a layer stack runs, forward and backward."""
    return sorted(int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', compiled.as_text()))


@pytest.fixture(scope="session")
def minilm_dir():
    """The real all-MiniLM-L6-v2, resolved the way users get it (on this machine: the mirror)."""
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    """The real MiniLM fast tokenizer."""
    from mtl import load_tokenizer

    return load_tokenizer(minilm_dir)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """mtl's cache (datasets, packages) in a fresh directory for this test."""
    monkeypatch.setenv("MTL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
