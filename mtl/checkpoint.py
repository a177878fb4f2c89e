"""Checkpoints, through orbax: the only module that talks to it.

A checkpoint at step s holds two items:
  state: the TrainState pytree (params, optimizer state, step, RNG key data);
  meta:  JSON with everything else needed to continue exactly: each task stream's position,
         the resolved config, every task's label vocabulary, the best score so far and the
         early-stopping count.
Saves are asynchronous, and orbax writes to a temporary directory that it renames when
complete, so a process killed mid-save leaves the previous checkpoint as the latest. The
manager keeps the latest `keep` checkpoints plus the best one by the metric the loop saves
with each evaluated checkpoint (SELECTION); "best" means the same when a workdir is reopened.
A reader (evaluate, predict, a transfer) may open a workdir whose run goes on saving, and so
removing old checkpoints: `read_chosen` then chooses again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from mtl.config import checkpoint_choice
from mtl.errors import MtlError

T = TypeVar("T")
SELECTION = "selection"  # the metric a checkpoint is ranked by (higher is better)


class _NoUnscoredWarning(logging.Filter):
    """Drops orbax's warning for a save without metrics while a best metric is tracked.

    Checkpoints between evaluations carry no score by design (LatestN keeps them for resuming;
    BestN ranks only the scored ones), so the warning would print at nearly every save.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoUnscoredWarning())


READ_ATTEMPTS = 5  # reads of a workdir that a run goes on training in; see Checkpointer.read_chosen


class CheckpointRemoved(MtlError):
    """A checkpoint was removed while it was read: the run training in the workdir saved a newer
    one and let this one go (mtl evaluate, predict or a transfer while it trains)."""


