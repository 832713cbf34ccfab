"""Plumbing shared by the sampling loops: per-step noise and model timesteps."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def step_noise_source(num_steps: int, x, rng, noise, needs_noise: bool):
    """Return (xs, draw): `xs` is scanned alongside the steps, `draw(xs_k)` gives step k's noise.

    `noise`, when given, must be [num_steps, *x.shape]; entry k is used at the k-th step taken
    (k = 0 is the noisiest). Otherwise noise is drawn from `rng`, one key per step.
    """
    if noise is not None:
        noise = jnp.asarray(noise)
        if noise.shape != (num_steps,) + tuple(x.shape):
            raise ValueError(
                f"noise must have shape (num_steps, *x.shape) = {(num_steps,) + tuple(x.shape)}, "
                f"got {noise.shape}."
            )
        return noise.astype(x.dtype), lambda z: z
    if not needs_noise:
        return None, lambda z: None
    if rng is None:
        raise ValueError("This sampler adds noise: pass `rng` (a jax.random key) or an explicit `noise` array.")
    keys = jax.random.split(rng, num_steps)
    return keys, lambda key: jax.random.normal(key, x.shape, x.dtype)


def model_timesteps(schedule, i, batch: int):
    """The original training timestep of schedule entry i, as the int32 [B] a model expects."""
    return jnp.full((batch,), schedule.timesteps[i], dtype=jnp.int32)


def reverse_indices(num_steps: int):
    """Schedule indices in sampling order: N-1, ..., 0."""
    return jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
