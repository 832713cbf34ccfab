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

Each ``*_stage.py`` module defines its ``STAGE``; :mod:`unclip_jax.train.registry` names them.
The optimizer and EMA come from the config the same way for every stage
(:func:`unclip_jax.train.optimizer.optimizer_config`, ``ema_decay``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from unclip_jax import diffusion


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    build_model: Callable[[Any, nnx.Rngs], nnx.Module]
    make_loss_fn: Callable[[Any], Callable]
    batch_keys: Callable[[Any], tuple[str, ...]]
    prepare: Callable[[nnx.Module, Any, list], dict] | None = None
    prepare_batches: Callable[[Any], int] = lambda c: 0
    sample: Callable[[nnx.Module, Any, dict, jax.Array], tuple[dict, Any]] | None = None


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
