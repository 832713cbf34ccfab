"""Training losses: MSE on the eps / x0 / v target, and the hybrid loss for learned variance.

Hybrid loss (Improved DDPM): L = L_simple + vlb_weight * L_vlb, where L_vlb = sum over all T
steps of the per-step bound term, so a single uniformly drawn step contributes
T * L_t (vlb_weight = 0.001 with T = 1000 gives weight 1, as in ADM). The per-step term is
KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits for t > 0 and the discretized Gaussian
decoder NLL of x0 in bits at t = 0 (images in [-1, 1], 256 levels). It sees the mean channels
through a stop-gradient, so it trains only the variance channels.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from .ddpm import p_mean_variance
from .process import q_posterior_mean_variance, q_sample, split_model_output, training_target
from .schedules import Schedule

_LOG2 = math.log(2.0)


def mean_flat(x):
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales, num_bins: int = 256):
    """Elementwise log-probability (nats) of data x in [-1, 1] quantised to `num_bins` levels.

    Each level's bin has width 2 / (num_bins - 1); the outermost bins extend to -inf / +inf.
    The Gaussian N(means, exp(log_scales)^2) is integrated over the bin with the exact normal
    CDF (ADM uses a tanh approximation of it). Probabilities are floored at 1e-12.
    """
    half = 1.0 / (num_bins - 1)
    inv_std = jnp.exp(-log_scales)
    centered = x - means
    upper = inv_std * (centered + half)
    lower = inv_std * (centered - half)
    log_cdf_upper = jnp.log(jnp.maximum(ndtr(upper), 1e-12))
    log_sf_lower = jnp.log(jnp.maximum(ndtr(-lower), 1e-12))
    # Bin mass; for bins in the right tail use survival functions to avoid cancellation.
    mass = jnp.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_mass = jnp.log(jnp.maximum(mass, 1e-12))
    edge = 1.0 - 0.5 * half
    return jnp.where(x < -edge, log_cdf_upper, jnp.where(x > edge, log_sf_lower, log_mass))


def vlb_terms(schedule: Schedule, model_output, x0, x_t, t, *, prediction_type: str = "epsilon"):
    """Per-example variational-bound term in bits [B] for a learned-range model output.

    model_output: [B, ..., 2C] at (x_t, t), mean channels then variance channels. t: int [B]
    schedule indices. KL to the true posterior for t > 0, decoder NLL of x0 at t == 0.
    """
    true_mean, _, true_logvar = q_posterior_mean_variance(schedule, x0, x_t, t)
    out = p_mean_variance(schedule, model_output, x_t, t, prediction_type=prediction_type,
                          variance_type="learned_range")
    kl = mean_flat(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"])) / _LOG2
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / _LOG2
    return jnp.where(t == 0, nll, kl)


def training_losses(
    model_fn,
    schedule: Schedule,
    x0,
    t,
    noise,
    *,
    prediction_type: str = "epsilon",
    learned_variance: bool = False,
    vlb_weight: float = 0.001,
    weights=None,
):
    """Per-example losses [B] and a dict of terms, for given steps t and noise.

    model_fn(x_t [B, ...], timesteps int32 [B]) -> output [B, ..., C] (or 2C with
    learned_variance). x0, noise: [B, ...]; t: int [B] indices into `schedule` (the model is
    fed schedule.timesteps[t]). weights: optional per-example [B] multiplier on the loss.
    Terms: 'mse' [B], 'vb' [B] (bits, zero without learned variance), 'loss' [B].
    """
    x_t = q_sample(schedule, x0, t, noise)
    out = model_fn(x_t, schedule.timesteps[t])
    mean_out, var_out = split_model_output(out, x_t)
    if learned_variance != (var_out is not None):
        raise ValueError(
            f"learned_variance={learned_variance} but the model output has shape {out.shape} for x of "
            f"shape {x_t.shape}; a learned-variance model outputs 2x channels on the last axis."
        )
    target = training_target(schedule, x0, noise, t, prediction_type)
    mse = mean_flat((target - mean_out) ** 2)
    if learned_variance:
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
        vb = vlb_terms(schedule, frozen, x0, x_t, t, prediction_type=prediction_type)
        loss = mse + vlb_weight * schedule.num_steps * vb
    else:
        vb = jnp.zeros_like(mse)
        loss = mse
    if weights is not None:
        loss = loss * weights
    return loss, {"mse": mse, "vb": vb, "loss": loss}


def diffusion_loss(model_fn, schedule: Schedule, x0, rng, *, weights=None, **kwargs):
    """Mean training loss over a batch with t ~ Uniform{0..N-1} and eps ~ N(0, I) drawn from rng.

    Returns (scalar loss, terms) where terms also holds 't' [B]; kwargs go to `training_losses`.
    """
    t_key, n_key = jax.random.split(rng)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_steps)
    noise = jax.random.normal(n_key, x0.shape, x0.dtype)
    loss, terms = training_losses(model_fn, schedule, x0, t, noise, weights=weights, **kwargs)
    return jnp.mean(loss), dict(terms, t=t)
