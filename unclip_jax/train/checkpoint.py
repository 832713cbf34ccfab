"""Checkpoints of a training run: Orbax, atomic, keep-last-K, restorable onto any mesh.

A checkpoint ``WORKDIR/checkpoints/<step>/`` holds two items:

  state  the whole training state: ``step``, ``params``, ``opt_state``, ``ema`` (when kept) and
         ``rest``, the model's non-parameter state (the AR prior's PCA quantiser, the diffusion
         prior's clip_mean / clip_std): everything ``nnx.merge`` needs to rebuild the model
  meta   JSON: the step, the data position (global batch index of the next batch and the input
         iterator's own position), the full config, and the shape/dtype of every state leaf

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest (on gs:// a commit marker plays
the rename's part). A remote WORKDIR (gs://...) is written directly: Orbax goes through
etils.epath and TensorStore, like unclip_jax.io.paths. Restoring reads into abstract
arrays that carry the CURRENT mesh's shardings: a checkpoint saved by 8 devices with FSDP
restores onto 2 devices, or data-parallel only. Before restoring (and before the trainer writes
anything), :func:`check_compatible` compares the saved shapes and stage with the current run and
refuses a mismatch with one message naming what differs.

A checkpoint that cannot be read (a truncated array file, garbled metadata) is
:class:`CheckpointCorrupt`; :func:`restore_newest` then falls back to the newest one that reads
and renames the broken ones ``<step>.corrupt-<UTC time>`` (not a step name to Orbax; nothing is
deleted). A write that fails (a full disk, a quota) is one :class:`CheckpointSaveError` saying
which checkpoint is intact; a disk too full for the next checkpoint is refused before writing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from unclip_jax.errors import UserError
from unclip_jax.io import paths


class CheckpointMismatch(UserError, ValueError):
    """The workdir's checkpoint does not belong to this config / model."""


class CheckpointCorrupt(UserError, ValueError):
    """No checkpoint of the workdir can be read (every one is truncated or garbled)."""


class CheckpointSaveError(UserError, OSError):
    """Writing a checkpoint failed (a full disk, a quota, permissions); the earlier ones stay."""


CORRUPT_TAG = ".corrupt-"   # <step>.corrupt-<UTC time>: not a step name to Orbax (not digits)


def checkpoint_dir(workdir: str) -> str:
    """``WORKDIR/checkpoints`` (absolute when local; gs://... as given)."""
    return paths.join(paths.absolute(workdir), "checkpoints")


def make_manager(workdir: str, keep: int = 3, async_save: bool = False):
    """An Orbax CheckpointManager over ``WORKDIR/checkpoints`` keeping the last ``keep``."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})


def _path_name(path) -> str:
    return jax.tree_util.keystr(tuple(path))


def shape_signature(tree) -> dict[str, list]:
    """{leaf path: [shape, dtype]} of a (possibly abstract) state tree."""
    return {_path_name(p): [list(np.shape(x)), str(np.dtype(x.dtype))]
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def save(manager, step: int, state: dict, meta: dict, force: bool = True) -> None:
    """Save ``state`` (a dict of pytrees of jax arrays) and ``meta`` (JSON) as ``step``."""
    meta = dict(meta, step=int(step), shapes=shape_signature(state))
    manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)


_WRITE_FAILURES = ("no space left", "enospc", "disk quota", "edquot", "file too large",
                   "read-only file system", "permission denied", "input/output error",
                   "os_error_code")


def _write_reason(e: BaseException) -> str:
    """The operating system's words for a failed write (TensorStore names the errno)."""
    m = re.search(r"os_error_code='?(\d+)", str(e))
    if m:
        return os.strerror(int(m.group(1)))
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return _why(e)


