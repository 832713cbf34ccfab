"""Checks of a training config and workdir, run before anything is built, compiled or written.

:func:`check_config` refuses every setting the trainer cannot use (a batch size that is not a
positive integer, ``checkpoint.keep`` below 1, a non-finite learning rate, an unknown stage, a
model or stage setting its dataclass refuses, ...) with one :class:`TrainConfigError` naming the
key, the value and what would work. It needs no devices: ``unclip-jax train`` runs it before
the distributed runtime starts. :func:`check_workdir` refuses a workdir that cannot be one
(a file, a folder we may not write in, a ``checkpoints`` entry that is a file) without creating
anything. What needs the devices (the batch split over the mesh) is checked by the trainer right
after building the mesh, still before anything is written.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any

from unclip_jax.data.synthetic_embeddings import make_prior_task
from unclip_jax.errors import UserError
from unclip_jax.io import outputs, paths
from unclip_jax.train.inputs import InputError
from unclip_jax.train.optimizer import OptimizerConfigError, optimizer_config
from unclip_jax.train.registry import get_stage
from unclip_jax.train.sharding import parse_rules

MAX_SEED = 2 ** 62          # the trainer adds small offsets to the seed; JAX keys take int64
WORKDIR_FOLDERS = ("checkpoints", "tensorboard", "samples")
WORKDIR_FILES = ("metrics.jsonl", "train.log")


class TrainConfigError(UserError, ValueError):
    """Trainer settings that cannot work (alone or together)."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _get(config: Any, dotted: str, default: Any = ...) -> Any:
    node = config
    for name in dotted.split("."):
        if node is None or not hasattr(node, "keys") or name not in node:
            if default is ...:
                raise TrainConfigError(f"The config has no 'config.{dotted}'; add it to the "
                                       "config file (see configs/*.py for the fields).")
            return default
        node = node[name]
    return node


def check_int(value: Any, key: str, *, low: int | None = None, high: int | None = None,
              what: str = "") -> int:
    """``value`` as an int in [low, high], else one TrainConfigError naming ``config.KEY``."""
    span = (f" >= {low}" if high is None else f" in [{low}, {high}]") if low is not None else ""
    if not _is_int(value):
        raise TrainConfigError(f"config.{key} must be an integer{span}, got {value!r}{what}. "
                               f"Pass e.g. --config.{key}={low if low is not None else 1}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise TrainConfigError(f"config.{key} must be an integer{span}, got {value}{what}. "
                               f"Pass e.g. --config.{key}={max(low or 0, 1)}.")
    return int(value)


