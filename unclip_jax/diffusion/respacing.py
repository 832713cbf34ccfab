"""Sampling with fewer steps than training: choosing a subset of timesteps and re-deriving betas.

`space_timesteps` picks the subset; `respace` builds the shorter `Schedule` whose entry i
jumps from the (i-1)-th kept step straight to the i-th (new beta = 1 - acp[t_i] / acp[t_{i-1}],
as ADM's SpacedDiffusion), keeping in `timesteps` the original index the model must be fed.
"""
from __future__ import annotations

import numpy as np

from .schedules import Schedule, log_alphas_float64, make_schedule


def _sections(num_train_steps: int, counts: list[int]) -> list[int]:
    """ADM's section spacing: split [0, T) into len(counts) near-equal parts, take counts[k]
    evenly spaced steps (both ends included) from part k."""
    base, extra = divmod(num_train_steps, len(counts))
    steps, start = [], 0
    for k, count in enumerate(counts):
        size = base + (1 if k < extra else 0)
        if count > size:
            raise ValueError(f"Section {k} has {size} steps; cannot take {count} from it.")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            steps.append(start + round(pos))  # accumulate + Python round, as ADM does
            pos += stride
        start += size
    return steps


def space_timesteps(num_train_steps: int, spec) -> np.ndarray:
    """Original timesteps to keep, sorted ascending, int64 [n].

    `spec` forms:
      "25" or 25, "10,10,5" or [10, 10, 5]   ADM sections (evenly spaced within each section)
      "ddim50"      a constant integer stride s with len(range(0, T, s)) == 50 (ADM); equal to
                    diffusers' DDIMScheduler "leading" spacing when n divides T
      "linspace25"  round(arange(n) * (T-1) / (n-1)): both ends included, which is what
                    diffusers' UnCLIPScheduler.set_timesteps (Karlo) uses
      "dpmsolver20" round(linspace(0, T-1, n+1))[1:]: diffusers' DPMSolverMultistepScheduler
                    grid; its lowest step is ~T/n, not 0, so the solver's last jump (to clean
                    data) is the only large one in log-SNR, and it is first order
    """
    T = int(num_train_steps)
    if isinstance(spec, (int, np.integer)):
        spec = [int(spec)]
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("ddim"):
            n = int(s[4:])
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == n:
                    return np.arange(0, T, stride, dtype=np.int64)
            raise ValueError(f"No integer stride gives exactly {n} steps out of {T}; use e.g. 'linspace{n}'.")
        if s.startswith("dpmsolver"):
            n = int(s[9:])
            if not 1 <= n < T:
                raise ValueError(f"dpmsolver spacing needs 1 <= n < {T}, got {n}.")
            return np.round(np.linspace(0, T - 1, n + 1))[1:].astype(np.int64)
        if s.startswith("linspace"):
            n = int(s[8:])
            if not 1 <= n <= T:
                raise ValueError(f"linspace spacing needs 1 <= n <= {T}, got {n}.")
            if n == 1:
                return np.array([T - 1], dtype=np.int64)
            return np.round(np.arange(n) * ((T - 1) / (n - 1))).astype(np.int64)
        try:
            spec = [int(x) for x in s.split(",")]
        except ValueError:
            raise ValueError(
                f"Cannot parse timestep spacing {spec!r}; use 'N', 'a,b,c', 'ddimN', 'linspaceN' or 'dpmsolverN'."
            ) from None
    steps = np.array(sorted(set(_sections(T, list(spec)))), dtype=np.int64)
    return steps


def respace(schedule: Schedule, use_timesteps) -> Schedule:
    """A shorter schedule visiting only `use_timesteps` (indices into `schedule`, any order).

    Betas are re-derived from the cumulative products so that entry i goes from the previous
    kept step to this one; `timesteps` maps each entry to `schedule.timesteps` of the kept index,
    so respacing composes. Runs in NumPy (not under jit).
    """
    keep = np.unique(np.asarray(use_timesteps, dtype=np.int64))
    n = schedule.num_steps
    if keep.size == 0 or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"use_timesteps must be non-empty indices in [0, {n}), got {np.asarray(use_timesteps)}.")
    # Work with float64 log cumulative products rebuilt from the per-step betas / alphas: ratios
    # of nearby entries keep full precision (differences of float32 alphas_cumprod would not).
    log_acp = np.cumsum(log_alphas_float64(schedule))[keep]
    log_ratio = np.diff(np.concatenate([[0.0], log_acp]))
    new_betas = -np.expm1(log_ratio)
    return make_schedule(new_betas, timesteps=np.asarray(schedule.timesteps)[keep])
