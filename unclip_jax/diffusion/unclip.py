"""The Karlo / diffusers `UnCLIPScheduler` step, reproduced on a full (un-respaced) schedule.

Instead of a respaced schedule, each step names its current training timestep t and the one
it jumps to, prev_t (-1 after the last step, meaning clean data with acp = 1):
    acp_prev = acp[prev_t] (1 if prev_t < 0),  beta = 1 - acp[t] / acp_prev
    (beta = betas[t] when prev_t == t - 1), alpha = 1 - beta.
The mean is the DDPM posterior mean for the (optionally clipped) x0 estimate. Noise is added
only when t > 0, with std
    'fixed_small_log': sqrt(max(beta (1 - acp_prev) / (1 - acp[t]), 1e-20))
    'learned_range':   exp(0.5 * ((v+1)/2 log(beta) + (1-v)/2 log(posterior variance)))
where v is the model's variance channels (the last C of 2C output channels).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ._loop import step_noise_source
from .clipping import clip_x0
from .process import predict_x0, split_model_output
from .schedules import Schedule, extract

UNCLIP_VARIANCE_TYPES = ("fixed_small_log", "learned_range")


def unclip_step(
    schedule: Schedule,
    model_output,
    x_t,
    t,
    prev_t,
    noise,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small_log",
    clip: str = "none",
    clip_range: float = 1.0,
    dynamic_percentile: float = 0.995,
):
    """One unCLIP step from timestep t to prev_t: returns (x_prev, pred_x0).

    schedule: the full training schedule (indexed by original timesteps).
    t, prev_t: int scalars or [B]; prev_t = -1 at the last step.
    model_output: [B, ..., C], or [B, ..., 2C] with variance channels last.
    noise: standard normal, shape of x_t (unused when t == 0).
    diffusers' clip_sample=True / clip_sample_range=r corresponds to clip='static', clip_range=r.
    """
    if variance_type not in UNCLIP_VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {UNCLIP_VARIANCE_TYPES}, got {variance_type!r}.")
    nd = x_t.ndim
    mean_out, var_out = split_model_output(model_output, x_t)
    t = jnp.asarray(t, jnp.int32)
    prev_t = jnp.asarray(prev_t, jnp.int32)

    # Every difference of nearby cumulative products is taken in log space or from the stored
    # sqrt(1 - acp), so nothing cancels in float32 (1 - acp_t / acp_prev at small t would).
    has_prev = _broadcast_mask(prev_t >= 0, nd)
    safe_prev = jnp.maximum(prev_t, 0)
    acp_prev = jnp.where(has_prev, extract(schedule.alphas_cumprod, safe_prev, nd), 1.0)
    log_ratio = extract(schedule.log_alphas_cumprod, t, nd) - jnp.where(
        has_prev, extract(schedule.log_alphas_cumprod, safe_prev, nd), 0.0)
    one_step = _broadcast_mask(prev_t == t - 1, nd)
    beta = jnp.where(one_step, extract(schedule.betas, t, nd), -jnp.expm1(log_ratio))
    alpha = jnp.where(one_step, extract(schedule.alphas, t, nd), jnp.exp(log_ratio))
    beta_prod_t = extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) ** 2
    beta_prod_prev = jnp.where(has_prev, extract(schedule.sqrt_one_minus_alphas_cumprod, safe_prev, nd) ** 2, 0.0)

    if prediction_type == "epsilon":
        x0 = (x_t - extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * mean_out) / extract(
            schedule.sqrt_alphas_cumprod, t, nd)
    else:
        x0 = predict_x0(schedule, mean_out, x_t, t, prediction_type)
    x0 = clip_x0(x0, clip, clip_range, dynamic_percentile)

    mean = (jnp.sqrt(acp_prev) * beta / beta_prod_t) * x0 + (jnp.sqrt(alpha) * beta_prod_prev / beta_prod_t) * x_t

    post_var = beta_prod_prev / beta_prod_t * beta
    if variance_type == "fixed_small_log":
        std = jnp.sqrt(jnp.maximum(post_var, 1e-20))
    else:
        if var_out is None:
            raise ValueError("variance_type='learned_range' needs a model output with 2x channels on the last axis.")
        frac = (var_out + 1.0) / 2.0
        log_var = frac * jnp.log(beta) + (1.0 - frac) * jnp.log(post_var)
        std = jnp.exp(0.5 * log_var)
    add_noise = _broadcast_mask(t > 0, nd)
    x_prev = mean + jnp.where(add_noise, std * noise, 0.0)
    return x_prev, x0


def _broadcast_mask(mask, ndim: int):
    """A boolean scalar or [B] mask shaped to broadcast against a rank-`ndim` array."""
    mask = jnp.asarray(mask)
    if mask.ndim == 1:
        mask = mask.reshape(mask.shape + (1,) * (ndim - 1))
    return mask


def unclip_sample(
    model_fn,
    schedule: Schedule,
    x_T,
    timesteps,
    rng=None,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small_log",
    clip: str = "none",
    clip_range: float = 1.0,
    dynamic_percentile: float = 0.995,
    noise=None,
):
    """The unCLIP sampling loop (as diffusers' UnCLIPPipeline drives UnCLIPScheduler).

    timesteps: int [n], DESCENDING original timesteps to visit, e.g.
      space_timesteps(1000, 'linspace25')[::-1]; step k goes from timesteps[k] to
      timesteps[k+1], and the last step to prev_t = -1.
    schedule: the full training schedule. model_fn(x, t int32 [B]) -> output.
    noise: optional [n, B, ...] replacing draws from rng (entry k used at step k if its t > 0).
    Returns the final sample.
    """
    timesteps = jnp.asarray(timesteps, jnp.int32)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D array of descending timesteps, got shape {timesteps.shape}.")
    n = timesteps.shape[0]
    prev = jnp.concatenate([timesteps[1:], jnp.array([-1], jnp.int32)])
    src, draw = step_noise_source(n, x_T, rng, noise, needs_noise=True)

    def body(x, xs):
        t, p, z = xs
        out = model_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
        x, _ = unclip_step(
            schedule, out, x, t, p, draw(z), prediction_type=prediction_type, variance_type=variance_type,
            clip=clip, clip_range=clip_range, dynamic_percentile=dynamic_percentile,
        )
        return x.astype(x_T.dtype), None

    x, _ = jax.lax.scan(body, x_T, (timesteps, prev, src))
    return x
