"""The stages the trainer can run, and everything it needs to know about each.

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

The optimizer (:func:`optimizer_config`) and EMA (:func:`ema_decay`) come from the config's
``optimizer`` (and ``schedule``) groups the same way for every stage. The trainer knows nothing
of a model's insides beyond this.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unclip_jax.errors import UserError
from unclip_jax.train.optimizer import OptimizerConfig, from_config_dict


class StageError(UserError, ValueError):
    """An unknown stage or a config the stage cannot use."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    build_model: Callable[[Any, nnx.Rngs], nnx.Module]
    make_loss_fn: Callable[[Any], Callable]
    batch_keys: Callable[[Any], tuple[str, ...]]
    prepare: Callable[[nnx.Module, Any, list], dict] | None = None
    prepare_batches: Callable[[Any], int] = lambda c: 0
    sample: Callable[[nnx.Module, Any, dict, jax.Array], tuple[dict, Any]] | None = None


def _fields(cls, model_cfg) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in model_cfg.items()
            if k in names}


# --------------------------------------------------------------------------------------------
# Optimizer / EMA (shared)
# --------------------------------------------------------------------------------------------

def optimizer_config(config: Any) -> OptimizerConfig:
    """The OptimizerConfig of ``config.optimizer``; a ``schedule`` group (name 'warmup_cosine',
    warmup_steps), where a config has one, sets the learning-rate schedule."""
    opt = config.optimizer
    cfg = from_config_dict(opt, total_steps=config.total_steps)
    sched = config.get("schedule")
    if sched is not None and sched.get("name") == "warmup_cosine":
        cfg = dataclasses.replace(cfg, lr_schedule="cosine",
                                  warmup_steps=sched.get("warmup_steps", 0))
    return cfg


def ema_decay(config: Any) -> float | None:
    """``config.ema_decay``; 0 (or missing) means no EMA."""
    d = config.get("ema_decay", 0.0)
    return float(d) if d else None


# --------------------------------------------------------------------------------------------
# Diffusion prior
# --------------------------------------------------------------------------------------------

def _prior_config(c):
    from unclip_jax.models.diffusion_prior import PriorConfig
    return PriorConfig(**_fields(PriorConfig, c.model))


def _prior_build(c, rngs):
    from unclip_jax.models.diffusion_prior import DiffusionPrior
    return DiffusionPrior(_prior_config(c), rngs=rngs)


def _prior_loss(c):
    from unclip_jax.train import diffusion_prior_stage
    return diffusion_prior_stage.make_loss_fn(diffusion_prior_stage.from_config(c)[0])


def _prior_keys(c):
    from unclip_jax.train.diffusion_prior_stage import NULL_KEYS
    keys = ("image_embed", "text_embed", "text_hidden", "text_mask")
    return keys if _prior_config(c).learned_null else keys + NULL_KEYS


def _prior_prepare(model, c, batches):
    if model.config.embed_norm != "mean_std":
        return {}
    from unclip_jax.train.diffusion_prior_stage import embedding_stats
    mean, std = embedding_stats(b["image_embed"] for b in batches)
    model.set_embedding_stats(jnp.asarray(mean), jnp.asarray(std))
    return {"embedding_stats_examples": sum(len(b["image_embed"]) for b in batches)}


def _means(per_example: dict) -> dict:
    """Traceable means of per-example cosines, and margin = cos_true - cos_unrelated."""
    out = {k: jnp.mean(v) for k, v in per_example.items()}
    out["margin"] = out["cos_true"] - out["cos_unrelated"]
    return out


