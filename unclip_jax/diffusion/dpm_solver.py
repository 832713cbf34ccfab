"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep ODE solver in data prediction.

With lambda = log(alpha / sigma) (alpha = sqrt(acp), sigma = sqrt(1 - acp)), a step from s to t
(h = lambda_t - lambda_s > 0) given the x0 estimate D at s is
    first order:  x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) D
    second order: the same with D + (D - D_prev) / (2 r), r = h_prev / h,
where D_prev is the x0 estimate at the previous point and h_prev the previous step's h.
The first step is first order (no history); so is the last, which lands on clean data
(sigma = 0, lambda = inf) and simply returns the final x0 estimate — diffusers'
DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', solver_order=2,
final_sigmas_type='zero') does the same.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ._loop import model_timesteps, reverse_indices
from .clipping import clip_x0
from .process import predict_x0, split_model_output
from .schedules import Schedule


def _alpha_sigma(schedule: Schedule, i, target: bool):
    """(alpha, sigma) at entry i, or at the point entry i jumps to (entry i-1; clean for i = 0)."""
    if not target:
        return schedule.sqrt_alphas_cumprod[i], schedule.sqrt_one_minus_alphas_cumprod[i]
    j = jnp.maximum(i - 1, 0)
    alpha = jnp.where(i > 0, schedule.sqrt_alphas_cumprod[j], 1.0)
    sigma = jnp.where(i > 0, schedule.sqrt_one_minus_alphas_cumprod[j], 0.0)
    return alpha, sigma


def dpm_solver_pp_step(schedule: Schedule, x, x0_pred, x0_pred_prev, i, second_order):
    """One DPM-Solver++(2M) update from entry i to i-1 (clean data after i = 0).

    x: the current sample at entry i [B, ...]; x0_pred: the (clipped) x0 estimate there;
    x0_pred_prev: the estimate at the previous, noisier point (entry i+1), used only when
    `second_order` (a bool, may be traced) is true and i > 0. i: int scalar. Returns x at i-1.
    """
    n = schedule.num_steps
    lam = lambda a, s: jnp.log(a) - jnp.log(s)  # noqa: E731  (inf when s == 0)
    a_s, s_s = _alpha_sigma(schedule, i, target=False)
    a_t, s_t = _alpha_sigma(schedule, i, target=True)
    a_p, s_p = _alpha_sigma(schedule, jnp.minimum(i + 1, n - 1), target=False)
    h = lam(a_t, s_t) - lam(a_s, s_s)
    h_prev = lam(a_s, s_s) - lam(a_p, s_p)
    use2 = jnp.logical_and(jnp.logical_and(second_order, i > 0), i < n - 1)
    c1 = -a_t * jnp.expm1(-h)
    # Second-order correction weight 0.5 * c1 / r; zero (and never evaluated as inf*0) when unused.
    c2 = jnp.where(use2, 0.5 * c1 * h / jnp.where(use2, h_prev, 1.0), 0.0)
    ratio = s_t / s_s
    return ratio * x + c1 * x0_pred + c2 * (x0_pred - x0_pred_prev)


def dpm_solver_pp_sample(
    model_fn,
    schedule: Schedule,
    x_T,
    *,
    prediction_type: str = "epsilon",
    clip: str = "none",
    clip_range: float = 1.0,
    dynamic_percentile: float = 0.995,
):
    """Deterministic DPM-Solver++(2M) sampling over every entry of `schedule` (N model calls).

    Typical use: 10-25 entries, e.g. respace(schedule, space_timesteps(T, 'dpmsolver20')). Prefer
    a grid whose lowest timestep is not 0: on the cosine schedule log-SNR jumps steeply between
    t ~ T/N and t = 0, and a second-order step across that jump overshoots (on Gaussian test
    data, 'linspace20' gives +20% variance where 'dpmsolver20' is within 1%). The last step
    lands on clean data. model_fn(x, t int32 [B] original timesteps) -> output (learned-variance
    channels are ignored). Returns x0 [B, ...].
    """
    n = schedule.num_steps

    def body(carry, xs):
        x, x0_prev = carry
        k, i = xs
        out, _ = split_model_output(model_fn(x, model_timesteps(schedule, i, x.shape[0])), x)
        x0 = clip_x0(predict_x0(schedule, out, x, i, prediction_type), clip, clip_range, dynamic_percentile)
        x_next = dpm_solver_pp_step(schedule, x, x0, x0_prev, i, second_order=k > 0)
        return (x_next.astype(x_T.dtype), x0.astype(x_T.dtype)), None

    xs = (jnp.arange(n, dtype=jnp.int32), reverse_indices(n))
    (x, _), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), xs)
    return x
