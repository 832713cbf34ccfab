"""Training stage of the decoder (paper section 2.1, Table 3).

A batch is a dict of arrays:
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

:func:`make_loss_fn` is ``loss_fn(model, batch, rng) -> (loss, metrics)`` for
:func:`unclip_jax.train.step.make_train_step`; :func:`build_train_step` returns (train_step,
initial state, graphdef, rest). The trainer's ``sample`` hook (``STAGE``) draws guided DDIM
samples for a few rows of a batch and reports their MSE to the data.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unclip_jax import diffusion
from unclip_jax.models.decoder import Decoder, DecoderConfig, guided_decoder_fn
from unclip_jax.train import step as step_lib
from unclip_jax.train.optimizer import TABLE3, OptimizerConfig, from_config_dict, make_optimizer
from unclip_jax.train.stage import (Stage, check_diffusion_settings, ddim_images, model_fields,
                                    require_keys)


@dataclasses.dataclass(frozen=True)
class DecoderStageConfig:
    num_train_steps: int = 1000
    schedule: str = "cosine"
    prediction_type: str = "epsilon"
    learned_variance: bool = True
    vlb_weight: float = 0.001
    image_drop_prob: float = 0.1
    text_drop_prob: float = 0.5

    def __post_init__(self):
        check_diffusion_settings(self, ("image_drop_prob", "text_drop_prob"))


def batch_keys(mc: DecoderConfig) -> tuple[str, ...]:
    """The batch fields a decoder of config ``mc`` reads."""
    keys = ["image", "image_embed"] + (["text_embed"] if mc.use_text_embed else [])
    if mc.text_encoder == "clip":
        keys += ["text_hidden", "text_mask"]
    elif mc.text_encoder == "transformer":
        keys += ["text_tokens", "text_mask"]
    return tuple(keys)


def make_loss_fn(cfg: DecoderStageConfig = DecoderStageConfig()):
    """``loss_fn(decoder, batch, rng) -> (loss, metrics)``; see the module docstring."""
    schedule = diffusion.get_schedule(cfg.schedule, cfg.num_train_steps)

    def loss_fn(model: Decoder, batch: dict, rng: jax.Array):
        mc = model.config
        require_keys(batch, list(batch_keys(mc)), f"decoder (text_encoder={mc.text_encoder!r})")
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


def build_train_step(model: Decoder, stage: DecoderStageConfig = DecoderStageConfig(),
                     tx: optax.GradientTransformation | None = None,
                     ema_decay: float | None = 0.9999):
    """(train_step, initial TrainState, graphdef, rest); train_step is pure and not jitted."""
    tx = make_optimizer(TABLE3["decoder"]) if tx is None else tx
    return step_lib.build_train_step(model, make_loss_fn(stage), tx, ema_decay)


def from_config(c: Any) -> tuple[DecoderStageConfig, OptimizerConfig]:
    """Stage and optimizer settings from a ``configs/decoder.py`` ConfigDict."""
    d = c.diffusion
    stage = DecoderStageConfig(num_train_steps=d.num_train_steps, schedule=d.schedule,
                               prediction_type=d.prediction_type,
                               learned_variance=d.learned_variance, vlb_weight=d.vlb_weight,
                               image_drop_prob=d.image_drop_prob, text_drop_prob=d.text_drop_prob)
    return stage, from_config_dict(c.optimizer)


def model_config(c: Any) -> DecoderConfig:
    """The :class:`DecoderConfig` of a ``configs/decoder.py`` ConfigDict."""
    return DecoderConfig(**model_fields(DecoderConfig, c.model))


# --------------------------------------------------------------------------------------------
# The trainer's hooks
# --------------------------------------------------------------------------------------------

def _sample(model, c, batch, rng):
    n = min(8, batch["image"].shape[0])
    get = lambda k: None if k not in batch else jnp.asarray(batch[k][:n])  # noqa: E731
    fn = guided_decoder_fn(model, get("image_embed"), get("text_embed"), get("text_hidden"),
                           get("text_mask"), text_tokens=get("text_tokens"),
                           guidance_scale=float(c.get("sampling", {}).get("guidance_scale", 1.0)))
    x = ddim_images(fn, c, batch["image"][:n].shape, rng, model.config.learned_variance)
    mse = jnp.mean(jnp.square(x - jnp.asarray(batch["image"][:n])))
    return {"sample_mse_to_data": mse}, jnp.concatenate([jnp.asarray(batch["image"][:n]), x])


STAGE = Stage("decoder", build_model=lambda c, rngs: Decoder(model_config(c), rngs),
              make_loss_fn=lambda c: make_loss_fn(from_config(c)[0]),
              batch_keys=lambda c: batch_keys(model_config(c)), sample=_sample,
              model_config=model_config, check_settings=from_config)
