"""Sampling image embeddings from a :class:`DiffusionPrior` with the diffusion core.

    sample_prior(model, cond, rng, spec, guidance_scale=1.0, best_of=2, uncond=None)
        -> {'image_embed', 'candidates', 'scores'}

``spec`` is a :class:`unclip_jax.diffusion.SamplerSpec` with prediction_type='sample' (the prior
predicts x0); any of its samplers ('unclip', 'ddpm', 'ddim', 'dpm++') runs. The default
(:data:`DEFAULT_SPEC`) is DDIM over 64 respaced steps; Karlo's is 'unclip', 25 steps,
clip_range 10 (mean/std-normalised space). :func:`prior_settings` builds the keyword arguments
from a flat settings mapping (a training config's ``sampling``).

Each caption gets ``best_of`` (K) independent samples; the one whose (denormalised) embedding has
the largest dot product with the caption's z_t is kept (:func:`keep_best`; the paper draws
K = 2, Karlo keeps one). All candidates of a batch run together as B * K rows of one
``lax.scan`` loop, so the whole sampler is one jit-able function (:func:`sample_prior_jit`,
``spec``, ``guidance_scale`` and ``best_of`` static).

Classifier-free guidance (``guidance_scale`` != 1) runs the conditional and unconditional rows in
one doubled batch. The unconditional conditioning is ``uncond`` when given (e.g. the CLIP encoding
of the empty caption; arrays with a batch of 1 or none are broadcast), otherwise the model's
learned null (``learned_null=True``).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from unclip_jax import diffusion
from unclip_jax.diffusion import SamplerSpec, spec_from_settings
from unclip_jax.models.diffusion_prior import DiffusionPrior, TextConditioning

DEFAULT_SPEC = SamplerSpec(sampler="ddim", steps=64, prediction_type="sample")


def prior_settings(settings: Mapping) -> dict[str, Any]:
    """``sample_prior``'s keyword arguments (spec, guidance_scale, best_of) from a flat settings
    mapping (a training config's ``sampling``: SamplerSpec fields + guidance_scale + best_of);
    the prior predicts x0, so ``prediction_type`` is 'sample'."""
    settings = dict(settings)
    return dict(spec=spec_from_settings(settings, prediction_type="sample"),
                guidance_scale=float(settings.get("guidance_scale", 1.0)),
                best_of=int(settings.get("best_of", 2)))


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


def rank_candidates(candidates: jax.Array, z_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Best-of-K, the one ranking both priors use: (the index [N] of the candidate with the
    largest dot product with z_t [N, D], the scores [N, K]) of candidates [N, K, D]. With K = 1
    and z_t of another dimension there is nothing to rank: index 0, scores 0."""
    n, k, d = candidates.shape
    if z_t.shape[-1] != d:
        if k > 1:
            raise ValueError(f"Best-of-{k} ranks candidates by their dot product with z_t, but "
                             f"z_t has {z_t.shape[-1]} dimensions and z_i {d}; use best_of=1.")
        return jnp.zeros((n,), jnp.int32), jnp.zeros((n, k), jnp.float32)
    scores = jnp.einsum("nkd,nd->nk", candidates, jnp.asarray(z_t, jnp.float32))
    return jnp.argmax(scores, axis=1), scores


def keep_best(candidates: jax.Array, z_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the best candidate [N, D], the scores [N, K]) of candidates [N, K, D]: see
    :func:`rank_candidates`."""
    best, scores = rank_candidates(candidates, z_t)
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0], scores


def sample_prior(model: DiffusionPrior, cond: TextConditioning, rng: jax.Array,
                 spec: SamplerSpec = DEFAULT_SPEC, *, guidance_scale: float = 1.0,
                 best_of: int = 2, uncond: TextConditioning | None = None
                 ) -> dict[str, jax.Array]:
    """Sample z_i for each caption of ``cond`` (TextConditioning of [B, ...] arrays) with
    ``spec`` (its prediction_type must be 'sample': the prior predicts x0), keeping the best of
    ``best_of`` by dot product with z_t.

    Returns 'image_embed' [B, D] (denormalised, the best candidate), 'candidates' [B, K, D] and
    'scores' [B, K] (dot product of each candidate with z_t).
    """
    if spec.prediction_type != "sample":
        raise ValueError(f"The prior predicts x0: sample it with prediction_type='sample', not "
                         f"{spec.prediction_type!r}.")
    if best_of < 1:
        raise ValueError(f"best_of must be at least 1, got {best_of}.")
    cond = TextConditioning(*(jnp.asarray(x) for x in cond))
    b, k, d = cond.text_embed.shape[0], best_of, model.config.embed_dim
    if k > 1 and cond.text_embed.shape[-1] != d:
        raise ValueError(f"Best-of-{k} ranks candidates by their dot product with z_t, but z_t has "
                         f"{cond.text_embed.shape[-1]} dimensions and z_i {d}; use best_of=1.")
    rows = _repeat(cond, k)  # row b * K + j is candidate j of caption b
    if uncond is not None:  # one per caption (or one for all), repeated like the captions
        uncond = _repeat(_broadcast(uncond, b), k)
    model_fn = guided_denoiser(model, rows, guidance_scale, uncond)
    start_key, loop_key = jax.random.split(rng)
    x_T = jax.random.normal(start_key, (b * k, d), jnp.float32)
    x0 = diffusion.sample(model_fn, spec, x_T, loop_key)
    z = model.denormalise(x0).reshape(b, k, d)
    image_embed, scores = keep_best(z, cond.text_embed)
    return {"image_embed": image_embed, "candidates": z, "scores": scores}


sample_prior_jit = nnx.jit(sample_prior, static_argnames=("spec", "guidance_scale", "best_of"))
"""``sample_prior`` compiled with ``nnx.jit`` (the model is split and merged around the trace)."""


def make_sample_fn(graphdef: nnx.GraphDef, spec: SamplerSpec = DEFAULT_SPEC, *,
                   guidance_scale: float = 1.0, best_of: int = 2):
    """A pure ``fn(state, cond, rng, uncond=None) -> dict`` over split model state
    (``graphdef, state = nnx.split(model)``), for ``jax.jit`` with explicit shardings."""

    def sample_fn(state, cond: TextConditioning, rng: jax.Array,
                  uncond: TextConditioning | None = None):
        return sample_prior(nnx.merge(graphdef, state), cond, rng, spec,
                            guidance_scale=guidance_scale, best_of=best_of, uncond=uncond)

    return sample_fn
