"""Cosine-similarity measures of a prior, as the DALLE2-pytorch community reports them.

For held-out captions with known (z_t, z_i) and the prior's sampled z_i':
  cos_true       cos(z_i', z_i)            how close the sample is to the caption's own image
  cos_text       cos(z_i', z_t)            how close it is to the caption's text embedding
  cos_unrelated  cos(z_i', z_i of another caption)   a floor: a prior that ignores the caption
                 scores about the same here as in cos_true
  cos_text_true  cos(z_t, z_i)             the reference "just use z_t" would reach (needs
                 z_t and z_i of the same dimension)
  margin         cos_true - cos_unrelated
The unrelated caption of row b is row b + 1 (mod B) unless given; rows whose "unrelated" caption
is the same concept can be excluded by passing ``unrelated_image_embed`` explicitly.
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np


def cosine(a, b, eps: float = 1e-12):
    """Row-wise cosine similarity of [B, D] arrays -> [B] (float32)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"cosine needs arrays of the same shape, got {a.shape} and {b.shape}.")
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return jnp.sum(a * b, axis=-1) / (na * nb)


def prior_cosines(sampled, image_embed, text_embed, unrelated_image_embed=None
                  ) -> dict[str, jnp.ndarray]:
    """Per-example cosines [B] (keys in the module docstring, without 'margin')."""
    sampled, image_embed = jnp.asarray(sampled), jnp.asarray(image_embed)
    if sampled.ndim != 2 or sampled.shape != image_embed.shape:
        raise ValueError(f"sampled and image_embed must both be [batch, dim], got {sampled.shape} "
                         f"and {image_embed.shape}.")
    if unrelated_image_embed is None:
        if sampled.shape[0] < 2:
            raise ValueError("With a batch of one there is no other caption to compare against; "
                             "pass unrelated_image_embed or a batch of at least 2.")
        unrelated_image_embed = jnp.roll(image_embed, 1, axis=0)
    out = {"cos_true": cosine(sampled, image_embed),
           "cos_unrelated": cosine(sampled, unrelated_image_embed)}
    text_embed = jnp.asarray(text_embed)
    if text_embed.shape == sampled.shape:
        out["cos_text"] = cosine(sampled, text_embed)
        out["cos_text_true"] = cosine(text_embed, image_embed)
    return out


def summarise(per_example: dict[str, jnp.ndarray]) -> dict[str, float]:
    """Means of per-example cosines, plus margin = cos_true - cos_unrelated."""
    out = {k: float(jnp.mean(v)) for k, v in per_example.items()}
    out["margin"] = out["cos_true"] - out["cos_unrelated"]
    return out


def evaluate_prior(sample_fn: Callable[[dict], jnp.ndarray], batches: Iterable[dict]
                   ) -> dict[str, float]:
    """Mean cosines over held-out batches.

    sample_fn(batch) -> sampled z_i [B, D] (e.g. a closure over ``sample_prior_jit``); each batch
    holds 'image_embed' and 'text_embed' (and whatever sample_fn needs). Returns the means of
    :func:`prior_cosines` over all examples, 'margin', and 'count'.
    """
    sums: dict[str, float] = {}
    count = 0
    for batch in batches:
        sampled = sample_fn(batch)
        cos = prior_cosines(sampled, batch["image_embed"], batch["text_embed"])
        for k, v in cos.items():
            sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v)))
        count += int(np.asarray(sampled).shape[0])
    if count == 0:
        raise ValueError("evaluate_prior got no batches.")
    out = {k: v / count for k, v in sums.items()}
    out["margin"] = out["cos_true"] - out["cos_unrelated"]
    out["count"] = count
    return out
