"""DDIM (Song et al. 2021): sampling with any eta, and deterministic inversion x0 -> x_T.

A DDIM step from entry i to i-1 (acp = alphas_cumprod[i], acp' = alphas_cumprod_prev[i]):
    x0^ = clip(model's x0 estimate),  eps^ = noise estimate
    sigma = eta * sqrt((1 - acp') / (1 - acp) * (1 - acp / acp'))
    x_{i-1} = sqrt(acp') x0^ + sqrt(1 - acp' - sigma^2) eps^ + sigma z
eta = 0 is the deterministic probability-flow sampler, eta = 1 matches DDPM's 'fixed_small'.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ._loop import model_timesteps, reverse_indices, step_noise_source
from .clipping import clip_x0
from .process import eps_from_x0, predict_eps, predict_x0, split_model_output
from .schedules import Schedule, extract, extract_prev


def _estimates(schedule, model_output, x, i, prediction_type, clip, clip_range, dynamic_percentile,
               eps_from_clipped_x0):
    """(clipped x0 estimate, matching eps estimate) for the model output at (x, entry i)."""
    mean_out, _ = split_model_output(model_output, x)
    x0 = clip_x0(predict_x0(schedule, mean_out, x, i, prediction_type), clip, clip_range, dynamic_percentile)
    if eps_from_clipped_x0:
        eps = eps_from_x0(schedule, x, i, x0)
    else:
        eps = predict_eps(schedule, mean_out, x, i, prediction_type)
    return x0, eps


def ddim_step(
    schedule: Schedule,
    model_output,
    x_t,
    i,
    noise=None,
    *,
    eta=0.0,
    prediction_type: str = "epsilon",
    clip: str = "none",
    clip_range: float = 1.0,
    dynamic_percentile: float = 0.995,
    eps_from_clipped_x0: bool = True,
):
    """One DDIM step from entry i to i-1 (clean data after i = 0): returns (x_prev, pred_x0).

    model_output: the model at (x_t, timesteps[i]); learned-variance channels, if any, are ignored.
    noise: standard normal like x_t, needed only when eta > 0.
    eps_from_clipped_x0: re-derive eps from the clipped x0 (ADM); False keeps the model's own
    eps estimate (diffusers' default, use_clipped_model_output=False). Same when not clipping.
    """
    x0, eps = _estimates(schedule, model_output, x_t, i, prediction_type, clip, clip_range,
                         dynamic_percentile, eps_from_clipped_x0)
    nd = x_t.ndim
    # 1 - acp and 1 - acp / acp_prev come from float64-derived fields, not float32 cancellation.
    one_minus = extract(schedule.sqrt_one_minus_alphas_cumprod, i, nd) ** 2
    one_minus_prev = extract_prev(schedule.sqrt_one_minus_alphas_cumprod, i, nd, 0.0) ** 2
    sigma = eta * jnp.sqrt(one_minus_prev / one_minus * extract(schedule.betas, i, nd))
    sqrt_acp_prev = extract_prev(schedule.sqrt_alphas_cumprod, i, nd, 1.0)
    x_prev = sqrt_acp_prev * x0 + jnp.sqrt(jnp.maximum(one_minus_prev - sigma**2, 0.0)) * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddim_sample(
    model_fn,
    schedule: Schedule,
    x_T,
    rng=None,
    *,
    eta=0.0,
    prediction_type: str = "epsilon",
    clip: str = "none",
    clip_range: float = 1.0,
    dynamic_percentile: float = 0.995,
    eps_from_clipped_x0: bool = True,
    noise=None,
):
    """DDIM sampling through every entry of `schedule` (one `lax.scan`), returning x0.

    x_T [B, ...] is the start (e.g. from `ddim_invert`). rng or noise ([N, B, ...]) is needed
    only when eta is not a Python 0. model_fn(x, t int32 [B] original timesteps) -> output.
    """
    n = schedule.num_steps
    needs_noise = not (isinstance(eta, (int, float)) and eta == 0)
    src, draw = step_noise_source(n, x_T, rng, noise, needs_noise=needs_noise)

    def body(x, xs):
        i, z = xs
        out = model_fn(x, model_timesteps(schedule, i, x.shape[0]))
        x, _ = ddim_step(
            schedule, out, x, i, draw(z), eta=eta, prediction_type=prediction_type, clip=clip,
            clip_range=clip_range, dynamic_percentile=dynamic_percentile,
            eps_from_clipped_x0=eps_from_clipped_x0,
        )
        return x.astype(x_T.dtype), None

    x, _ = jax.lax.scan(body, x_T, (reverse_indices(n), src))
    return x


def ddim_invert_step(
    schedule: Schedule,
    model_output,
    x,
    k,
    *,
    prediction_type: str = "epsilon",
    clip: str = "none",
    clip_range: float = 1.0,
    dynamic_percentile: float = 0.995,
    eps_from_clipped_x0: bool = True,
):
    """Undo the DDIM (eta = 0) step into entry k: map x at entry k-1 (clean data when k = 0) to entry k.

    model_output: the model at the CURRENT point, (x, timesteps[max(k-1, 0)]); the clean input
    of the first step is given the lowest timestep. The step reuses that eps estimate for the
    jump (standard DDIM inversion; exact in the limit of small steps). k: int scalar.
    """
    j = jnp.maximum(k - 1, 0)
    x0, eps = _estimates(schedule, model_output, x, j, prediction_type, clip, clip_range,
                         dynamic_percentile, eps_from_clipped_x0)
    # From clean data the current point is x0 itself; eps is the model's estimate there.
    mean_out, _ = split_model_output(model_output, x)
    first = k == 0
    x0 = jnp.where(first, x, x0)
    eps = jnp.where(first, predict_eps(schedule, mean_out, x, j, prediction_type), eps)
    nd = x.ndim
    return (extract(schedule.sqrt_alphas_cumprod, k, nd) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, k, nd) * eps)


def ddim_invert(
    model_fn,
    schedule: Schedule,
    x0,
    *,
    prediction_type: str = "epsilon",
    clip: str = "none",
    clip_range: float = 1.0,
    dynamic_percentile: float = 0.995,
    eps_from_clipped_x0: bool = True,
    refine_iters: int = 0,
):
    """Deterministic DDIM inversion: clean x0 [B, ...] -> latent at the last schedule entry.

    Each step k is the standard DDIM inversion step (`ddim_invert_step`), whose error is first
    order in the step size. refine_iters > 0 then solves the sampler's step equation for x_k by
    fixed-point iteration, re-evaluating the model at the current guess (x_k, timesteps[k])
    each time (refine_iters extra model calls per step); `ddim_sample(..., eta=0)` with the same
    settings then maps the result back to x0 up to the iteration's convergence.
    Use a schedule whose first timestep is 0 (e.g. 'ddimN' or 'linspaceN' spacing). Clipping
    is off by default: it would make the map non-invertible.
    """
    n = schedule.num_steps
    kw = dict(prediction_type=prediction_type, clip=clip, clip_range=clip_range,
              dynamic_percentile=dynamic_percentile, eps_from_clipped_x0=eps_from_clipped_x0)

    def body(x, k):
        j = jnp.maximum(k - 1, 0)
        out = model_fn(x, model_timesteps(schedule, j, x.shape[0]))
        x_next = ddim_invert_step(schedule, out, x, k, **kw)
        if refine_iters:
            nd = x.ndim
            # The eta = 0 sampler maps x_k to sqrt(acp') x0^ + sqrt(1 - acp') eps^ = x (the current
            # point); given eps^ at the guess, x0^ follows from that equation, and x_k from both.
            a_prev = extract_prev(schedule.sqrt_alphas_cumprod, k, nd, 1.0)
            s_prev = extract_prev(schedule.sqrt_one_minus_alphas_cumprod, k, nd, 0.0)
            a_k = extract(schedule.sqrt_alphas_cumprod, k, nd)
            s_k = extract(schedule.sqrt_one_minus_alphas_cumprod, k, nd)

            def refine(_, guess):
                out = model_fn(guess, model_timesteps(schedule, k, x.shape[0]))
                _, eps = _estimates(schedule, out, guess, k, prediction_type, clip, clip_range,
                                    dynamic_percentile, eps_from_clipped_x0)
                return a_k * (x - s_prev * eps) / a_prev + s_k * eps

            x_next = jax.lax.fori_loop(0, refine_iters, refine, x_next)
        return x_next.astype(x0.dtype), None

    x, _ = jax.lax.scan(body, x0, jnp.arange(n, dtype=jnp.int32))
    return x
