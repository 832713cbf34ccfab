"""CLIP's contrastive loss: symmetric InfoNCE with a learned temperature (Radford et al. 2021).

Row i of ``text_embeds`` and row i of ``image_embeds`` are a positive pair; every other row of
the batch is a negative. Under ``jax.jit`` with a sharded batch the arrays are global, so the
negatives are the whole global batch.

Hard negatives (optional): extra texts that belong to no image, K per image (e.g. its caption
with the two objects exchanged). They join the texts every image is contrasted with
(image -> text gets B x K more columns; text -> image is unchanged, since they have no image),
and, with ``negative_weight`` > 0, a second cross-entropy per image over just its own caption
and its K negatives is added with that weight (the focused term). Why the second term: with the
negatives only as extra columns, a Shapes CLIP still embedded a caption and its negatives alike
after 1,000 steps (text cosine 0.98). Our reading: a caption is the positive of one image and the
negative of its mirror scene's image, and while those two images are embedded alike the pulls
cancel; the focused term gives the difference a loss of its own. Whether it is enough is measured
on Shapes by ``unclip-jax clip-retrieval``.
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
                     negative_valid: jax.Array | None = None, negative_weight: float = 0.0
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """text_embeds [B, D], image_embeds [B, D], logit_scale (log of the inverse temperature);
    optionally hard-negative texts ``negative_embeds`` [B, K, D] with ``negative_valid`` [B, K]
    bool (negatives that are not valid are left out) and the weight of the focused term.

    Returns (loss, metrics): the mean of the image->text and text->image cross-entropies over
    logits ``exp(min(logit_scale, log 100)) * normalise(image) @ normalise(text).T``, computed in
    float32, plus ``negative_weight`` x the focused term; metrics hold ``loss``,
    ``accuracy_i2t`` (each image's best text is its own, among the batch's texts),
    ``accuracy_t2i`` and ``scale`` (the clamped, exponentiated logit scale); with negatives also
    ``negative_accuracy`` (of valid negatives, the fraction its image finds farther than its own
    caption), ``negative_fraction`` (valid negatives / (B x K)) and ``negative_loss`` (the focused
    term, over images with at least one valid negative).
    """
    if text_embeds.ndim != 2 or text_embeds.shape != image_embeds.shape:
        raise ValueError(f"text_embeds and image_embeds must both be [batch, dim] with the same "
                         f"shape, got {text_embeds.shape} and {image_embeds.shape}.")
    b, d = text_embeds.shape
    if negative_embeds is not None and (negative_embeds.ndim != 3 or
                                        negative_embeds.shape[0] != b or
                                        negative_embeds.shape[2] != d):
        raise ValueError(f"negative_embeds must be [batch, K, dim] = [{b}, K, {d}], got "
                         f"{negative_embeds.shape}.")
    scale = jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), MAX_LOGIT_SCALE))
    txt, img = l2_normalize(text_embeds), l2_normalize(image_embeds)
    logits_i2t = scale * img @ txt.T          # [images, texts]
    labels = jnp.arange(b)

    def xent(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    metrics = {}
    i2t = logits_i2t
    extra = 0.0
    if negative_embeds is not None:
        k = negative_embeds.shape[1]
        valid = (jnp.ones((b, k), bool) if negative_valid is None
                 else jnp.asarray(negative_valid, bool))
        neg = l2_normalize(negative_embeds.reshape(b * k, d))
        all_neg = scale * img @ neg.T                                   # [images, B x K]
        i2t = jnp.concatenate([logits_i2t, jnp.where(valid.reshape(-1)[None], all_neg,
                                                     -jnp.inf)], axis=1)
        own = scale * jnp.einsum("bd,bkd->bk", img, neg.reshape(b, k, d))   # [B, K]
        pos = jnp.diagonal(logits_i2t)
        focused = jnp.concatenate([pos[:, None], jnp.where(valid, own, -jnp.inf)], axis=1)
        per_row = -jax.nn.log_softmax(focused, axis=-1)[:, 0]
        has = jnp.any(valid, axis=1)
        n_rows = jnp.maximum(jnp.sum(has), 1)
        metrics["negative_loss"] = jnp.sum(jnp.where(has, per_row, 0.0)) / n_rows
        extra = negative_weight * metrics["negative_loss"]
        count = jnp.sum(valid)
        metrics["negative_accuracy"] = (jnp.sum((pos[:, None] > own) & valid)
                                        / jnp.maximum(count, 1))
        metrics["negative_fraction"] = count / (b * k)
    loss = 0.5 * (xent(i2t) + xent(logits_i2t.T)) + extra
    metrics = {
        "loss": loss,
        "accuracy_i2t": jnp.mean(jnp.argmax(logits_i2t, axis=1) == labels),
        "accuracy_t2i": jnp.mean(jnp.argmax(logits_i2t, axis=0) == labels),
        "scale": scale,
        **metrics,
    }
    return loss, metrics