def _prior_sample(model, c, batch, rng):
    from unclip_jax.evaluate.prior_metrics import prior_cosines
    from unclip_jax.models.diffusion_prior import TextConditioning
    from unclip_jax.models.prior_sampling import sample_prior
    from unclip_jax.train.diffusion_prior_stage import sampling_config
    cond = TextConditioning(batch["text_embed"], batch["text_hidden"], batch["text_mask"])
    uncond = None
    if not model.config.learned_null and "null_text_embed" in batch:
        uncond = TextConditioning(batch["null_text_embed"], batch["null_text_hidden"],
                                  batch["null_text_mask"])
    z = sample_prior(model, cond, rng, sampling_config(c), uncond)["image_embed"]
    return _means(prior_cosines(z, batch["image_embed"], batch["text_embed"])), None


# --------------------------------------------------------------------------------------------
# AR prior
# --------------------------------------------------------------------------------------------

def _ar_build(c, rngs):
    from unclip_jax.models.ar_prior import ARPrior, ARPriorConfig
    return ARPrior(ARPriorConfig(**_fields(ARPriorConfig, c.model)), rngs=rngs)


def _ar_loss(c):
    from unclip_jax.train.ar_prior_stage import make_loss_fn
    return make_loss_fn(c.get("text_drop_prob", 0.1))


def _ar_prepare(model, c, batches):
    from unclip_jax.train.ar_prior_stage import fit_prior_quantizer
    q = c.get("quantizer")
    pairs = [{"image_embed": b["image_embed"], "text_embed": b["text_embed"]} for b in batches]
    fit = fit_prior_quantizer(model, pairs, seed=c.seed,
                              max_quantile_samples=q.get("max_quantile_samples", 1 << 17)
                              if q is not None else 1 << 17)
    return {"quantizer_examples": sum(len(b["image_embed"]) for b in batches),
            "quantizer": fit.energy_report()}


def _ar_batches(c):
    q = c.get("quantizer")
    examples = q.get("fit_examples", 2048) if q is not None else 2048
    return max(1, math.ceil(examples / c.batch_size))


def _ar_sample(model, c, batch, rng):
    from unclip_jax.evaluate.prior_metrics import prior_cosines
    from unclip_jax.models.ar_prior import sample
    s = c.get("sample")
    kw = {} if s is None else dict(num_candidates=s.num_candidates,
                                   guidance_scale=s.guidance_scale, temperature=s.temperature,
                                   top_p=s.top_p, dot_percentile=s.dot_percentile)
    z = sample(model, batch["text_embed"], batch["text_hidden"], batch["text_mask"], rng, **kw)
    return _means(prior_cosines(z["image_embed"], batch["image_embed"],
                                batch["text_embed"])), None


# --------------------------------------------------------------------------------------------
# Decoder and upsampler
# --------------------------------------------------------------------------------------------

def _decoder_config(c):
    from unclip_jax.models.decoder import DecoderConfig
    return DecoderConfig(**_fields(DecoderConfig, c.model))


def _decoder_build(c, rngs):
    from unclip_jax.models.decoder import Decoder
    return Decoder(_decoder_config(c), rngs)


def _decoder_loss(c):
    from unclip_jax.train.decoder_stage import decoder_from_config, make_decoder_loss_fn
    return make_decoder_loss_fn(decoder_from_config(c)[0])


def _decoder_keys(c):
    mc = _decoder_config(c)
    keys = ["image", "image_embed"] + (["text_embed"] if mc.use_text_embed else [])
    if mc.text_encoder == "clip":
        keys += ["text_hidden", "text_mask"]
    elif mc.text_encoder == "transformer":
        keys += ["text_tokens", "text_mask"]
    return tuple(keys)


def _ddim(model_fn, c, shape, rng, learned_variance):
    from unclip_jax import diffusion
    d = c.diffusion
    steps = min(int(c.get("sampling", {}).get("steps", 16)), 16)
    with jax.ensure_compile_time_eval():  # the schedule is host (float64) math, not traced
        base = diffusion.get_schedule(d.schedule, d.num_train_steps)
        sched = diffusion.respace(base, diffusion.space_timesteps(d.num_train_steps,
                                                                  f"ddim{steps}"))
    k1, k2 = jax.random.split(rng)
    x_T = jax.random.normal(k1, shape)

    def fn(x, t):
        out = model_fn(x, t)
        return out[..., :shape[-1]] if learned_variance else out

    return diffusion.ddim_sample(fn, sched, x_T, k2, eta=0.0,
                                 prediction_type=d.prediction_type, clip="static")


