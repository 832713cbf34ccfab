"""The forward (noising) process and the conversions between model parametrisations.

Conventions used by every function here:
  - `schedule` is a `Schedule`; `t` is an index into it: an int scalar or an int array [B]
    (for an un-respaced schedule the index is the training timestep).
  - x0, x_t, eps, v are arrays [B, ...] of any rank, channels last (NHWC images, [B, D]
    embeddings); per-step constants broadcast over all non-batch axes.
  - x_t = sqrt(acp) * x0 + sqrt(1 - acp) * eps, and v = sqrt(acp) * eps - sqrt(1 - acp) * x0.
  - prediction_type names what the model outputs: 'epsilon' (the noise), 'sample' (x0) or
    'v_prediction' (v), as in diffusers.
"""
from __future__ import annotations

from .schedules import Schedule, extract

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")


def q_sample(schedule: Schedule, x0, t, noise):
    """Draw x_t ~ q(x_t | x0) with the given standard-normal `noise` (same shape as x0)."""
    a = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return a * x0 + s * noise


def q_posterior_mean_variance(schedule: Schedule, x0, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0).

    The variance terms are broadcastable to x_t (shape [B, 1, ...] or scalar), not expanded.
    """
    mean = extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0 + extract(
        schedule.posterior_mean_coef2, t, x_t.ndim
    ) * x_t
    var = extract(schedule.posterior_variance, t, x_t.ndim)
    logvar = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
    return mean, var, logvar


def x0_from_eps(schedule: Schedule, x_t, t, eps):
    """x0 = (x_t - sqrt(1 - acp) eps) / sqrt(acp)."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )


def eps_from_x0(schedule: Schedule, x_t, t, x0):
    """eps = (x_t - sqrt(acp) x0) / sqrt(1 - acp)."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
    )


def v_from_x0_eps(schedule: Schedule, x0, eps, t):
    """v = sqrt(acp) eps - sqrt(1 - acp) x0 (the v-prediction target)."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
    )


def x0_from_v(schedule: Schedule, x_t, t, v):
    """x0 = sqrt(acp) x_t - sqrt(1 - acp) v."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
    )


def eps_from_v(schedule: Schedule, x_t, t, v):
    """eps = sqrt(acp) v + sqrt(1 - acp) x_t."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * v
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
    )


def predict_x0(schedule: Schedule, model_output, x_t, t, prediction_type: str = "epsilon"):
    """The model's estimate of x0 from its (mean-channel) output, before any clipping."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x0_from_eps(schedule, x_t, t, model_output)
    if prediction_type == "sample":
        return model_output
    return x0_from_v(schedule, x_t, t, model_output)


def predict_eps(schedule: Schedule, model_output, x_t, t, prediction_type: str = "epsilon"):
    """The model's estimate of the noise eps from its (mean-channel) output."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return eps_from_x0(schedule, x_t, t, model_output)
    return eps_from_v(schedule, x_t, t, model_output)


def training_target(schedule: Schedule, x0, noise, t, prediction_type: str = "epsilon"):
    """What a model of the given prediction_type should output for (x0, noise, t)."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return v_from_x0_eps(schedule, x0, noise, t)


def split_model_output(model_output, x):
    """Split a learned-variance output into (mean part, variance part).

    A model with learned variance outputs 2C channels on the LAST axis for a C-channel x: the
    first C are the mean prediction, the last C the variance interpolation value in [-1, 1].
    Returns (model_output, None) when the output has the same shape as x.
    """
    if model_output.shape == x.shape:
        return model_output, None
    c = x.shape[-1]
    if model_output.shape[:-1] == x.shape[:-1] and model_output.shape[-1] == 2 * c:
        return model_output[..., :c], model_output[..., c:]
    raise ValueError(
        f"Model output shape {model_output.shape} fits neither x {x.shape} nor a learned-variance "
        f"output with 2x channels on the last axis {x.shape[:-1] + (2 * c,)}."
    )
