"""The pipeline's stages as functions of a :class:`Runtime`, a model and a stage's settings:
text encoding, diffusion prior, AR prior, decoder, upsampler. Each compiles one pure function of
the split model state (cached on the runtime per stage and static settings) whose loop is one
``lax.scan`` (:func:`unclip_jax.diffusion.sample`). The facade (:class:`UnCLIPPipeline`) checks
the inputs and repeats the text rows; these take the rows as they are.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unclip_jax import diffusion
from unclip_jax.diffusion import SamplerSpec
from unclip_jax.models import ar_prior as ar
from unclip_jax.models.decoder import guided_decoder_fn
from unclip_jax.models.diffusion_prior import TextConditioning
from unclip_jax.models.prior_sampling import guided_denoiser, keep_best
from unclip_jax.models.upsampler import resize_low_res
from unclip_jax.pipeline.runtime import Runtime
from unclip_jax.pipeline.settings import freeze, stage_spec


class TextInputs(NamedTuple):
    """The encoded captions (one row per prompt) and the empty caption (one row) for guidance."""
    tokens: Any       # int32 [P, L]
    mask: Any         # bool [P, L], true through the end-of-text token
    text_embed: Any   # float32 [P, D]: z_t
    text_hidden: Any  # float32 [P, L, W]: the text Transformer's last hidden states
    uncond_embed: Any   # [1, D]
    uncond_hidden: Any  # [1, L, W]
    uncond_mask: Any    # [1, L]
    uncond_tokens: Any  # int32 [1, L]: the empty caption's ids (a decoder with its own text
                        # Transformer encodes them itself)


def text_guidance(s: dict) -> tuple[str, bool]:
    """(uncond_text, caption_tokens) of decoder settings ``s`` (the defaults where absent: a
    folder written before they existed)."""
    return s.get("uncond_text", "empty_caption"), bool(s.get("caption_tokens", True))


def decoder_model_fn(model, zi, z_t, hidden, mask, tokens, uncond, scale: float,
                     uncond_text: str = "empty_caption", caption_tokens: bool = True):
    """The guided decoder ``model_fn(x, t)`` (float32) of :meth:`UnCLIPPipeline.decode`: rows
    conditioned on z_i and the caption (z_t [N, D], CLIP's hidden states [N, L, W], mask and
    token ids [N, L]: a decoder reads the states (``text_encoder='clip'``) or the ids
    (``'transformer'``)), guided against the learned null z_i and, with
    ``uncond_text='empty_caption'``, the empty caption ``uncond`` = (embed, hidden, mask,
    tokens), each [1, ...]; with ``'dropped'``, the caption dropped as in training (z_t zeroed,
    every token masked out). ``caption_tokens=False`` drops the caption's tokens in both
    branches (z_i and z_t still condition it)."""
    cfg = model.config
    n = zi.shape[0]
    kw = dict(text_embed=z_t if cfg.use_text_embed else None)
    if cfg.text_encoder == "clip":
        kw.update(text_hidden=hidden, text_mask=mask)
    elif cfg.text_encoder == "transformer":
        kw.update(text_tokens=tokens, text_mask=mask)
    un = None
    if scale != 1.0 and cfg.text_encoder != "none" and uncond_text == "empty_caption":
        ue, uh, um, ut = (jnp.broadcast_to(a, (n,) + a.shape[1:]) for a in uncond)
        un = dict(text_embed=ue if cfg.use_text_embed else None, text_mask=um)
        if cfg.text_encoder == "clip":
            un["text_hidden"] = uh
        else:
            un["text_tokens"] = ut
    fn = guided_decoder_fn(model, zi, guidance_scale=scale, uncond=un,
                           caption_tokens=caption_tokens, **kw)
    return lambda x, t: fn(x, t).astype(jnp.float32)


def resize_bicubic(images, size: int | tuple[int, int]):
    """[B, h, w, C] -> [B, H, W, C]: the upsamplers' conditioning resize (torch's antialiased
    bicubic, as diffusers' UnCLIPPipeline), the same function their training uses."""
    return resize_low_res(images, size)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8, as diffusers' pipelines round (x * 0.5 + 0.5) * 255."""
    x = np.clip(np.asarray(images, np.float32) * 0.5 + 0.5, 0.0, 1.0)
    return (x * 255).round().astype(np.uint8)


def _noise(rt: Runtime, noise):
    return None if noise is None else rt.put(jnp.asarray(noise, jnp.float32), 1)