class _HeldErrors(logging.Filter):
    """Holds the ERROR records (Orbax's writer threads log each failed write with a traceback)
    while a save runs: dropped when the failure is reported in one line, else let through."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record):
        if record.levelno >= logging.ERROR:
            self.held.append(record)
            return False
        return True


class _DropWriteFailures(logging.Filter):
    """After a failed save was reported in one line: Orbax's writer threads still log each
    failed write (with a traceback) when they end, up to the interpreter's exit. Drop those."""

    def filter(self, record):
        text = record.getMessage().lower()
        return not (record.levelno >= logging.ERROR
                    and ("os_error_code" in text or any(w in text for w in _WRITE_FAILURES)))


def _join_writer_threads(timeout: float = 60.0) -> None:
    """Let Orbax's writer threads of a failed save end now (each fails on its own) rather than
    at the interpreter's exit, where they would print tracebacks."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread() and "orbax" in type(t).__module__:
            try:   # Orbax's threads re-raise their own failure from join()
                t.join(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - the same failure, reported once by the caller
                pass


def _quiet_write_failures() -> None:
    for lg in (logging.getLogger(), logging.getLogger("absl")):
        if not any(isinstance(f, _DropWriteFailures) for f in lg.filters):
            lg.addFilter(_DropWriteFailures())


def close_quietly(manager) -> None:
    """Close ``manager``, ignoring the error of a save that already failed (Orbax re-raises it
    from ``close``); later closes do nothing."""
    if getattr(manager, "_unclip_closed", False):
        return
    try:
        manager.close()
    except Exception:  # noqa: BLE001 - the failure was reported already
        pass
    manager._unclip_closed = True


def _free_bytes(folder: str) -> int | None:
    """Free bytes on the file system of a local ``folder`` (None when unknown or remote)."""
    if paths.is_remote(folder):
        return None
    probe = os.path.abspath(folder)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def save_or_explain(manager, workdir: str, step: int, state: dict, meta: dict) -> None:
    """:func:`save`, refusing first when the disk cannot hold the checkpoint, and turning a
    write failure (a full disk, a quota, permissions) into one CheckpointSaveError that says
    the earlier checkpoints are intact and how to go on."""
    kept = [s for s in manager.all_steps() if s != step]
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) + (1 << 20)
    free = _free_bytes(checkpoint_dir(workdir))
    if free is not None and free < need:
        raise CheckpointSaveError(
            f"Checkpoint {step} needs about {need / 2**20:.1f} MiB but only {free / 2**20:.1f} "
            f"MiB are free in {checkpoint_dir(workdir)}; nothing was written"
            + (f" and checkpoint {max(kept)} is intact" if kept else "")
            + ". Free disk space and rerun the same command to resume.")
    with explain_write_failures(manager, workdir, step, kept):
        save(manager, step, state, meta)


def wait_or_explain(manager, workdir: str, step: int) -> None:
    """``manager.wait_until_finished()`` with a failed background write explained as by
    :func:`save_or_explain`."""
    kept = [s for s in manager.all_steps() if s != step]
    with explain_write_failures(manager, workdir, step, kept):
        manager.wait_until_finished()


@contextlib.contextmanager
def explain_write_failures(manager, workdir: str, step: int, kept: list[int]):
    loggers = [logging.getLogger(), logging.getLogger("absl")]
    held = _HeldErrors()
    for lg in loggers:
        lg.addFilter(held)
    explained = False
    try:
        yield
    except Exception as e:  # noqa: BLE001 - Orbax wraps OS errors in several types
        text = str(e).lower()
        if not isinstance(e, OSError) and not any(w in text for w in _WRITE_FAILURES):
            raise
        explained = True
        _quiet_closed_loops()
        _quiet_write_failures()
        _join_writer_threads()
        close_quietly(manager)
        kept = [s for s in kept if s < step]
        before = (f"checkpoint {max(kept)} is intact and is where the run resumes" if kept else
                  "no earlier checkpoint was written")
        raise CheckpointSaveError(
            f"Writing checkpoint {step} in {checkpoint_dir(workdir)} failed "
            f"({_write_reason(e)}); {before}. Free disk space (or fix the permissions) and rerun "
            "the same command.") from e
    finally:
        for lg in loggers:
            lg.removeFilter(held)
        if not explained:
            for record in held.held:
                logging.getLogger(record.name).handle(record)


def latest_step(manager) -> int | None:
    return manager.latest_step()


def _why(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = text.split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _not_corruption(e: BaseException) -> bool:
    """Errors that say nothing about the checkpoint's bytes: never a reason to move it aside."""
    return (isinstance(e, (CheckpointMismatch, MemoryError, PermissionError, KeyboardInterrupt))
            or "RESOURCE_EXHAUSTED" in str(e)[:300] or "PERMISSION_DENIED" in str(e)[:300])


