"""Clipping of predicted x0, applied by every sampler wherever it forms an x0 estimate."""
from __future__ import annotations

import jax.numpy as jnp

CLIP_MODES = ("none", "static", "dynamic")


def clip_x0(x0, mode: str = "none", clip_range: float = 1.0, dynamic_percentile: float = 0.995):
    """Clip a predicted x0 [B, ...].

    mode:
      'none'     returned unchanged.
      'static'   clamp to [-clip_range, clip_range].
      'dynamic'  Imagen's dynamic thresholding, per sample: s = the `dynamic_percentile`
                 quantile of |x0| over all non-batch entries (linear interpolation), raised to
                 at least clip_range; x0 is clamped to [-s, s] and rescaled by clip_range / s, so
                 the output lies in [-clip_range, clip_range]. With s <= clip_range this is
                 the same as 'static'. (diffusers' `thresholding` with sample_max_value = inf
                 and clip_range = 1.)
    """
    if mode == "none":
        return x0
    if mode == "static":
        return jnp.clip(x0, -clip_range, clip_range)
    if mode == "dynamic":
        flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
        s = jnp.quantile(flat, dynamic_percentile, axis=1)
        s = jnp.maximum(s, clip_range).reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
        return jnp.clip(x0, -s, s) * (clip_range / s)
    raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}.")