def draws(spec: SamplerSpec, rng, shape: tuple, start: int, rows: int):
    """Rows [start, start + rows) of what a stage draws from ``rng`` for a whole batch of
    ``shape`` (rows past its end: zeros): its starting noise x_T (``split(rng)[0]``) and its
    sampler's per-step noise [n, rows, ...] (``split(rng)[1]`` split into one key per step, as
    :func:`unclip_jax.diffusion.sample` draws it; None for a sampler that adds none). Passed to
    the stage as ``x_T`` / ``noise`` for each slice of a batch, they give the rows the stage
    gives for the whole batch from ``rng``: batching does not change the images."""
    needs = spec.sampler in ("unclip", "ddpm") or (spec.sampler == "ddim" and spec.eta != 0)
    n = len(spec.timesteps()) if needs else 0
    return _draws(rng, jnp.int32(start), shape=tuple(int(d) for d in shape), rows=int(rows), n=n)


@functools.partial(jax.jit, static_argnames=("shape", "rows", "n"))
def _draws(rng, start, *, shape, rows, n):
    key_x, key_loop = jax.random.split(rng)
    pad = [(0, rows)] + [(0, 0)] * (len(shape) - 1)
    take = lambda a: jax.lax.dynamic_slice_in_dim(jnp.pad(a, pad), start, rows, 0)  # noqa: E731
    x_T = take(jax.random.normal(key_x, shape, jnp.float32))
    if not n:
        return x_T, None
    keys = jax.random.split(key_loop, n)
    return x_T, jax.lax.map(lambda k: take(jax.random.normal(k, shape, jnp.float32)), keys)


def encode_ids(rt: Runtime, clip, ids):
    """(z_t float32 [P, D], hidden float32 [P, L, W]) of token ids [P, L] through CLIP's text
    tower."""
    gd, state = rt.split("clip", clip)

    def fn(state, ids):
        z_t, hidden = nnx.merge(gd, state).encode_text(ids)
        return z_t.astype(jnp.float32), hidden.astype(jnp.float32)

    return rt.jit("text", (), fn)(state, rt.put(jnp.asarray(ids, jnp.int32)))


def prior_stage(rt: Runtime, prior, s: dict, z_t, hidden, mask, uncond: TextConditioning, rng,
                x_T=None, noise=None):
    """z_i [N, D] from the diffusion prior for rows z_t [N, D] (best of ``s['best_of']``),
    guided with ``s['guidance_scale']`` against ``uncond`` (one row) or the prior's learned
    null."""
    spec = stage_spec("prior", s, prediction_type="sample", learned_variance=False)
    k, d = int(s["best_of"]), prior.config.embed_dim
    n = z_t.shape[0]
    key_x, key_loop = jax.random.split(rng)
    if x_T is None:
        x_T = jax.random.normal(key_x, (n * k, d), jnp.float32)
    gd, state = rt.split("prior", prior)
    scale = float(s["guidance_scale"])

    def fn(state, z_t, hidden, mask, x_T, key, noise, uncond):
        model = nnx.merge(gd, state)
        n = z_t.shape[0]
        r = lambda a: jnp.repeat(a, k, axis=0)  # noqa: E731
        cond = TextConditioning(r(z_t), r(hidden), r(mask))
        # the unconditional branch is what the prior trained with: its learned null when it
        # has one (our own priors), else the empty caption's encoding (Karlo's)
        un = None if scale == 1.0 or model.config.learned_null else TextConditioning(
            *(jnp.broadcast_to(a, (n * k,) + a.shape[1:]) for a in uncond))
        x0 = diffusion.sample(guided_denoiser(model, cond, scale, un), spec, x_T, key, noise)
        return keep_best(model.denormalise(x0).reshape(n, k, d), z_t)[0]

    jitted = rt.jit("prior", freeze(s) + (("noise", noise is None),), fn)
    return jitted(state, rt.put(z_t), rt.put(hidden), rt.put(mask),
                  rt.put(jnp.asarray(x_T, jnp.float32)), key_loop, _noise(rt, noise), uncond)


def ar_prior_stage(rt: Runtime, ar_prior, s: dict, z_t, hidden, mask, rng):
    """z_i [N, D] from the autoregressive prior (its text context: the first ``text_context``
    hidden states)."""
    ctx = ar_prior.config.text_context
    gd, state = rt.split("ar_prior", ar_prior)

    def fn(state, z_t, hidden, mask, key):
        out = ar.sample(nnx.merge(gd, state), z_t, hidden[:, :ctx], mask[:, :ctx], key,
                        best_of=int(s["best_of"]),
                        guidance_scale=float(s["guidance_scale"]),
                        temperature=float(s["temperature"]), top_p=float(s["top_p"]),
                        dot_percentile=s["dot_percentile"])
        return out["image_embed"]

    return rt.jit("ar_prior", freeze(s), fn)(state, rt.put(z_t), rt.put(hidden), rt.put(mask),
                                             rng)