def check_meta(meta: Any, step: int) -> dict:
    """``meta`` as this trainer writes it (a JSON object with the step, shapes and data
    position), else ValueError (the checkpoint is garbled)."""
    if not isinstance(meta, dict):
        raise ValueError(f"its meta is a {type(meta).__name__}, not a JSON object")
    if meta.get("step") != step or isinstance(meta.get("step"), bool):
        raise ValueError(f"its meta names step {meta.get('step')!r}")
    if not isinstance(meta.get("shapes"), dict):
        raise ValueError("its meta has no shapes")
    pos = meta.get("data_position", step)
    if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0:
        raise ValueError(f"its meta has data position {pos!r}")
    if not isinstance(meta.get("config", {}), dict):
        raise ValueError("its meta has no config")
    return meta


def move_aside(workdir: str, step: int) -> str:
    """Rename the checkpoint ``step`` to ``<step>.corrupt-<UTC time>`` in the same folder (a
    name Orbax does not take for a step) and return the new path. Nothing is deleted."""
    folder = checkpoint_dir(workdir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dst = paths.join(folder, f"{step}{CORRUPT_TAG}{stamp}")
    n = 1
    while paths.exists(dst):
        n += 1
        dst = paths.join(folder, f"{step}{CORRUPT_TAG}{stamp}-{n}")
    paths.replace(paths.join(folder, str(step)), dst)
    return dst


def _quiet_closed_loops() -> None:
    """Orbax leaves asyncio callbacks behind when a read fails; once its event loop is closed
    they report 'Event loop is closed' as unraisable exceptions. Drop those (only those)."""
    previous = sys.unraisablehook
    if getattr(previous, "_unclip_quiet", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and "Event loop is closed" in str(e):
            return
        previous(unraisable)

    hook._unclip_quiet = True
    sys.unraisablehook = hook


def restore_newest(workdir: str, manager, abstract_state: dict, config: Any, *,
                   log=print, move: bool = True):
    """Restore the newest checkpoint of ``workdir`` that reads, as ``abstract_state``'s
    shardings: ``(manager, state, meta, step)``, or ``(manager, None, None, None)`` when there is
    no checkpoint. A checkpoint from another config is refused (CheckpointMismatch, nothing
    changed). A newer checkpoint that cannot be read (a truncated array file, garbled metadata)
    is reported through ``log`` and, once an older one has restored, renamed aside (``move``;
    only process 0 renames) so that the next save does not build on it; the manager is then
    reloaded. If none reads, CheckpointCorrupt, with nothing moved."""
    steps = sorted(manager.all_steps(), reverse=True)
    where = checkpoint_dir(workdir)
    broken: list[tuple[int, str]] = []
    for step in steps:
        try:
            meta = read_meta(manager, step)
            check_compatible(meta, abstract_state, config, where)
            state, meta = restore(manager, step, abstract_state)
        except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise many kinds
            if _not_corruption(e):
                raise
            _quiet_closed_loops()
            why = getattr(e, "reason", None) or _why(e)
            broken.append((step, why))
            log(f"checkpoint {step} in {where} cannot be restored ({why}); trying the one "
                "before it")
            continue
        if broken:
            moved = []
            if move and jax.process_index() == 0:
                moved = [move_aside(workdir, b) for b, _ in broken]
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("unclip_jax_checkpoint_moved_aside")
            manager.reload()   # forget the steps moved aside
            for (b, why), dst in zip(broken, moved):
                log(f"warning: checkpoint {b} is corrupt ({why}); moved it aside to {dst} (not "
                    f"deleted) and resumed from checkpoint {step}.")
        return manager, state, meta, step
    if not broken:
        return manager, None, None, None
    names = ", ".join(f"{b} ({why})" for b, why in broken[:3])
    raise CheckpointCorrupt(
        f"No checkpoint in {where} can be restored: {names}"
        + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        + ". Nothing was changed. Move the broken step folders out of that folder to start "
        "afresh in this workdir, or use another --workdir.")


def _unreadable(manager, step: int, e: BaseException) -> "CheckpointCorrupt":
    _quiet_closed_loops()
    err = CheckpointCorrupt(
        f"Checkpoint {step} in {manager.directory} cannot be read ({_why(e)}). Rerun `unclip-jax "
        "train` with its config and workdir (it moves a corrupt checkpoint aside and resumes "
        "from the newest one that reads), or use an older step.")
    err.reason = _why(e)
    return err


def read_meta(manager, step: int) -> dict:
    """The meta of checkpoint ``step`` (CheckpointCorrupt when it cannot be read)."""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return check_meta(dict(meta) if isinstance(meta, dict) else meta, step)
    except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise many kinds
        if _not_corruption(e) or isinstance(e, UserError):
            raise
        raise _unreadable(manager, step, e) from None


def check_compatible(meta: dict, abstract_state: dict, config: Any, where: str) -> None:
    """Refuse a checkpoint whose stage or state shapes differ from the current run's."""
    saved_stage = (meta.get("config") or {}).get("stage")
    if saved_stage is not None and saved_stage != config.stage:
        raise CheckpointMismatch(
            f"The checkpoint in {where} was written by a '{saved_stage}' run, but this config "
            f"trains '{config.stage}'. Use another --workdir (nothing was changed).")
    saved = meta.get("shapes", {})
    now = shape_signature(abstract_state)
    diffs = [f"{k}: saved {saved.get(k)} vs now {now.get(k)}" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CheckpointMismatch(
            f"The checkpoint in {where} (step {meta.get('step')}) does not match this config's "
            f"model: {'; '.join(diffs[:3])}{more}. Resume with the config it was written with "
            "(saved in the checkpoint's meta), or use another --workdir (nothing was changed).")


def restore(manager, step: int, abstract_state: dict) -> tuple[dict, dict]:
    """(state, meta) of ``step``, the state laid out as ``abstract_state``'s shardings."""
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise many kinds
        if _not_corruption(e) or isinstance(e, UserError):
            raise
        raise _unreadable(manager, step, e) from None
    return out["state"], dict(out["meta"])


def load_arrays(workdir: str, step: int | None = None) -> tuple[dict, dict]:
    """(state as NumPy arrays, meta) of a workdir's checkpoint (latest when ``step`` is None),
    with no mesh: for tests, notebooks and conversion."""
    manager = make_manager(workdir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}.")
    try:
        meta = read_meta(manager, step)
        # Target: every leaf on this process's first device (the saved devices may not exist
        # here).
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one), saved,
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        arrays = jax.tree.map(np.asarray, state["state"])
    except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise many kinds
        if _not_corruption(e) or isinstance(e, UserError):
            raise
        raise _unreadable(manager, step, e) from None
    finally:
        close_quietly(manager)
    return arrays, meta


class StopFlag:
    """Set by SIGTERM (and SIGINT when asked): the training loop checks it after every step,
    saves a checkpoint and exits 0. Restores the previous handlers on ``close()``."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signum: int | None = None
        self._previous = {}
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass

    def _handle(self, signum, frame):
        del frame
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None

    def close(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def config_json(config: Any) -> dict:
    """The config as plain JSON (ml_collections' best effort, then parsed)."""
    return json.loads(config.to_json_best_effort())