def _decoder_sample(model, c, batch, rng):
    from unclip_jax.models.decoder import guided_decoder_fn
    n = min(8, batch["image"].shape[0])
    get = lambda k: None if k not in batch else jnp.asarray(batch[k][:n])  # noqa: E731
    fn = guided_decoder_fn(model, get("image_embed"), get("text_embed"), get("text_hidden"),
                           get("text_mask"), text_tokens=get("text_tokens"),
                           guidance_scale=float(c.get("sampling", {}).get("guidance_scale", 1.0)))
    x = _ddim(fn, c, batch["image"][:n].shape, rng, model.config.learned_variance)
    mse = jnp.mean(jnp.square(x - jnp.asarray(batch["image"][:n])))
    return {"sample_mse_to_data": mse}, jnp.concatenate([jnp.asarray(batch["image"][:n]), x])


def _sr_config(c):
    from unclip_jax.models.upsampler import SuperResConfig
    return SuperResConfig(**_fields(SuperResConfig, c.model))


def _sr_build(c, rngs):
    from unclip_jax.models.upsampler import SuperRes
    return SuperRes(_sr_config(c), rngs)


def _sr_loss(c):
    from unclip_jax.train.decoder_stage import make_upsampler_loss_fn, upsampler_from_config
    return make_upsampler_loss_fn(upsampler_from_config(c)[0])


def _sr_sample(model, c, batch, rng):
    from unclip_jax.models.upsampler import resize_low_res
    n = min(8, batch["image"].shape[0])
    target = jnp.asarray(batch["image"][:n])
    low = resize_low_res(jnp.asarray(batch["low_res"][:n], jnp.float32), target.shape[1:3])
    x = _ddim(lambda x, t: model(x, t, low), c, target.shape, rng, model.config.learned_variance)
    mse = jnp.mean(jnp.square(x - target))
    return {"sample_mse_to_data": mse}, jnp.concatenate([low, x, target])


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------

def _clip_build(c, rngs):
    from unclip_jax.clip.model import CLIP, CLIPConfig
    return CLIP(CLIPConfig(**_fields(CLIPConfig, c.model)), rngs=rngs)


def _clip_loss(c):
    from unclip_jax.train.clip_stage import make_loss_fn
    return make_loss_fn()


STAGES: dict[str, Stage] = {
    "diffusion_prior": Stage("diffusion_prior", _prior_build, _prior_loss, _prior_keys,
                             prepare=_prior_prepare, prepare_batches=lambda c: 4,
                             sample=_prior_sample),
    "ar_prior": Stage("ar_prior", _ar_build, _ar_loss,
                      lambda c: ("text_hidden", "text_mask", "text_embed", "image_embed"),
                      prepare=_ar_prepare, prepare_batches=_ar_batches, sample=_ar_sample),
    "decoder": Stage("decoder", _decoder_build, _decoder_loss, _decoder_keys,
                     sample=_decoder_sample),
    "upsampler": Stage("upsampler", _sr_build, _sr_loss, lambda c: ("image", "low_res"),
                       sample=_sr_sample),
    "clip": Stage("clip", _clip_build, _clip_loss,
                  lambda c: ("image", "text_tokens", "text_mask")),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise StageError(f"Unknown stage {name!r} (config.stage); known stages: "
                         f"{', '.join(STAGES)}.")
    return STAGES[name]


def image_grid(images, columns: int = 8) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one uint8 [rows*H, columns*W, C] grid."""
    x = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    n, h, w, ch = x.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.full((rows * h, columns * w, ch), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = x[i]
    return grid
