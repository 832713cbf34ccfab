"""One sampling entry point: a sampler's settings (:class:`SamplerSpec`) and :func:`sample`.

    spec = SamplerSpec(sampler="ddim", steps=50, prediction_type="sample")
    x0 = sample(model_fn, spec, x_T, rng)          # one lax.scan; spec may be a jit static arg

Samplers (one spelling each, :data:`SAMPLERS`):
  'unclip'  diffusers' UnCLIPScheduler step on the FULL training schedule over 'linspace{steps}'
            timesteps (Karlo); ``variance`` 'fixed_small_log' | 'learned_range'
  'ddpm'    ancestral sampling over the respaced schedule; variance 'learned_range' when the
            model has learned variance (``learned_variance``), else 'fixed_small'
  'ddim'    DDIM over the respaced schedule (``eta``; eta = 0 draws no noise)
  'dpm++'   DPM-Solver++(2M) over the respaced 'dpmsolver{steps}' grid, deterministic
The respaced samplers default to ADM sections of ``steps``; ``spacing`` names another grid (see
:func:`unclip_jax.diffusion.space_timesteps`). ``start_t`` restricts the grid to [0, start_t]
(sampling then starts from data noised to the grid's top step). ``clip_range`` clips every x0
estimate to [-clip_range, clip_range] (None: no clipping). ``float32_cumprod`` builds the
cosine schedule's alphas_cumprod as torch does (float32 betas and running product), for
parity with diffusers.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.errors import UserError

from .ddim import ddim_sample
from .ddpm import ddpm_sample
from .dpm_solver import dpm_solver_pp_sample
from .process import PREDICTION_TYPES
from .respacing import respace, space_timesteps
from .schedules import Schedule, cosine_betas, get_schedule, make_schedule_from_alphas_cumprod
from .unclip import UNCLIP_VARIANCE_TYPES, unclip_sample

SAMPLERS = ("unclip", "ddpm", "ddim", "dpm++")
SCHEDULES = ("cosine", "linear")


class SamplerSpecError(UserError, ValueError):
    """Sampler settings that cannot run; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How to sample (frozen, hashable: usable as a ``jax.jit`` static argument)."""
    sampler: str = "unclip"
    steps: int = 25
    eta: float = 0.0                      # 'ddim' only
    clip_range: float | None = None       # clip x0 estimates to +-clip_range; None: no clipping
    variance: str = "fixed_small_log"     # 'unclip' only: 'fixed_small_log' | 'learned_range'
    prediction_type: str = "epsilon"      # the model's output: 'epsilon' | 'sample' | 'v_prediction'
    schedule: str = "cosine"              # the training noise schedule
    num_train_steps: int = 1000
    float32_cumprod: bool = False         # torch's float32 alphas_cumprod (cosine only)
    start_t: int | None = None            # top of the grid; None: num_train_steps - 1
    spacing: str | None = None            # None: the sampler's default grid of `steps`
    learned_variance: bool = False        # 'ddpm': the model's output carries variance channels

    def __post_init__(self):
        def fix(name, kind):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, kind(value))
        for name in ("steps", "num_train_steps", "start_t"):
            fix(name, int)
        for name in ("eta", "clip_range"):
            fix(name, float)
        for name in ("float32_cumprod", "learned_variance"):
            fix(name, bool)
        self._check()

    def _check(self) -> None:
        n = self.num_train_steps
        if self.sampler not in SAMPLERS:
            raise SamplerSpecError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}.")
        if not 1 <= self.steps <= n:
            raise SamplerSpecError(f"steps must be in [1, {n}], got {self.steps}.")
        if self.variance not in UNCLIP_VARIANCE_TYPES:
            raise SamplerSpecError(f"variance must be one of {UNCLIP_VARIANCE_TYPES}, got "
                                   f"{self.variance!r}.")
        if self.prediction_type not in PREDICTION_TYPES:
            raise SamplerSpecError(f"prediction_type must be one of {PREDICTION_TYPES} (what the "
                                   f"model was trained to predict), got {self.prediction_type!r}.")
        if self.schedule not in SCHEDULES:
            raise SamplerSpecError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.clip_range is not None and not self.clip_range > 0:
            raise SamplerSpecError(f"clip_range must be positive or None (no clipping), got "
                                   f"{self.clip_range}.")
        if not self.eta >= 0:
            raise SamplerSpecError(f"eta must be >= 0 (0: deterministic DDIM), got {self.eta}.")
        if self.start_t is not None:
            lo = max(1, self.steps - 1)
            if not lo <= self.start_t <= n - 1:
                raise SamplerSpecError(f"start_t must be in [{lo}, {n - 1}] (at least one timestep "
                                       f"per sampling step), got {self.start_t}; None starts from "
                                       "pure noise.")
        try:
            self.timesteps()
        except ValueError as e:
            raise SamplerSpecError(f"{self.sampler} cannot take {self.steps} steps on the grid "
                                   f"{self.grid!r} ({e}); change steps, spacing or "
                                   "start_t.") from None

    @property
    def grid(self) -> str:
        """The timestep spacing visited (see :func:`unclip_jax.diffusion.space_timesteps`)."""
        if self.spacing is not None:
            return self.spacing
        return {"unclip": f"linspace{self.steps}",
                "dpm++": f"dpmsolver{self.steps}"}.get(self.sampler, str(self.steps))

    def timesteps(self) -> np.ndarray:
        """The visited original timesteps, ascending (within [0, start_t] when it is set)."""
        n = self.num_train_steps if self.start_t is None else self.start_t + 1
        return np.asarray(space_timesteps(n, self.grid))

    def full_schedule(self) -> Schedule:
        """The full training schedule (float64-built; or torch's float32 cumprod)."""
        n = self.num_train_steps
        if self.schedule == "cosine" and self.float32_cumprod:
            # diffusers' UnCLIPScheduler: float32 betas, float32 alphas and running product. Its
            # one-step updates (prev_t = t - 1, e.g. the last step t = 0 -> clean data) use those
            # float32 betas / alphas directly, so they are kept too: betas[0] / (1 - acp[0]) is
            # 1 + ~1e-3 there, not 1, and exact parity needs the same rounding.
            betas = cosine_betas(n).astype(np.float32)
            alphas = (np.float32(1.0) - betas).astype(np.float32)
            acp = np.cumprod(alphas, dtype=np.float32)
            full = make_schedule_from_alphas_cumprod(acp.astype(np.float64))
            return full._replace(betas=jnp.asarray(betas), alphas=jnp.asarray(alphas))
        return get_schedule(self.schedule, n)

    def sampling_schedule(self) -> Schedule:
        """What the sampler steps through: the full schedule for 'unclip', else the respaced one."""
        full = self.full_schedule()
        return full if self.sampler == "unclip" else respace(full, self.timesteps())


def sample(model_fn, spec: SamplerSpec, x_T, rng=None, noise=None):
    """Run ``spec``'s sampler from x_T [B, ...] (one ``lax.scan``); returns x0.

    model_fn(x [B, ...], t int32 [B] original timesteps) -> model output. ``rng`` draws the
    per-step noise of the stochastic samplers ('unclip', 'ddpm', 'ddim' with eta > 0), or
    ``noise`` [steps, B, ...] gives it. The schedule and grid are NumPy constants, built at trace
    time."""
    with jax.ensure_compile_time_eval():
        full = spec.full_schedule()
        grid = spec.timesteps()
        schedule = full if spec.sampler == "unclip" else respace(full, grid)
    clip = dict(clip="none" if spec.clip_range is None else "static",
                clip_range=1.0 if spec.clip_range is None else spec.clip_range)
    pred = spec.prediction_type
    if spec.sampler == "unclip":
        return unclip_sample(model_fn, full, x_T, grid[::-1].copy(), rng, prediction_type=pred,
                             variance_type=spec.variance, noise=noise, **clip)
    if spec.sampler == "ddpm":
        var = "learned_range" if spec.learned_variance else "fixed_small"
        return ddpm_sample(model_fn, schedule, x_T, rng, prediction_type=pred, variance_type=var,
                           noise=noise, **clip)
    if spec.sampler == "ddim":
        eta = spec.eta
        return ddim_sample(model_fn, schedule, x_T, rng if eta else None, eta=eta,
                           prediction_type=pred, noise=noise if eta else None, **clip)
    return dpm_solver_pp_sample(model_fn, schedule, x_T, prediction_type=pred, **clip)


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerSpec))


def spec_from_settings(settings, **fixed) -> SamplerSpec:
    """The SamplerSpec of a flat settings mapping (a pipeline stage's, a training config's):
    its keys that name spec fields, with ``fixed`` on top; other keys (guidance_scale, best_of,
    ...) are left to the caller."""
    kw = {k: v for k, v in dict(settings).items() if k in SPEC_FIELDS}
    kw.update(fixed)
    return SamplerSpec(**kw)