class Checkpointer:
    """Save and restore (TrainState, meta) pairs under `directory`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, best_metric: str | None = SELECTION):
        self.directory = Path(directory).absolute()
        preserve = [policies.LatestN(keep)]
        if best_metric is not None:
            preserve.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                           keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            # Without best_fn, orbax's best_step() is the latest step, whatever BestN kept.
            best_fn=(lambda m: m[best_metric]) if best_metric is not None else None,
            best_mode="max",
            enable_async_checkpointing=True,
            create=True,
        )
        # Handlers named up front, so that a checkpoint's metadata reads before any save or restore.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = _listing(lambda: ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers))
        self.closed = False
        self.failed = False  # a save failed (and was reported)
        _quiet_abandoned_io()  # a save fails in the background: its noise comes before _writing sees it

    def latest_step(self) -> int | None:
        """The newest saved checkpoint's step (None before the first save)."""
        return self.manager.latest_step()

    def rerun_resumes(self) -> str:
        """What rerunning the same command does, in words, for an error that stops the run."""
        latest = self.manager.latest_step()
        return f"resumes from checkpoint {latest}" if latest is not None else "starts over (no checkpoint is saved)"

    def best_step(self) -> int | None:
        """The step of the checkpoint with the best selection score (None if none is scored)."""
        return self.manager.best_step()

    def read_chosen(self, which: str | int, read: Callable[[int], T]) -> tuple[int, T]:
        """(step, read(step)) for the best checkpoint (which="best"; the latest if none is scored),
        the latest one ("latest"), or the one saved at step `which` (an int, or its digits).

        A run training in the same workdir may remove that checkpoint while it is read (it keeps
        only its latest and best): then the checkpoints are listed again and the newer one read.
        A step asked for by number is not swapped for another: its removal is an error.
        """
        which = checkpoint_choice(which)
        if isinstance(which, int):
            self.require_kept(which)
            return which, read(which)
        for attempt in range(READ_ATTEMPTS):
            step = self.best_step() if which == "best" else None
            step = step if step is not None else self.latest_step()
            if step is None:
                raise MtlError(f"{self.directory.parent}: has no finished checkpoint yet")
            try:
                return step, read(step)
            except CheckpointRemoved as e:
                if attempt == READ_ATTEMPTS - 1:
                    raise MtlError(f"{e}, as were the {READ_ATTEMPTS - 1} chosen before it: the run training in "
                                   f"{self.directory.parent} replaces its checkpoints faster than they can be "
                                   "read; read it when the run ends") from None
                _listing(self.manager.reload)
        raise AssertionError("unreachable")

    def require_kept(self, which: str | int) -> None:
        """An MtlError naming the saved steps if `which` is a step number that is not saved: a
        caller with a model to build first checks before it."""
        which = checkpoint_choice(which)
        if isinstance(which, int) and which not in self.manager.all_steps():
            raise MtlError(f"{self.directory.parent}: no checkpoint at step {which}; {self.describe_saved()}")

    def describe_saved(self) -> str:
        """The saved steps in words, the best one marked: "saved: 250 (best), 500"."""
        steps = sorted(self.manager.all_steps())
        if not steps:
            return "none is saved yet"
        best = self.best_step()
        return "saved: " + ", ".join(f"{s} (best)" if s == best else str(s) for s in steps)

    def save(self, step: int, state: Any, meta: dict, metrics: dict[str, float] | None = None) -> None:
        """Start an asynchronous save; `metrics` rank it for the best-checkpoint policy.

        `meta` is copied now: the write finishes in the background while the caller goes on
        changing its own objects (stream positions advance with the next step).
        """
        snapshot = json.loads(json.dumps(meta))
        with self._writing():  # a save that failed in the background raises here, at the next one
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(snapshot)),
                metrics=metrics,
                force=True,
            )

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`, with the state's structure and shapes taken from `like`.

        A checkpoint whose tree does not match `like` is an MtlError naming the first
        mismatching parameter (or optimizer-state entry).
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        meta = self.restore_meta(step)
        # Checked before orbax reads anything: its own error names no parameter, and a failed
        # restore leaves its reader threads to print tracebacks as the process exits.
        with self._reading(step):
            mismatch = _first_mismatch(self.manager.item_metadata(step)["state"], abstract)
        if mismatch is not None:
            raise MtlError(f"{self.directory}/{step}: the checkpoint does not fit this run: {mismatch}. A workdir's "
                           "model and optimizer are fixed; use a new --workdir (model.init_from transfers weights)")
        with self._reading(step):
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        return restored["state"], meta

    def restore_meta(self, step: int) -> dict:
        """Checkpoint `step`'s meta alone (positions, labels, config), without reading its arrays."""
        with self._reading(step):
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    @contextlib.contextmanager
    def _reading(self, step: int) -> Iterator[None]:
        """Orbax failing to read checkpoint `step`, as one line. Its shapes are checked first, so
        what is left is damage: a copy cut short, a disk that filled up, a file edited or lost."""
        try:
            yield
        except MtlError:
            raise
        except Exception as e:  # orbax and tensorstore raise bare Exceptions, wrapping the cause
            _drop_unawaited_coroutine_warnings()
            if not (self.directory / str(step)).exists():
                raise CheckpointRemoved(f"{self.directory}/{step}: removed while it was read") from None
            earlier = [s for s in self.manager.all_steps() if s < step]
            advice = (f"move it out of {self.directory} to use checkpoint {max(earlier)}" if earlier else
                      "no earlier checkpoint is kept")
            raise MtlError(
                f"{self.directory}/{step}: cannot read this checkpoint ({_root_cause(e)}); {advice}"
            ) from None

    def restore_tree(self, step: int, only: str | None = None) -> Any:
        """The saved state as a plain nested dict of arrays, without a target structure, on this
        process's first device whatever mesh saved it (transfer, export, inference).

        With `only` (say "params"), that top-level entry alone, and nothing else is read: AdamW's
        moments are two more copies of the params, which inference never needs.
        """
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with self._reading(step):
            metadata = self.manager.item_metadata(step)["state"]
            if only is not None:
                metadata = {only: metadata[only]}
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
            if only is None:
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
                return restored["state"]
            # The manager's StandardCheckpointHandler reads whole trees; the same files read as a
            # PyTree checkpoint can leave entries out.
            args = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                          partial_restore=True)
            with ocp.PyTreeCheckpointer() as reader:
                return reader.restore(self.directory / str(step) / "state", args=args)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed save (a full disk, say), as one line naming the checkpoint a rerun resumes from.
        The failure is said once: closing afterwards does not raise it again."""
        if self.failed:  # orbax raises the same error again at every wait: it was said
            with contextlib.suppress(Exception):
                yield
            return
        try:
            yield
        except MtlError:
            raise
        except Exception as e:
            self.failed = True
            _drop_unawaited_coroutine_warnings()
            raise MtlError(f"{self.directory}: cannot save a checkpoint ({_root_cause(e)}); once the cause is fixed, "
                           f"the same command {self.rerun_resumes()}") from None

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; a failed one raises here, once."""
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish any save in flight and release the manager; closing again does nothing."""
        if self.closed:
            return
        self.closed = True
        with self._writing():
            self.manager.wait_until_finished()
        if not self.failed:  # after a failure the manager's threads still hold its error: leave them be
            self.manager.close()


def _listing(list_checkpoints: Callable[[], T]) -> T:
    """list_checkpoints(), an orbax call that lists the step directories and then reads each
    one's time, listed again if a run training in the directory removes one in between."""
    for _ in range(READ_ATTEMPTS - 1):
        with contextlib.suppress(FileNotFoundError):
            return list_checkpoints()
    return list_checkpoints()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"params.model.encoder.embeddings.norm.bias": shape} of a state tree or its saved metadata
    (the two flatten to the same key names; nnx's trailing "value" is dropped)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        out[".".join(names[:-1] if names[-1] == "value" else names)] = tuple(leaf.shape)
    return out


def _first_mismatch(saved: Any, expected: Any) -> str | None:
    """The first parameter (then optimizer-state entry) whose presence or shape differs."""
    saved, expected = _shapes(saved), _shapes(expected)
    for name in sorted(expected, key=lambda n: not n.startswith("params.")):
        if name not in saved:
            return f"{name} is in this run, not in the checkpoint"
        if saved[name] != expected[name]:
            return f"{name} is {saved[name]} in the checkpoint, {expected[name]} in this run"
    extra = next((name for name in saved if name not in expected), None)
    return None if extra is None else f"the checkpoint has {extra}, which this run lacks"


def _quiet_abandoned_io() -> None:
    """After a failed restore or save, orbax leaves the checkpoint's other reads or writes running.
    They fail too, onto an event loop orbax has closed, and Python prints each failure as it
    comes, up to the process's end: hundreds of tracebacks after the one-line error, as
    "unraisable", as asyncio's "Task exception was never retrieved", or as coroutines dropped
    at exit. The first Checkpointer installs this, since a background save fails before mtl
    hears of it; those are dropped, mtl says the failure itself in one line, and anything else
    still prints."""
    if _AbandonedIO.installed:
        return
    _AbandonedIO.installed = True
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine dropped at exit
        if not (_AbandonedIO.matches(unraisable.exc_value) or (code is not None and "orbax" in code.co_filename)):
            previous(unraisable)

    sys.unraisablehook = hook
    for name in ("asyncio", "absl"):
        logging.getLogger(name).addFilter(_AbandonedIO())


def _drop_unawaited_coroutine_warnings() -> None:
    """After a failed restore or save, the abandoned I/O coroutines are dropped at exit, each
    with a RuntimeWarning "coroutine ... was never awaited" that names no module to filter on."""
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)


class _AbandonedIO(logging.Filter):
    installed = False

    @staticmethod
    def matches(error: BaseException | None) -> bool:
        """Raised inside orbax, by tensorstore's checkpoint I/O under it, or by the closed loop
        their leftover callbacks reach."""
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return True
        if isinstance(error, ValueError) and re.match(r"[A-Z_]+: .* in OCDBT database", str(error)):
            return True  # set on a future from C++: no orbax frame in its traceback
        frame = error.__traceback__ if error is not None else None
        while frame is not None:
            if "orbax" in frame.tb_frame.f_code.co_filename:
                return True
            frame = frame.tb_next
        return False

    def filter(self, record: logging.LogRecord) -> bool:
        # asyncio's "Task exception was never retrieved", orbax's own log of its thread failing
        return not (record.exc_info and self.matches(record.exc_info[1]))


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost exception `e` was raised from (the one that says what broke)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().split(" [tensorstore_spec=")[0]  # the spec is a page of JSON
    return text.splitlines()[0] if text else type(e).__name__


def require_kept(workdir: str | os.PathLike, which: str | int) -> None:
    """An MtlError naming the kept steps if `which` is a step number `workdir` does not keep: a
    command with a model and data to load checks before it loads them."""
    if not isinstance(checkpoint_choice(which), int):  # best and latest: no checkpoint manager to open
        return
    with contextlib.closing(Checkpointer(Path(workdir) / "checkpoints")) as checkpointer:
        checkpointer.require_kept(which)


def load_trained(workdir: str | os.PathLike, which: str | int = "best") -> tuple[Any, dict, int]:
    """(saved train params as a nested dict, meta, step) of a workdir's best or latest checkpoint,
    or the one saved at step `which`."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise MtlError(f"{workdir}: no checkpoints/ directory; is it a training workdir?")
    checkpointer = Checkpointer(directory)
    try:
        def read(step: int) -> tuple[Any, dict]:
            params = checkpointer.restore_tree(step, only="params")["params"]
            return _unwrap_variables(params), checkpointer.restore_meta(step)

        step, (params, meta) = checkpointer.read_chosen(which, read)
        return params, meta, step
    finally:
        checkpointer.close()


def _unwrap_variables(tree: Any) -> Any:
    """nnx Variables are saved as {"value": array}; return the plain nested dict of arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _unwrap_variables(v) for k, v in tree.items()}
    return tree
