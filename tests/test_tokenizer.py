"""The tokenizer beside the weights, with padding and truncation left to the caller."""

import pytest

from mtl import load_tokenizer
from mtl.errors import MtlError


def test_packaged_padding_and_truncation_are_cleared(minilm_dir):
    tokenizer = load_tokenizer(minilm_dir)
    backend = tokenizer.backend_tokenizer
    assert backend.padding is None and backend.truncation is None
    # The raw tokenizer.json pads everything to 128; ours does not.
    assert len(backend.encode("hello world").ids) == 4
    lengths = [len(ids) for ids in tokenizer(["hello world", "a somewhat longer sentence"])["input_ids"]]
    assert lengths == [4, 6]
    assert len(tokenizer("word " * 300)["input_ids"]) == 302
    assert len(tokenizer("word " * 300, truncation=True, max_length=64)["input_ids"]) == 64
    padded = tokenizer(["hi", "hello there"], padding="max_length", max_length=16)["input_ids"]
    assert [len(x) for x in padded] == [16, 16]


def test_word_ids_are_available(minilm_dir):
    """Token classification aligns labels through word_ids(), which only fast tokenizers have."""
    encoding = load_tokenizer(minilm_dir)(["Tokenization", "works"], is_split_into_words=True)
    assert encoding.word_ids() == [None, 0, 0, 1, None]


def test_directory_without_tokenizer(tiny_hf):
    with pytest.raises(MtlError, match=r"bert0: no tokenizer files \(looked for tokenizer\.json, vocab\.txt"):
        load_tokenizer(tiny_hf["bert"][1])
