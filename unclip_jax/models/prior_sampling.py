"""Sampling image embeddings from a :class:`DiffusionPrior` with the diffusion core.

    sample_prior(model, cond, rng, config, uncond=None) -> {'image_embed', 'candidates', 'scores'}

Each caption gets ``num_candidates`` (K) independent samples; the one whose (denormalised)
embedding has the largest dot product with the caption's z_t is kept (the paper draws K = 2;
Karlo keeps one, K = 1). All candidates of a batch run together as B * K rows of one
``lax.scan`` loop, so the whole sampler is one jit-able function (:func:`sample_prior_jit`,
``config`` static).

Samplers (``PriorSamplingConfig.sampler``), all on the model's x0 prediction:
  'ddim'           DDIM (eta configurable) over a respaced schedule: 64 steps by default
  'ddpm'           ancestral sampling over a respaced schedule ('fixed_small' variance)
  'dpm_solver_pp'  DPM-Solver++(2M), deterministic
  'unclip'         diffusers' UnCLIPScheduler step on the full schedule (Karlo: 25 steps,
                   'fixed_small_log' variance, clamp 10)
``spacing`` picks the visited timesteps (see ``unclip_jax.diffusion.space_timesteps``); by
default ADM sections of ``steps`` for ddim / ddpm, 'dpmsolver{steps}' for DPM-Solver++ and
'linspace{steps}' for unclip. ``clamp`` clips every x0 estimate to [-clamp, clamp] in the
normalised space (Karlo: 10 with mean/std normalisation); None leaves it free.

Classifier-free guidance (``guidance_scale`` != 1) runs the conditional and unconditional rows in
one doubled batch. The unconditional conditioning is ``uncond`` when given (e.g. the CLIP encoding
of the empty caption; arrays with a batch of 1 or none are broadcast), otherwise the model's
learned null (``learned_null=True``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from unclip_jax import diffusion
from unclip_jax.models.diffusion_prior import DiffusionPrior, TextConditioning

SAMPLERS = ("ddim", "ddpm", "dpm_solver_pp", "unclip")


@dataclasses.dataclass(frozen=True)
class PriorSamplingConfig:
    """How to sample (hashable: pass it as a static argument under jit)."""
    sampler: str = "ddim"
    steps: int = 64
    spacing: str | None = None       # None: the sampler's default grid of `steps` (module doc)
    guidance_scale: float = 1.0
    num_candidates: int = 2          # K: keep the best of K by dot product with z_t
    clamp: float | None = None       # clip x0 estimates to [-clamp, clamp] (normalised space)
    eta: float = 0.0                 # DDIM only
    num_train_steps: int = 1000
    schedule: str = "cosine"         # the training noise schedule ('cosine' | 'linear')

    def __post_init__(self):
        problems = []
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not 1 <= self.steps <= self.num_train_steps:
            problems.append(f"steps must be in [1, {self.num_train_steps}], got {self.steps}")
        if self.num_candidates < 1:
            problems.append(f"num_candidates must be at least 1, got {self.num_candidates}")
        if self.clamp is not None and self.clamp <= 0:
            problems.append(f"clamp must be positive or None, got {self.clamp}")
        if problems:
            raise ValueError("Invalid PriorSamplingConfig: " + "; ".join(problems) + ".")

    @property
    def grid(self) -> str:
        if self.spacing is not None:
            return self.spacing
        return {"dpm_solver_pp": f"dpmsolver{self.steps}",
                "unclip": f"linspace{self.steps}"}.get(self.sampler, str(self.steps))


def train_schedule(num_train_steps: int = 1000, name: str = "cosine") -> diffusion.Schedule:
    """The prior's training noise schedule (the paper: 1000 cosine steps)."""
    return diffusion.get_schedule(name, num_train_steps)


def _broadcast(cond: TextConditioning, batch: int) -> TextConditioning:
    out = []
    for x, rank in zip(cond, (2, 3, 2)):
        x = jnp.asarray(x)
        if x.ndim == rank - 1:
            x = x[None]
        out.append(jnp.broadcast_to(x, (batch,) + x.shape[1:]))
    return TextConditioning(*out)


def _repeat(cond: TextConditioning, k: int) -> TextConditioning:
    return TextConditioning(*(jnp.repeat(jnp.asarray(x), k, axis=0) for x in cond))


def _concat(a: TextConditioning, b: TextConditioning) -> TextConditioning:
    return TextConditioning(*(jnp.concatenate([x, y.astype(x.dtype)], axis=0)
                              for x, y in zip(a, b)))


