"""Training stage of the upsamplers (super-resolution; paper section 2.1, Table 3).

A batch holds ``image`` [B, H, W, 3] (the target) and ``low_res`` [B, h, w, 3] (the degraded
low-resolution image, at h x w or already resized to H x W). The step resizes ``low_res`` to
H x W (bicubic), cuts the same random ``crop_size`` x ``crop_size`` window out of both (a quarter
of the target size in the paper) for every row, and applies the plain epsilon or v loss. The
model runs at full size at inference: it has no attention.

:func:`make_loss_fn` is ``loss_fn(model, batch, rng) -> (loss, metrics)`` for
:func:`unclip_jax.train.step.make_train_step`; :func:`build_train_step` returns (train_step,
initial state, graphdef, rest). The trainer's ``sample`` hook (``STAGE``) upsamples a few rows of
a batch with DDIM and reports the MSE to the targets.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unclip_jax import diffusion
from unclip_jax.models.upsampler import SuperRes, SuperResConfig, resize_low_res
from unclip_jax.train import step as step_lib
from unclip_jax.train.optimizer import TABLE3, OptimizerConfig, from_config_dict, make_optimizer
from unclip_jax.train.stage import (Stage, StageConfigError, check_diffusion_settings,
                                    ddim_images, model_fields, require_keys)

BATCH_KEYS = ("image", "low_res")


@dataclasses.dataclass(frozen=True)
class UpsamplerStageConfig:
    num_train_steps: int = 1000
    schedule: str = "cosine"          # Table 3: cosine for 64->256, linear for 256->1024
    prediction_type: str = "epsilon"  # or 'v_prediction'
    learned_variance: bool = False
    crop_size: int | None = None      # None: no crop (train at full size)

    def __post_init__(self):
        check_diffusion_settings(self)
        if self.crop_size is not None and (isinstance(self.crop_size, bool)
                                           or not isinstance(self.crop_size, int)
                                           or self.crop_size < 1):
            raise StageConfigError(f"The crop size must be a positive integer, got "
                                   f"{self.crop_size!r}; set config.crop_fraction in (0, 1].")


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


def make_loss_fn(cfg: UpsamplerStageConfig = UpsamplerStageConfig()):
    """``loss_fn(super_res, batch, rng) -> (loss, metrics)``; see the module docstring."""
    schedule = diffusion.get_schedule(cfg.schedule, cfg.num_train_steps)

    def loss_fn(model: SuperRes, batch: dict, rng: jax.Array):
        require_keys(batch, list(BATCH_KEYS), "upsampler")
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


def build_train_step(model: SuperRes, stage: UpsamplerStageConfig = UpsamplerStageConfig(),
                     tx: optax.GradientTransformation | None = None,
                     ema_decay: float | None = 0.9999):
    """(train_step, initial TrainState, graphdef, rest); train_step is pure and not jitted."""
    tx = make_optimizer(TABLE3["upsampler_256"]) if tx is None else tx
    return step_lib.build_train_step(model, make_loss_fn(stage), tx, ema_decay)


def from_config(c: Any) -> tuple[UpsamplerStageConfig, OptimizerConfig]:
    """Stage and optimizer settings from a ``configs/upsampler.py`` ConfigDict."""
    d = c.diffusion
    fraction = c.crop_fraction
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
            or not 0.0 < fraction <= 1.0):
        raise StageConfigError(f"config.crop_fraction must be a number in (0, 1] (the side of the "
                               f"training crops over image_size), got {fraction!r}.")
    stage = UpsamplerStageConfig(num_train_steps=d.num_train_steps, schedule=d.schedule,
                                 prediction_type=d.prediction_type,
                                 learned_variance=d.learned_variance,
                                 crop_size=int(round(c.image_size * c.crop_fraction)))
    return stage, from_config_dict(c.optimizer)


def model_config(c: Any) -> SuperResConfig:
    """The :class:`SuperResConfig` of a ``configs/upsampler.py`` ConfigDict."""
    return SuperResConfig(**model_fields(SuperResConfig, c.model))


# --------------------------------------------------------------------------------------------
# The trainer's hooks
# --------------------------------------------------------------------------------------------

def _sample(model, c, batch, rng):
    n = min(8, batch["image"].shape[0])
    target = jnp.asarray(batch["image"][:n])
    low = resize_low_res(jnp.asarray(batch["low_res"][:n], jnp.float32), target.shape[1:3])
    x = ddim_images(lambda x, t: model(x, t, low), c, target.shape, rng,
                    model.config.learned_variance)
    mse = jnp.mean(jnp.square(x - target))
    return {"sample_mse_to_data": mse}, jnp.concatenate([low, x, target])


STAGE = Stage("upsampler", build_model=lambda c, rngs: SuperRes(model_config(c), rngs),
              make_loss_fn=lambda c: make_loss_fn(from_config(c)[0]),
              batch_keys=lambda c: BATCH_KEYS, sample=_sample, model_config=model_config,
              check_settings=from_config)
