"""Noise schedules: beta sequences and the `Schedule` pytree derived from them.

A `Schedule` holds every per-step constant a sampler or loss needs, as float32 arrays of
length N (the number of steps). Entry i describes the transition from the entry before it
(or from clean data for i = 0) to entry i. `timesteps[i]` is the training-step index the
entry corresponds to: the identity for a schedule built straight from betas, a strided
subset after `respace`. Models are always called with `timesteps[i]`, never with i.

All derived quantities are computed in float64 NumPy and stored as float32, so building a
schedule happens outside `jit`; using one (indexing with `extract`) works anywhere.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
    """Per-step constants of a discrete Gaussian diffusion, each a float32 array [N].

    Fields (acp = alphas_cumprod, the signal fraction of x_i = sqrt(acp) x0 + sqrt(1-acp) eps):
      betas                          noise added by step i: 1 - acp[i] / acp[i-1]
      alphas                         1 - betas, stored separately so that betas near 1 (which
                                     respacing produces) keep their precision in float32
      alphas_cumprod                 acp[i]
      alphas_cumprod_prev            acp[i-1], and 1.0 for i = 0 (clean data)
      log_alphas_cumprod             log(acp): ratios acp[j] / acp[k] = exp(difference) keep
                                     full precision where float32 acp near 1 would not
      sqrt_alphas_cumprod            sqrt(acp)
      sqrt_one_minus_alphas_cumprod  sqrt(1 - acp)
      sqrt_recip_alphas_cumprod      1 / sqrt(acp)
      sqrt_recipm1_alphas_cumprod    sqrt(1 / acp - 1)
      posterior_variance             Var[x_{i-1} | x_i, x0] = beta (1 - acp_prev) / (1 - acp); 0 at i = 0
      posterior_log_variance_clipped its log, with entry 0 replaced by entry 1 (finite everywhere)
      posterior_mean_coef1           weight of x0 in E[x_{i-1} | x_i, x0]
      posterior_mean_coef2           weight of x_i in E[x_{i-1} | x_i, x0]
      timesteps                      int32 [N], training-step index of each entry (model input)
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    log_alphas_cumprod: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    timesteps: jnp.ndarray

    @property
    def num_steps(self) -> int:
        """N, the number of entries (static: read from the array shape)."""
        return self.betas.shape[0]


def cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021), float64 [num_steps].

    acp(u) = cos((u + s) / (1 + s) * pi / 2)^2 for u in [0, 1]; beta_i = 1 - acp((i+1)/N) /
    acp(i/N), capped at `max_beta`. Identical to diffusers' "squaredcos_cap_v2".
    """
    u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def linear_betas(num_steps: int = 1000, start: float | None = None, end: float | None = None) -> np.ndarray:
    """Linearly spaced betas, float64 [num_steps].

    By default ADM's scaled form: from 1e-4 * 1000 / N to 0.02 * 1000 / N, so that any N gives
    the same total noise as the DDPM schedule at N = 1000. Pass `start` / `end` to set them.
    """
    scale = 1000.0 / num_steps
    start = 1e-4 * scale if start is None else start
    end = 0.02 * scale if end is None else end
    return np.linspace(start, end, num_steps, dtype=np.float64)


def make_schedule(betas, timesteps=None) -> Schedule:
    """Build a `Schedule` from betas ([N], any float dtype; computed in float64).

    `timesteps` (int [N]) defaults to arange(N); `respace` passes the original indices.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
    if np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError("betas must lie in (0, 1]; check the schedule or the respacing indices.")
    n = betas.shape[0]
    timesteps = np.arange(n) if timesteps is None else np.asarray(timesteps)
    if timesteps.shape != (n,):
        raise ValueError(f"timesteps must have shape ({n},) to match betas, got {timesteps.shape}.")

    acp = np.cumprod(1.0 - betas)
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    # Entry 0 has zero posterior variance; its log is replaced by entry 1's so it stays finite.
    first = post_var[1] if n > 1 else betas[0]
    post_logvar = np.log(np.concatenate([[first], post_var[1:]]))
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    return Schedule(
        betas=f32(betas),
        alphas=f32(1.0 - betas),
        alphas_cumprod=f32(acp),
        alphas_cumprod_prev=f32(acp_prev),
        log_alphas_cumprod=f32(np.cumsum(np.log1p(-betas))),
        sqrt_alphas_cumprod=f32(np.sqrt(acp)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - acp)),
        sqrt_recip_alphas_cumprod=f32(1.0 / np.sqrt(acp)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / acp - 1.0)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_logvar),
        posterior_mean_coef1=f32(betas * np.sqrt(acp_prev) / (1.0 - acp)),
        posterior_mean_coef2=f32((1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp)),
        timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
    )


def make_schedule_from_alphas_cumprod(alphas_cumprod, timesteps=None) -> Schedule:
    """Build a `Schedule` whose alphas_cumprod are exactly the given ones ([N], decreasing).

    Useful to reproduce another implementation bit for bit: e.g. diffusers accumulates the
    product in float32, which differs from our float64 product by up to ~1e-5 relative.
    """
    acp = np.asarray(alphas_cumprod, dtype=np.float64)
    betas = 1.0 - acp / np.concatenate([[1.0], acp[:-1]])
    return make_schedule(betas, timesteps)


def get_schedule(name: str = "cosine", num_steps: int = 1000, **kwargs) -> Schedule:
    """A named schedule: 'cosine' (kwargs: s, max_beta) or 'linear' (kwargs: start, end)."""
    if name in ("cosine", "squaredcos_cap_v2"):
        return make_schedule(cosine_betas(num_steps, **kwargs))
    if name == "linear":
        return make_schedule(linear_betas(num_steps, **kwargs))
    raise ValueError(f"Unknown beta schedule {name!r}; use 'cosine' or 'linear'.")


def log_alphas_float64(schedule: Schedule) -> np.ndarray:
    """log(1 - beta_i) in float64 [N], accurate for every beta: from the stored betas where they
    are small and from the stored alphas where betas are close to 1. NumPy, not under jit."""
    betas = np.asarray(schedule.betas, dtype=np.float64)
    alphas = np.asarray(schedule.alphas, dtype=np.float64)
    return np.where(betas < 0.5, np.log1p(-betas), np.log(alphas))


def extract_prev(values: jnp.ndarray, idx, ndim: int, first: float) -> jnp.ndarray:
    """Like `extract` but for the entry before idx: values[idx - 1], or `first` where idx == 0
    (e.g. extract_prev(sqrt_one_minus_alphas_cumprod, i, nd, 0.0) = sqrt(1 - acp_prev))."""
    idx = jnp.asarray(idx)
    out = jnp.where(idx > 0, values[jnp.maximum(idx - 1, 0)], first)
    if out.ndim == 1:
        out = out.reshape(out.shape + (1,) * (ndim - 1))
    return out


def extract(values: jnp.ndarray, idx, ndim: int) -> jnp.ndarray:
    """values[idx] shaped to broadcast against an array of rank `ndim` whose axis 0 is batch.

    `idx` is a scalar (result: a scalar) or an int array [B] (result: [B, 1, ..., 1]).
    """
    out = values[idx]
    if out.ndim == 1:
        out = out.reshape(out.shape + (1,) * (ndim - 1))
    return out