def check_number(value: Any, key: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, what: str = "") -> float:
    """``value`` as a finite float in the range, else one TrainConfigError."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    span = f" in {lo}, {hi}" if low is not None and high is not None else (
        f" {'>' if low_open else '>='} {low:g}" if low is not None else "")
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise TrainConfigError(f"config.{key} must be a finite number{span}, got {value!r}{what}. "
                               f"Set --config.{key} to such a number.")
    return float(value)


def check_config(config: Any) -> None:
    """Refuse (TrainConfigError and friends, all UserErrors) any setting the trainer cannot use.
    Builds nothing heavier than the model's config dataclass; touches no file and no device."""
    stage_name = _get(config, "stage")
    if not isinstance(stage_name, str):
        raise TrainConfigError(f"config.stage must name a stage, got {stage_name!r}.")
    stage = get_stage(stage_name)
    check_int(_get(config, "batch_size"), "batch_size", low=1)
    check_int(_get(config, "total_steps"), "total_steps", low=0)
    check_int(_get(config, "seed", 0), "seed", low=0, high=MAX_SEED)
    check_int(_get(config, "log_every", 100), "log_every", low=1)
    check_int(_get(config, "eval_every", 0) or 0, "eval_every", low=0,
              what=" (0 turns the sample hook off)")
    check_int(_get(config, "checkpoint.every_steps", 1000), "checkpoint.every_steps", low=1)
    check_int(_get(config, "checkpoint.keep", 3), "checkpoint.keep", low=1,
              what=" (the number of checkpoints kept; 1 keeps only the latest)")
    async_save = _get(config, "checkpoint.async_save", False)
    if not isinstance(async_save, bool):
        raise TrainConfigError(f"config.checkpoint.async_save must be true or false, got "
                               f"{async_save!r}.")
    if _get(config, "optimizer", None) is None:
        raise TrainConfigError("The config has no 'optimizer' group; add one (see configs/*.py).")
    check_int(_get(config, "optimizer.accum_steps", 1), "optimizer.accum_steps", low=1,
              what=" (1: no gradient accumulation)")
    decay = _get(config, "ema_decay", 0.0)
    if decay is not None:
        check_number(decay, "ema_decay", low=0.0, high=1.0, high_open=True,
                     what=" (0 turns the EMA off)")
    mesh = _get(config, "mesh", None)
    if mesh is not None:
        for axis in ("data", "fsdp", "tensor"):
            if axis in mesh:
                size = mesh[axis]
                if not _is_int(size) or (size < 1 and size != -1):
                    raise TrainConfigError(f"config.mesh.{axis} must be a positive integer or -1 "
                                           f"(the devices the other axes leave), got {size!r}.")
        check_int(mesh.get("min_shard_bytes", 0), "mesh.min_shard_bytes", low=0)
        check_int(mesh.get("cpu_devices", 0), "mesh.cpu_devices", low=-1,
                  what=" (0: JAX's default of one CPU device, -1: one per usable core)")
        parse_rules(mesh.get("rules"))
    if _get(config, "input", None) is None:
        raise TrainConfigError("The config has no 'input' group: nothing to train on. Add one "
                               "(see configs/*.py).")
    if config.input.get("kind", "synthetic_prior") == "synthetic_prior":
        _check_synthetic_input(config.input)
    try:
        optimizer_config(config)
    except (TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise OptimizerConfigError(f"config.optimizer: {e}. Fix the optimizer settings.") from None
    _check_stage(config, stage)


def _check_synthetic_input(cfg: Any) -> None:
    """The synthetic caption -> z_i task's sizes (unclip_jax.train.inputs.SyntheticPriorInput)."""
    sizes = {}
    for name, default, low in (("num_concepts", 8, 1), ("dim", 32, 1), ("text_width", 32, 1),
                               ("context_length", 8, 3), ("task_seed", 0, 0)):
        sizes[name] = check_int(cfg.get(name, default), f"input.{name}", low=low,
                                high=MAX_SEED if name == "task_seed" else 1 << 16)
    try:
        make_prior_task(seed=sizes.pop("task_seed"), **sizes)
    except (TypeError, ValueError) as e:
        raise InputError(f"config.input cannot make the synthetic task: {e}") from None


def _check_stage(config: Any, stage) -> None:
    """The stage's own settings: its model config dataclass and its loss settings."""
    if _get(config, "model", None) is None:
        raise TrainConfigError("The config has no 'model' group; add one (see configs/*.py).")
    for what, fn in (("config.model", stage.model_config),
                     ("the stage's settings", stage.check_settings),
                     ("the batch fields", stage.batch_keys)):
        if fn is None:
            continue
        try:
            fn(config)
        except UserError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            text = str(e).strip().rstrip(".") or type(e).__name__
            raise TrainConfigError(f"{what} cannot be used: {text}. Fix it in the config file "
                                   "or with --config.KEY=VALUE.") from None


def check_workdir(workdir: Any) -> str:
    """Refuse a workdir that cannot hold a run (a file, a folder we may not write in, an
    entry the trainer writes that has the wrong kind) without creating anything."""
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir).strip():
        raise TrainConfigError(f"--workdir must name a folder, got {workdir!r}.")
    workdir = outputs.check_folder(os.fspath(workdir), flag="--workdir")
    if paths.exists(workdir):
        for name in WORKDIR_FOLDERS:
            p = paths.join(workdir, name)
            if paths.exists(p) and not paths.isdir(p):
                raise TrainConfigError(f"--workdir {workdir}: {name} is a file where the trainer "
                                       "keeps a folder. Move it away or choose another workdir.")
            if (paths.isdir(p) and not paths.is_remote(p)
                    and not os.access(p, os.W_OK | os.X_OK)):
                raise TrainConfigError(f"--workdir {workdir}: no permission to write in {p}. "
                                       "Fix its permissions or choose another workdir.")
        for name in WORKDIR_FILES:
            p = paths.join(workdir, name)
            if paths.isdir(p):
                raise TrainConfigError(f"--workdir {workdir}: {name} is a folder where the "
                                       "trainer appends to a file. Move it away or choose "
                                       "another workdir.")
            if paths.exists(p) and not paths.is_remote(p) and not os.access(p, os.W_OK):
                raise TrainConfigError(f"--workdir {workdir}: no permission to append to {p}. "
                                       "Fix its permissions or choose another workdir.")
    return workdir
