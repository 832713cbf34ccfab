"""CLIP's contrastive loss: symmetric InfoNCE with a learned temperature (Radford et al. 2021).

Row i of ``text_embeds`` and row i of ``image_embeds`` are a positive pair; every other row of
the batch is a negative. Under ``jax.jit`` with a sharded batch the arrays are global, so the
negatives are the whole global batch.

Hard negatives (optional): extra texts that belong to no image (e.g. each caption with its two
objects exchanged). They join the texts every image is contrasted with (image -> text gets B more
columns); text -> image is unchanged, since they have no image.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MAX_LOGIT_SCALE = math.log(100.0)  # OpenAI clamps the learned scale at 100


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def contrastive_loss(text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array,
                     negative_embeds: jax.Array | None = None,
                     negative_valid: jax.Array | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """text_embeds [B, D], image_embeds [B, D], logit_scale (log of the inverse temperature);
    optionally hard-negative texts ``negative_embeds`` [B, D] with ``negative_valid`` [B] bool
    (rows without a negative are left out).

    Returns (loss, metrics): the mean of the image->text and text->image cross-entropies over
    logits ``exp(min(logit_scale, log 100)) * normalise(image) @ normalise(text).T``, computed in
    float32; metrics hold ``loss``, ``accuracy_i2t`` (each image's best text is its own, among
    the batch's texts), ``accuracy_t2i`` and ``scale`` (the clamped, exponentiated logit scale);
    with negatives also ``negative_accuracy`` (of rows with a negative, the fraction whose image
    is closer to its own text than to that text's negative) and ``negative_fraction``.
    """
    if text_embeds.ndim != 2 or text_embeds.shape != image_embeds.shape:
        raise ValueError(f"text_embeds and image_embeds must both be [batch, dim] with the same "
                         f"shape, got {text_embeds.shape} and {image_embeds.shape}.")
    if negative_embeds is not None and negative_embeds.shape != text_embeds.shape:
        raise ValueError(f"negative_embeds must be [batch, dim] like text_embeds, got "
                         f"{negative_embeds.shape} and {text_embeds.shape}.")
    scale = jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), MAX_LOGIT_SCALE))
    txt, img = l2_normalize(text_embeds), l2_normalize(image_embeds)
    logits_i2t = scale * img @ txt.T          # [images, texts]
    labels = jnp.arange(logits_i2t.shape[0])

    def xent(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    metrics = {}
    i2t = logits_i2t
    if negative_embeds is not None:
        valid = (jnp.ones(labels.shape, bool) if negative_valid is None
                 else jnp.asarray(negative_valid, bool))
        neg = scale * img @ l2_normalize(negative_embeds).T          # [images, negatives]
        i2t = jnp.concatenate([logits_i2t, jnp.where(valid[None, :], neg, -jnp.inf)], axis=1)
        own = jnp.diagonal(logits_i2t) > jnp.diagonal(neg)
        count = jnp.sum(valid)
        metrics["negative_accuracy"] = jnp.sum(own & valid) / jnp.maximum(count, 1)
        metrics["negative_fraction"] = count / labels.shape[0]
    loss = 0.5 * (xent(i2t) + xent(logits_i2t.T))
    metrics = {
        "loss": loss,
        "accuracy_i2t": jnp.mean(jnp.argmax(logits_i2t, axis=1) == labels),
        "accuracy_t2i": jnp.mean(jnp.argmax(logits_i2t, axis=0) == labels),
        "scale": scale,
        **metrics,
    }
    return loss, metrics
