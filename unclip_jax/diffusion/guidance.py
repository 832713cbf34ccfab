"""Classifier-free guidance (Ho & Salimans 2022) on model outputs."""
from __future__ import annotations

import jax.numpy as jnp


def _scale_like(scale, x):
    """A scalar scale as is; a per-example scale [B] shaped to broadcast against x [B, ...]."""
    scale = jnp.asarray(scale, dtype=x.dtype)
    if scale.ndim == 1:
        scale = scale.reshape(scale.shape + (1,) * (x.ndim - 1))
    return scale


def cfg(cond_out, uncond_out, scale, *, learned_variance: bool = False):
    """Guided output uncond + scale * (cond - uncond), computed as cond + (scale - 1) * (cond -
    uncond) so that scale 1 returns cond exactly.

    cond_out, uncond_out: model outputs [B, ..., C'] for the same x and t. scale: scalar or [B].
    learned_variance: the outputs carry 2C channels on the last axis (mean, then variance);
    guidance then mixes only the first C and the result keeps cond's variance channels, as
    GLIDE and diffusers' unCLIP decoder do.
    """
    if cond_out.shape != uncond_out.shape:
        raise ValueError(f"cond and uncond outputs differ in shape: {cond_out.shape} vs {uncond_out.shape}.")
    s = _scale_like(scale, cond_out)
    if not learned_variance:
        return cond_out + (s - 1) * (cond_out - uncond_out)
    c = cond_out.shape[-1]
    if c % 2:
        raise ValueError(f"learned_variance=True needs an even channel count on the last axis, got {c}.")
    c //= 2
    mean = cond_out[..., :c] + (s - 1) * (cond_out[..., :c] - uncond_out[..., :c])
    return jnp.concatenate([mean, cond_out[..., c:]], axis=-1)


def guided_model_fn(model_fn_cond_uncond, scale, *, learned_variance: bool | None = None):
    """Wrap a doubled-batch model into a guided model_fn(x, t).

    model_fn_cond_uncond(x2 [2B, ...], t2 int32 [2B]) must treat rows [:B] as CONDITIONAL and
    rows [B:] as UNCONDITIONAL (e.g. by concatenating [cond, null] conditioning) and return
    [2B, ...] outputs. The returned model_fn(x, t) runs it once on [x, x], [t, t] and applies
    `cfg`. learned_variance=None infers it from shapes (output has 2x the channels of x).
    """

    def model_fn(x, t):
        b = x.shape[0]
        out = model_fn_cond_uncond(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0))
        lv = learned_variance
        if lv is None:
            lv = out.shape[-1] == 2 * x.shape[-1] and out.shape[1:-1] == x.shape[1:-1]
        return cfg(out[:b], out[b:], scale, learned_variance=lv)

    return model_fn
