"""Training stage of CLIP from scratch: the symmetric contrastive loss (Radford et al. 2021).

A batch holds ``image`` [B, H, W, 3] in [-1, 1] (the input pipeline's convention), ``text_tokens``
[B, L] int and ``text_mask`` [B, L] bool. Images are mapped to CLIP's normalisation (OpenAI
mean/std) inside the step; the loss is :func:`unclip_jax.clip.loss.contrastive_loss` over the
GLOBAL batch (under ``jit`` with a sharded batch the arrays are global, so every other row of
every device is a negative). Metrics: both retrieval accuracies and the logit scale.

With ``input.negative_captions`` set (Shapes: each two-object caption with its objects
exchanged, its relation turned, its shapes exchanged), the batch also holds ``negative_tokens`` /
``negative_mask`` [B, K, L]; their text embeddings join the texts each image is contrasted with,
and ``negative_weight`` (config top level, default 1.0) weighs the focused term of
:func:`unclip_jax.clip.loss.contrastive_loss` (rows whose mask is all false have none).
"""
from __future__ import annotations

import math
import numbers

import jax.numpy as jnp

from unclip_jax.clip.loss import contrastive_loss
from unclip_jax.clip.model import CLIP, CLIPConfig
from unclip_jax.clip.preprocess import OPENAI_MEAN, OPENAI_STD
from unclip_jax.train.stage import Stage, StageConfigError, model_fields

BATCH_KEYS = ("image", "text_tokens", "text_mask")


def model_config(c) -> CLIPConfig:
    """The :class:`CLIPConfig` of a ``configs/clip.py`` ConfigDict."""
    return CLIPConfig(**model_fields(CLIPConfig, c.model))


def to_clip_pixels(image):
    """[-1, 1] images -> CLIP-normalised pixels."""
    x = (jnp.asarray(image, jnp.float32) + 1.0) * 0.5
    return (x - jnp.asarray(OPENAI_MEAN)) / jnp.asarray(OPENAI_STD)


NEGATIVE_KEYS = ("negative_tokens", "negative_mask")


def _negatives(c) -> bool:
    return bool(c.get("input", {}).get("negative_captions", ""))


def make_loss_fn(negatives: bool = False, negative_weight: float = 1.0):
    """``loss_fn(clip_model, batch, rng) -> (loss, metrics)`` for the shared train step; with
    ``negatives`` the batch's hard-negative captions join the contrast (and the focused term,
    weighted ``negative_weight``)."""

    def loss_fn(model, batch, rng):
        del rng  # CLIP trains without dropout
        tokens, mask = jnp.asarray(batch["text_tokens"]), jnp.asarray(batch["text_mask"])
        out = model(tokens, to_clip_pixels(batch["image"]), attention_mask=mask)
        neg = valid = None
        if negatives:
            neg_mask = jnp.asarray(batch["negative_mask"])               # [B, K, L]
            b, k, length = neg_mask.shape
            valid = jnp.any(neg_mask, axis=-1)                           # [B, K]
            # a missing negative encodes the row's own caption (then masked out of the loss)
            neg_tokens = jnp.where(valid[..., None], jnp.asarray(batch["negative_tokens"]),
                                   tokens[:, None])
            neg_mask = jnp.where(valid[..., None], neg_mask, mask[:, None])
            neg, _ = model.encode_text(neg_tokens.reshape(b * k, length),
                                       neg_mask.reshape(b * k, length))
            neg = neg.reshape(b, k, -1)
        loss, metrics = contrastive_loss(out["text_embeds"], out["image_embeds"],
                                         out["logit_scale"], neg, valid,
                                         negative_weight if negatives else 0.0)
        metrics.pop("loss")
        return loss, metrics

    return loss_fn


def check_settings(c) -> None:
    """``negative_weight``: a finite number >= 0 (refused before anything is built)."""
    w = c.get("negative_weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
        raise StageConfigError(f"negative_weight must be a finite number >= 0 (the weight of "
                               f"the focused hard-negative term), got {w!r}. Fix it in the config "
                               "or with --config.negative_weight=VALUE.")


STAGE = Stage("clip", build_model=lambda c, rngs: CLIP(model_config(c), rngs=rngs),
              make_loss_fn=lambda c: make_loss_fn(_negatives(c),
                                                  float(c.get("negative_weight", 1.0))),
              batch_keys=lambda c: BATCH_KEYS + (NEGATIVE_KEYS if _negatives(c) else ()),
              model_config=model_config, check_settings=check_settings)
