"""Ancestral (DDPM) sampling over a schedule, possibly respaced: p(x_{i-1} | x_i) step and loop.

Variance types for the reverse Gaussian:
  'fixed_small'   the true posterior variance (log clipped at entry 0), ADM / DDPM sigma^2 = beta~
  'fixed_large'   the betas, entry 0 replaced by posterior_variance[1] (ADM)
  'learned_range' the model's extra C channels hold v in [-1, 1]; the log variance is
                  (v+1)/2 * log(beta) + (1-v)/2 * clipped log posterior variance (Improved DDPM)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ._loop import model_timesteps, reverse_indices, step_noise_source
from .clipping import clip_x0
from .process import predict_x0, q_posterior_mean_variance, split_model_output
from .schedules import Schedule, extract

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


def model_log_variance(schedule: Schedule, i, x_t, variance_type: str, var_values=None):
    """Log variance of p(x_{i-1} | x_i), broadcastable to x_t.

    `var_values` (the model's variance channels, [-1, 1], shape of x_t) is required for
    'learned_range' and ignored otherwise.
    """
    nd = x_t.ndim
    if variance_type == "fixed_small":
        return extract(schedule.posterior_log_variance_clipped, i, nd)
    if variance_type == "fixed_large":
        n = schedule.num_steps
        first = schedule.posterior_variance[min(1, n - 1)]
        large = jnp.where(jnp.arange(n) == 0, first, schedule.betas)
        return extract(jnp.log(large), i, nd)
    if variance_type == "learned_range":
        if var_values is None:
            raise ValueError(
                "variance_type='learned_range' needs a model output with 2x channels on the last axis."
            )
        min_log = extract(schedule.posterior_log_variance_clipped, i, nd)
        max_log = extract(jnp.log(schedule.betas), i, nd)
        frac = (var_values + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}.")


def p_mean_variance(
    schedule: Schedule,
    model_output,
    x_t,
    i,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip: str = "none",
    clip_range: float = 1.0,
    dynamic_percentile: float = 0.995,
):
    """Mean and log variance of the model's reverse step p(x_{i-1} | x_i).

    model_output: [B, ..., C] (or [B, ..., 2C] with learned-variance channels last) at entry i.
    Returns a dict: 'mean' [B, ...], 'log_variance' (broadcastable to x_t), 'pred_x0' (clipped).
    """
    mean_out, var_out = split_model_output(model_output, x_t)
    x0 = predict_x0(schedule, mean_out, x_t, i, prediction_type)
    x0 = clip_x0(x0, clip, clip_range, dynamic_percentile)
    mean, _, _ = q_posterior_mean_variance(schedule, x0, x_t, i)
    log_var = model_log_variance(schedule, i, x_t, variance_type, var_out)
    return {"mean": mean, "log_variance": log_var, "pred_x0": x0}


def ddpm_step(
    schedule: Schedule,
    model_output,
    x_t,
    i,
    noise,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip: str = "none",
    clip_range: float = 1.0,
    dynamic_percentile: float = 0.995,
):
    """One ancestral step from entry i to i-1: returns (x_prev, pred_x0).

    i: schedule index (int scalar or [B]); noise: standard normal, shape of x_t. No noise is
    added at i = 0, whose output is the final sample.
    """
    out = p_mean_variance(
        schedule, model_output, x_t, i, prediction_type=prediction_type, variance_type=variance_type,
        clip=clip, clip_range=clip_range, dynamic_percentile=dynamic_percentile,
    )
    std = jnp.exp(0.5 * out["log_variance"])
    nonzero = extract((jnp.arange(schedule.num_steps) > 0).astype(x_t.dtype), i, x_t.ndim)
    return out["mean"] + nonzero * std * noise, out["pred_x0"]


def ddpm_sample(
    model_fn,
    schedule: Schedule,
    x_T,
    rng=None,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip: str = "none",
    clip_range: float = 1.0,
    dynamic_percentile: float = 0.995,
    noise=None,
):
    """Ancestral sampling through every entry of `schedule` (N model calls, one `lax.scan`).

    model_fn(x [B, ...], t int32 [B] original timesteps) -> model output.
    x_T: the starting noise [B, ...]. noise: optional [N, B, ...] used instead of drawing from
    rng (entry k at the k-th step; the last entry is unused). Returns the final sample x0.
    """
    n = schedule.num_steps
    src, draw = step_noise_source(n, x_T, rng, noise, needs_noise=True)

    def body(x, xs):
        i, z = xs
        out = model_fn(x, model_timesteps(schedule, i, x.shape[0]))
        x, _ = ddpm_step(
            schedule, out, x, i, draw(z), prediction_type=prediction_type, variance_type=variance_type,
            clip=clip, clip_range=clip_range, dynamic_percentile=dynamic_percentile,
        )
        return x.astype(x_T.dtype), None

    x, _ = jax.lax.scan(body, x_T, (reverse_indices(n), src))
    return x