def decoder_stage(rt: Runtime, decoder, s: dict, image_embed, z_t, hidden, mask, tokens, uncond,
                  rng, x_T=None, noise=None):
    """Images [N, s, s, C] in [-1, 1] (clipped) from z_i [N, D] and text rows [N, ...], guided
    with ``s['guidance_scale']`` against the learned null z_i and ``uncond`` = (embed, hidden,
    mask, tokens) of the empty caption (or the dropped caption: ``s['uncond_text']``)."""
    cfg = decoder.config
    spec = stage_spec("decoder", s, learned_variance=cfg.learned_variance)
    n, size = image_embed.shape[0], cfg.image_size
    key_x, key_loop = jax.random.split(rng)
    if x_T is None:
        x_T = jax.random.normal(key_x, (n, size, size, cfg.image_channels), jnp.float32)
    gd, state = rt.split("decoder", decoder)
    scale = float(s["guidance_scale"])

    def fn(state, zi, z_t, hidden, mask, tokens, x_T, key, noise, uncond):
        model_fn = decoder_model_fn(nnx.merge(gd, state), zi, z_t, hidden, mask, tokens, uncond,
                                    scale, *text_guidance(s))
        return jnp.clip(diffusion.sample(model_fn, spec, x_T, key, noise), -1.0, 1.0)

    jitted = rt.jit("decoder", freeze(s) + (("noise", noise is None),), fn)
    return jitted(state, rt.put(image_embed), rt.put(z_t), rt.put(hidden), rt.put(mask),
                  rt.put(jnp.asarray(tokens, jnp.int32)), rt.put(jnp.asarray(x_T, jnp.float32)),
                  key_loop, _noise(rt, noise), uncond)


def upsample_stage(rt: Runtime, index: int, models: list[tuple[str, Any]], s: dict, images, rng,
                   x_T=None, noise=None):
    """Upsampling stage ``index``: images [N, h, w, C] in [-1, 1] -> [N, size, size, C] in
    [-1, 1] (clipped). ``models``: (name, SuperRes) pairs, the first for every step, the last
    (when there are two) for the last step only. With ``start_t`` sampling starts from the
    bicubic image noised to the grid's top step (SDEdit-style), keeping the low-res content;
    None starts from pure noise."""
    (name1, first), (name2, last) = models[0], models[-1]
    two = len(models) > 1
    n, size = images.shape[0], int(s["size"])
    c = first.config.image_channels
    key_x, key_loop = jax.random.split(rng)
    if x_T is None:
        x_T = jax.random.normal(key_x, (n, size, size, c), jnp.float32)
    gd1, st1 = rt.split(name1, first)
    gd2, st2 = rt.split(name2, last) if two else (None, None)
    spec = stage_spec("super_res", s, prediction_type="epsilon",
                      learned_variance=first.config.learned_variance)
    grid = spec.timesteps()
    t_last = int(grid.min())
    partial = spec.start_t is not None
    with jax.ensure_compile_time_eval():
        acp_top = float(spec.full_schedule().alphas_cumprod[int(grid.max())]) if partial else 1.0

    def fn(st1, st2, low, x_T, key, noise):
        m1 = nnx.merge(gd1, st1)
        up = resize_bicubic(low, size)
        if partial:
            x_T = np.sqrt(acp_top) * up + np.sqrt(1.0 - acp_top) * x_T
        f1 = lambda x, t: m1(x, t, up).astype(jnp.float32)  # noqa: E731
        if st2 is None:
            model_fn = f1
        else:
            m2 = nnx.merge(gd2, st2)
            f2 = lambda x, t: m2(x, t, up).astype(jnp.float32)  # noqa: E731
            model_fn = lambda x, t: jax.lax.cond(t[0] == t_last, f2, f1, x, t)  # noqa: E731
        return jnp.clip(diffusion.sample(model_fn, spec, x_T, key, noise), -1.0, 1.0)

    jitted = rt.jit(f"super_res_{index}", freeze(s) + (("noise", noise is None),), fn)
    return jitted(st1, st2, rt.put(images), rt.put(jnp.asarray(x_T, jnp.float32)), key_loop,
                  _noise(rt, noise))
