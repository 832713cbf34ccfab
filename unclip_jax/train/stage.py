"""What the trainer knows of a stage (:class:`Stage`), and helpers the stage modules share.

A :class:`Stage` tells the trainer, from a config file's ConfigDict,

  build_model(config, rngs)        the Flax NNX model (``config.model``); called under
                                   ``nnx.eval_shape`` and again under a sharded ``jax.jit``,
                                   so it must be a pure function of the config and the rngs
  make_loss_fn(config)             ``loss_fn(model, batch, rng) -> (loss, metrics)``
  batch_keys(config)               the batch fields the loss reads (others are dropped)
  prepare(model, config, batches)  optional: fit non-trained state before step 0 from a few
                                   whole global batches (the AR prior's PCA quantiser, the
                                   diffusion prior's per-dimension z_i mean/std). Runs once on a
                                   fresh run; the fitted buffers are saved in every checkpoint
  prepare_batches(config)          how many global batches ``prepare`` wants
  sample(model, config, batch, rng)  optional eval hook -> (scalar metrics, images or None);
                                   images are a [N, H, W, 3] array in [-1, 1] for a PNG grid
  model_config(config)             the model's config dataclass (its checks refuse bad fields):
                                   the trainer calls it before building anything
  check_settings(config)           optional: refuse the stage's own settings (diffusion, drop
                                   probabilities) without building anything (no JAX backend)

Each ``*_stage.py`` module defines its ``STAGE``; :mod:`unclip_jax.train.registry` names them.
The optimizer and EMA come from the config the same way for every stage
(:func:`unclip_jax.train.optimizer.optimizer_config`, ``ema_decay``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from unclip_jax import diffusion
from unclip_jax.errors import UserError

SCHEDULES = ("cosine", "squaredcos_cap_v2", "linear")
MAX_TRAIN_STEPS = 100_000       # diffusion timesteps of a schedule (the paper uses 1000)


class StageConfigError(UserError, ValueError):
    """A stage setting (config.diffusion, drop probabilities, crops) that cannot work."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    build_model: Callable[[Any, nnx.Rngs], nnx.Module]
    make_loss_fn: Callable[[Any], Callable]
    batch_keys: Callable[[Any], tuple[str, ...]]
    prepare: Callable[[nnx.Module, Any, list], dict] | None = None
    prepare_batches: Callable[[Any], int] = lambda c: 0
    sample: Callable[[nnx.Module, Any, dict, jax.Array], tuple[dict, Any]] | None = None
    model_config: Callable[[Any], Any] | None = None
    check_settings: Callable[[Any], Any] | None = None


def check_diffusion_settings(cfg: Any, probabilities: tuple[str, ...] = ()) -> None:
    """Refuse diffusion settings of a stage config dataclass (``num_train_steps``, ``schedule``,
    ``prediction_type``, ``vlb_weight`` where it has them, and the named probabilities) with one
    StageConfigError naming every problem."""
    problems = []
    n = getattr(cfg, "num_train_steps", 1)
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 1 <= n <= MAX_TRAIN_STEPS:
        problems.append(f"diffusion.num_train_steps must be an integer in [1, {MAX_TRAIN_STEPS}], "
                        f"got {n!r}")
    schedule = getattr(cfg, "schedule", "cosine")
    if schedule not in SCHEDULES:
        problems.append(f"diffusion.schedule must be one of {SCHEDULES}, got {schedule!r}")
    pred = getattr(cfg, "prediction_type", "epsilon")
    if pred not in diffusion.PREDICTION_TYPES:
        problems.append(f"diffusion.prediction_type must be one of {diffusion.PREDICTION_TYPES}, "
                        f"got {pred!r}")
    for name in ("vlb_weight",) if hasattr(cfg, "vlb_weight") else ():
        v = getattr(cfg, name)
        if not _finite(v) or v < 0:
            problems.append(f"diffusion.{name} must be a finite number >= 0, got {v!r}")
    for name in probabilities:
        v = getattr(cfg, name)
        if not _finite(v) or not 0.0 <= v <= 1.0:
            problems.append(f"diffusion.{name} must be a probability in [0, 1], got {v!r}")
    if problems:
        raise StageConfigError("; ".join(problems) + ". Fix them in the config file or with "
                               "--config.diffusion.KEY=VALUE.")


def _finite(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def model_fields(cls, model_cfg) -> dict:
    """The entries of a config's ``model`` group that are fields of the dataclass ``cls``
    (lists as tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in model_cfg.items()
            if k in names}


def require_keys(batch: dict, keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"The {what} batch lacks {missing}; it has {sorted(batch)}.")


def cosine_means(per_example: dict) -> dict:
    """Traceable means of per-example cosines, and margin = cos_true - cos_unrelated."""
    out = {k: jnp.mean(v) for k, v in per_example.items()}
    out["margin"] = out["cos_true"] - out["cos_unrelated"]
    return out


def ddim_images(model_fn, c, shape, rng, learned_variance):
    """Images of ``shape`` from a deterministic DDIM loop of at most 16 steps (the image stages'
    sample hooks): ``model_fn(x, t)`` under the config's ``diffusion`` settings."""
    d = c.diffusion
    steps = min(int(c.get("sampling", {}).get("steps", 16)), 16)
    spec = diffusion.SamplerSpec(sampler="ddim", steps=steps, spacing=f"ddim{steps}",
                                 clip_range=1.0, prediction_type=d.prediction_type,
                                 schedule=d.schedule, num_train_steps=d.num_train_steps)
    k1, k2 = jax.random.split(rng)
    x_T = jax.random.normal(k1, shape)

    def fn(x, t):
        out = model_fn(x, t)
        return out[..., :shape[-1]] if learned_variance else out

    return diffusion.sample(fn, spec, x_T, k2)
