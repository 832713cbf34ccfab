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
"""
from __future__ import annotations

import json
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from unclip_jax.errors import UserError
from unclip_jax.io import paths


class CheckpointMismatch(UserError, ValueError):
    """The workdir's checkpoint does not belong to this config / model."""


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


def latest_step(manager) -> int | None:
    return manager.latest_step()


def read_meta(manager, step: int) -> dict:
    return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


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
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])


def load_arrays(workdir: str, step: int | None = None) -> tuple[dict, dict]:
    """(state as NumPy arrays, meta) of a workdir's checkpoint (latest when ``step`` is None),
    with no mesh: for tests, notebooks and conversion."""
    manager = make_manager(workdir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}.")
    meta = read_meta(manager, step)
    # Target: every leaf on this process's first device (the saved devices may not exist here).
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one),
                          saved, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    arrays = jax.tree.map(np.asarray, state["state"])
    manager.close()
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
