"""Training stages of the decoder and of the upsamplers.

Decoder (paper section 2.1, Table 3). A batch is a dict of arrays:
  image        [B, H, W, 3] in [-1, 1]    the target x0
  image_embed  [B, D]                     z_i
  text_embed   [B, D]                     z_t (when the decoder has use_text_embed)
  text_hidden  [B, L, W]                  CLIP text states (text_encoder='clip'), or
  text_tokens  [B, L] int                 token ids (text_encoder='transformer')
  text_mask    [B, L] bool                real tokens
The loss is the hybrid loss of Improved DDPM (epsilon MSE + vlb_weight * T * the per-step VLB on
the learned variance range; ``unclip_jax.diffusion.training_losses``). For classifier-free
guidance each row's z_i is replaced by the decoder's learned null embedding with probability
``image_drop_prob`` (10%) and its caption dropped (z_t zeroed, tokens masked out) with
probability ``text_drop_prob`` (50%), independently.

Upsamplers. A batch holds ``image`` [B, H, W, 3] (the target) and ``low_res`` [B, h, w, 3] (the
degraded low-resolution image, at h x w or already resized to H x W). The step resizes
``low_res`` to H x W (bicubic), cuts the same random ``crop_size`` x ``crop_size`` window out of
both (a quarter of the target size in the paper) for every row, and applies the plain epsilon or
v loss. The model runs at full size at inference: it has no attention.

Both are ``loss_fn(model, batch, rng) -> (loss, metrics)`` for
:func:`unclip_jax.train.step.make_train_step`; :func:`make_decoder_train_step` and
:func:`make_upsampler_train_step` return (train_step, initial state, graphdef, rest).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unclip_jax import diffusion
from unclip_jax.models.decoder import Decoder
from unclip_jax.models.upsampler import SuperRes, resize_low_res
from unclip_jax.train import step as step_lib
from unclip_jax.train.optimizer import TABLE3, OptimizerConfig, from_config_dict, make_optimizer


@dataclasses.dataclass(frozen=True)
class DecoderStageConfig:
    num_train_steps: int = 1000
    schedule: str = "cosine"
    prediction_type: str = "epsilon"
    learned_variance: bool = True
    vlb_weight: float = 0.001
    image_drop_prob: float = 0.1
    text_drop_prob: float = 0.5


@dataclasses.dataclass(frozen=True)
class UpsamplerStageConfig:
    num_train_steps: int = 1000
    schedule: str = "cosine"          # Table 3: cosine for 64->256, linear for 256->1024
    prediction_type: str = "epsilon"  # or 'v_prediction'
    learned_variance: bool = False
    crop_size: int | None = None      # None: no crop (train at full size)


def _require(batch: dict, keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"The {what} batch lacks {missing}; it has {sorted(batch)}.")


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------

def make_decoder_loss_fn(cfg: DecoderStageConfig = DecoderStageConfig()):
    """``loss_fn(decoder, batch, rng) -> (loss, metrics)``; see the module docstring."""
    schedule = diffusion.get_schedule(cfg.schedule, cfg.num_train_steps)

    def loss_fn(model: Decoder, batch: dict, rng: jax.Array):
        mc = model.config
        need = ["image", "image_embed"] + (["text_embed"] if mc.use_text_embed else [])
        if mc.text_encoder == "clip":
            need += ["text_hidden", "text_mask"]
        elif mc.text_encoder == "transformer":
            need += ["text_tokens", "text_mask"]
        _require(batch, need, f"decoder (text_encoder={mc.text_encoder!r})")
        if cfg.learned_variance != mc.learned_variance:
            raise ValueError(f"learned_variance={cfg.learned_variance} but the decoder has "
                             f"{mc.out_channels} output channels for {mc.image_channels}-channel "
                             "images; set out_channels to twice the image channels for the "
                             "hybrid loss, or learned_variance=False.")
        x0 = jnp.asarray(batch["image"], jnp.float32)
        b = x0.shape[0]
        k_img, k_txt, k_diff, k_drop = jax.random.split(rng, 4)
        drop_image = jax.random.bernoulli(k_img, cfg.image_drop_prob, (b,))
        drop_text = jax.random.bernoulli(k_txt, cfg.text_drop_prob, (b,))
        get = lambda k: None if k not in batch else jnp.asarray(batch[k])  # noqa: E731

        def model_fn(x_t, t):
            return model(x_t, t, get("image_embed"), get("text_embed"), get("text_hidden"),
                         get("text_mask"), text_tokens=get("text_tokens"),
                         drop_image=drop_image, drop_text=drop_text, deterministic=False,
                         rng=k_drop)

        loss, terms = diffusion.diffusion_loss(
            model_fn, schedule, x0, k_diff, prediction_type=cfg.prediction_type,
            learned_variance=cfg.learned_variance, vlb_weight=cfg.vlb_weight)
        return loss, {"mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"]),
                      "image_dropped": jnp.mean(drop_image),
                      "text_dropped": jnp.mean(drop_text)}

    return loss_fn


def make_decoder_train_step(model: Decoder, stage: DecoderStageConfig = DecoderStageConfig(),
                            tx: optax.GradientTransformation | None = None,
                            ema_decay: float | None = 0.9999):
    """(train_step, initial TrainState, graphdef, rest); train_step is pure and not jitted."""
    tx = make_optimizer(TABLE3["decoder"]) if tx is None else tx
    return step_lib.build_train_step(model, make_decoder_loss_fn(stage), tx, ema_decay)


# --------------------------------------------------------------------------------------------
# Upsamplers
# --------------------------------------------------------------------------------------------

def random_crops(images: list[jax.Array], size: int, rng: jax.Array) -> list[jax.Array]:
    """The same random ``size`` x ``size`` window of each row, cut from every [B, H, W, C] array
    of ``images`` (all of one spatial size)."""
    b, h, w, _ = images[0].shape
    if size > min(h, w):
        raise ValueError(f"crop_size {size} is larger than the {h}x{w} training images.")
    ky, kx = jax.random.split(rng)
    ys = jax.random.randint(ky, (b,), 0, h - size + 1)
    xs = jax.random.randint(kx, (b,), 0, w - size + 1)

    def crop(img, y, x):
        return jax.lax.dynamic_slice(img, (y, x, 0), (size, size, img.shape[-1]))

    return [jax.vmap(crop)(img, ys, xs) for img in images]


def make_upsampler_loss_fn(cfg: UpsamplerStageConfig = UpsamplerStageConfig()):
    """``loss_fn(super_res, batch, rng) -> (loss, metrics)``; see the module docstring."""
    schedule = diffusion.get_schedule(cfg.schedule, cfg.num_train_steps)

    def loss_fn(model: SuperRes, batch: dict, rng: jax.Array):
        _require(batch, ["image", "low_res"], "upsampler")
        if cfg.learned_variance != model.config.learned_variance:
            raise ValueError(f"learned_variance={cfg.learned_variance} but the upsampler has "
                             f"{model.config.out_channels} output channels.")
        x0 = jnp.asarray(batch["image"], jnp.float32)
        low = jnp.asarray(batch["low_res"], jnp.float32)
        if low.shape[1:3] != x0.shape[1:3]:
            low = resize_low_res(low, x0.shape[1:3])
        k_crop, k_diff, k_drop = jax.random.split(rng, 3)
        if cfg.crop_size is not None and cfg.crop_size < x0.shape[1]:
            x0, low = random_crops([x0, low], cfg.crop_size, k_crop)

        def model_fn(x_t, t):
            return model(x_t, t, low, deterministic=False, rng=k_drop)

        loss, terms = diffusion.diffusion_loss(
            model_fn, schedule, x0, k_diff, prediction_type=cfg.prediction_type,
            learned_variance=cfg.learned_variance)
        return loss, {"mse": jnp.mean(terms["mse"])}

    return loss_fn


def make_upsampler_train_step(model: SuperRes,
                              stage: UpsamplerStageConfig = UpsamplerStageConfig(),
                              tx: optax.GradientTransformation | None = None,
                              ema_decay: float | None = 0.9999):
    """(train_step, initial TrainState, graphdef, rest); train_step is pure and not jitted."""
    tx = make_optimizer(TABLE3["upsampler_256"]) if tx is None else tx
    return step_lib.build_train_step(model, make_upsampler_loss_fn(stage), tx, ema_decay)


# --------------------------------------------------------------------------------------------
# From the config files
# --------------------------------------------------------------------------------------------

def decoder_from_config(c: Any) -> tuple[DecoderStageConfig, OptimizerConfig]:
    """Stage and optimizer settings from a ``configs/decoder.py`` ConfigDict."""
    d = c.diffusion
    stage = DecoderStageConfig(num_train_steps=d.num_train_steps, schedule=d.schedule,
                               prediction_type=d.prediction_type,
                               learned_variance=d.learned_variance, vlb_weight=d.vlb_weight,
                               image_drop_prob=d.image_drop_prob, text_drop_prob=d.text_drop_prob)
    return stage, from_config_dict(c.optimizer)


def upsampler_from_config(c: Any) -> tuple[UpsamplerStageConfig, OptimizerConfig]:
    """Stage and optimizer settings from a ``configs/upsampler.py`` ConfigDict."""
    d = c.diffusion
    stage = UpsamplerStageConfig(num_train_steps=d.num_train_steps, schedule=d.schedule,
                                 prediction_type=d.prediction_type,
                                 learned_variance=d.learned_variance,
                                 crop_size=int(round(c.image_size * c.crop_fraction)))
    return stage, from_config_dict(c.optimizer)


def merged(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State) -> nnx.Module:
    """The model for given parameters (e.g. ``state.ema``)."""
    return nnx.merge(graphdef, params, rest)