def guided_denoiser(model: DiffusionPrior, cond: TextConditioning, guidance_scale: float,
                    uncond: TextConditioning | None = None):
    """model_fn(x [N, D], t [N]) -> guided x0 prediction, for the diffusion core's samplers."""
    if guidance_scale == 1.0:
        return lambda x, t: model(x, t, *cond)
    n = cond.text_embed.shape[0]
    if uncond is not None:
        both = _concat(cond, _broadcast(uncond, n))
        drop = None
    elif model.config.learned_null:
        both = _concat(cond, cond)
        drop = jnp.arange(2 * n) >= n
    else:
        raise ValueError("Guidance (guidance_scale != 1) needs unconditional text conditioning: "
                         "pass `uncond` (e.g. the CLIP encoding of the empty caption) or use a "
                         "prior trained with learned_null=True.")

    def doubled(x2, t2):
        return model(x2, t2, *both, drop_text=drop)

    return diffusion.guided_model_fn(doubled, guidance_scale, learned_variance=False)


def sample_prior(model: DiffusionPrior, cond: TextConditioning, rng: jax.Array,
                 config: PriorSamplingConfig = PriorSamplingConfig(),
                 uncond: TextConditioning | None = None) -> dict[str, jax.Array]:
    """Sample z_i for each caption of ``cond`` (TextConditioning of [B, ...] arrays).

    Returns 'image_embed' [B, D] (denormalised, the best candidate), 'candidates' [B, K, D] and
    'scores' [B, K] (dot product of each candidate with z_t).
    """
    cond = TextConditioning(*(jnp.asarray(x) for x in cond))
    b, k, d = cond.text_embed.shape[0], config.num_candidates, model.config.embed_dim
    if k > 1 and cond.text_embed.shape[-1] != d:
        raise ValueError(f"Best-of-{k} ranks candidates by their dot product with z_t, but z_t has "
                         f"{cond.text_embed.shape[-1]} dimensions and z_i {d}; use "
                         "num_candidates=1.")
    rows = _repeat(cond, k)  # row b * K + j is candidate j of caption b
    if uncond is not None:  # one per caption (or one for all), repeated like the captions
        uncond = _repeat(_broadcast(uncond, b), k)
    model_fn = guided_denoiser(model, rows, config.guidance_scale, uncond)
    start_key, loop_key = jax.random.split(rng)
    x_T = jax.random.normal(start_key, (b * k, d), jnp.float32)
    clip = dict(clip="none" if config.clamp is None else "static",
                clip_range=1.0 if config.clamp is None else float(config.clamp))
    with jax.ensure_compile_time_eval():  # schedules are NumPy-built constants, also under jit
        full = train_schedule(config.num_train_steps, config.schedule)
        grid = diffusion.space_timesteps(config.num_train_steps, config.grid)
        schedule = diffusion.respace(full, grid) if config.sampler != "unclip" else None

    if config.sampler == "unclip":
        x0 = diffusion.unclip_sample(model_fn, full, x_T, grid[::-1].copy(), loop_key,
                                     prediction_type="sample", variance_type="fixed_small_log",
                                     **clip)
    elif config.sampler == "ddim":
        x0 = diffusion.ddim_sample(model_fn, schedule, x_T, loop_key, eta=config.eta,
                                   prediction_type="sample", **clip)
    elif config.sampler == "ddpm":
        x0 = diffusion.ddpm_sample(model_fn, schedule, x_T, loop_key, prediction_type="sample",
                                   variance_type="fixed_small", **clip)
    else:  # DPM-Solver++(2M): deterministic given x_T
        x0 = diffusion.dpm_solver_pp_sample(model_fn, schedule, x_T, prediction_type="sample",
                                            **clip)

    z = model.denormalise(x0).reshape(b, k, d)
    if cond.text_embed.shape[-1] == d:
        scores = jnp.einsum("bkd,bd->bk", z, cond.text_embed.astype(jnp.float32))
    else:  # K = 1 with z_t of another dimension: nothing to rank
        scores = jnp.zeros((b, k), jnp.float32)
    best = jnp.argmax(scores, axis=1)
    image_embed = jnp.take_along_axis(z, best[:, None, None], axis=1)[:, 0]
    return {"image_embed": image_embed, "candidates": z, "scores": scores}


sample_prior_jit = nnx.jit(sample_prior, static_argnames=("config",))
"""``sample_prior`` compiled with ``nnx.jit`` (the model is split and merged around the trace)."""


def make_sample_fn(graphdef: nnx.GraphDef, config: PriorSamplingConfig = PriorSamplingConfig()):
    """A pure ``fn(state, cond, rng, uncond=None) -> dict`` over split model state
    (``graphdef, state = nnx.split(model)``), for ``jax.jit`` with explicit shardings."""

    def sample_fn(state, cond: TextConditioning, rng: jax.Array,
                  uncond: TextConditioning | None = None):
        return sample_prior(nnx.merge(graphdef, state), cond, rng, config, uncond)

    return sample_fn
