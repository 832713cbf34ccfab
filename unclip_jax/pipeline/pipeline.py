"""unCLIP end to end: caption -> CLIP text encoding -> prior -> z_i -> decoder -> upsamplers.

    pipe = UnCLIPPipeline.from_pretrained()      # the bundled Shapes model; or a pipeline
                                                 # folder, a diffusers folder, a Hub id
    images = pipe("a red circle", num_images_per_prompt=2, decoder_guidance_scale=2.0,
                  generator=0).images            # [PIL.Image] * 2, as diffusers
    images = pipe.generate(["a red circle at the top left"], num_images=2, seed=0)
    # the same images as uint8 [2, H, W, 3]

``from_pretrained`` sources: :mod:`unclip_jax.pipeline.sources` (a diffusers folder or Hub id is
converted once into the user's cache directory).

Stages (each callable on its own, e.g. for the applications and for parity tests):

    text = pipe.encode_text(prompts)                   TextInputs: tokens, mask, z_t, hidden
                                                       (+ the empty caption's, for guidance)
    z_i  = pipe.sample_image_embeds(text, rng, num_images=1, prior='diffusion'|'ar'|'none')
    x    = pipe.decode(z_i, text, rng, ...)            float [N, h, w, 3] in [-1, 1]
    x    = pipe.upsample(x, rng, index=0, ...)         float [N, H, W, 3] in [-1, 1]

Batching: rows are prompt-major (prompt 0's images first), as diffusers' UnCLIPPipeline orders
them; ``text`` is repeated to ``num_images`` rows per prompt inside the stages.

Sampling semantics follow diffusers' ``UnCLIPPipeline`` (Karlo) by default (``settings``, read
from the manifest's "sampling" section, overridable per call):

* prior: UnCLIPScheduler steps ('unclip' sampler) over ``linspace`` timesteps, x0 prediction,
  'fixed_small_log' variance, x0 clipped to +-clip_range, guidance 4 against the empty caption's
  CLIP encoding (a prior trained with a learned null conditioning, as ours are, is guided against
  that null instead: what its training dropped to); ``best_of`` K draws K embeddings per row
  and keeps the one with the largest dot product with z_t (the paper's K = 2; Karlo's 1);
* decoder: the same scheduler with 'learned_range' variance, guidance 8 (the unconditional rows
  use the learned null z_i and the empty caption), the result clamped to [-1, 1]; the model's
  output is eps (Karlo) or what ``prediction_type`` names ('v_prediction' for the Shapes model);
* super-resolution: the low-res image resized with antialiased bicubic (torch's
  ``interpolate(..., antialias=True)``, a = -0.5), 'fixed_small_log' variance, no guidance; a stage
  listing two models (Karlo's super_res_first / super_res_last) runs the second only at its
  last step. ``start_t`` (default None: pure noise at the top timestep) starts instead from the
  resized image noised to timestep ``start_t`` and samples only [0, start_t], which keeps the
  low-res content (the Shapes bundle's upsamplers use it).

Other samplers: 'ddpm' (respaced ancestral), 'ddim' (eta), 'dpm++' (DPM-Solver++(2M)).

Every stage (:mod:`.stages`) is a ``jax.jit``-compiled pure function of the split model state
whose loop is one ``lax.scan``; the compiled functions are cached per stage and static settings
on the pipeline's :class:`~unclip_jax.pipeline.runtime.Runtime` (``pipe.runtime``), so a second
call with the same shapes compiles nothing (``trace_counts`` counts traces per stage). When the
batch divides the number of devices, the batch axis is sharded over a 1-D mesh ('data') of all
devices and the parameters are replicated. Randomness comes
only from the ``rng`` keys (``generate`` derives them from ``seed``): same seed, same images.
Every loop also accepts explicit starting noise ``x_T`` and per-step ``noise`` arrays, which is
how the parity test feeds diffusers' own draws.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unclip_jax.io import pipeline_folder
from unclip_jax.clip.tokenizer import LONG_TEXT, CaptionError, Tokenizer, get_tokenizer
from unclip_jax.models.diffusion_prior import TextConditioning
from unclip_jax.pipeline import sources, stages
from unclip_jax.pipeline.runtime import Runtime
from unclip_jax.pipeline.settings import (DEFAULT_SETTINGS, PRIORS, PipelineError, check_int,
                                          check_seed, check_stage, merge_settings, seed_key,
                                          stage_spec)
from unclip_jax.pipeline.stages import TextInputs, to_uint8


DTYPES = ("float32", "bfloat16", "float16")
OUTPUT_TYPES = ("pil", "np")


def _check_decoder_text(cfg, tokenizer) -> None:
    """A decoder with its own text Transformer reads the pipeline tokenizer's ids: its context
    and vocabulary must hold them."""
    if getattr(cfg, "text_encoder", "none") != "transformer":
        return
    ctx, vocab = getattr(tokenizer, "context_length", 0), getattr(tokenizer, "vocab_size", 0)
    if ctx > cfg.xf_ctx:
        raise PipelineError(f"The decoder's text Transformer holds {cfg.xf_ctx} tokens but the "
                            f"tokenizer writes {ctx}; pair it with a CLIP "
                            "whose context is at most xf_ctx, or retrain it with a longer one.")
    if vocab > cfg.xf_vocab:
        raise PipelineError(f"The decoder's text Transformer has {cfg.xf_vocab} token "
                            f"embeddings but the tokenizer has {vocab} ids; set "
                            "xf_vocab to the tokenizer's vocabulary size.")


class UnCLIPPipeline:
    """Tokenizer, CLIP (or its text tower), prior(s), decoder and upsamplers, with sampling
    defaults (``settings``). See the module docstring."""

    def __init__(self, *, clip, decoder, prior=None, ar_prior=None, super_res: dict | None = None,
                 tokenizer=None, settings: dict | None = None, context_length: int | None = None,
                 pad_id: int | None = None):
        self.clip = clip
        self.prior = prior
        self.ar_prior = ar_prior
        self.decoder = decoder
        self.super_res_models = dict(super_res or {})   # name -> SuperRes
        ctx = context_length or clip.config.context_length
        self.tokenizer = tokenizer or Tokenizer(context_length=ctx, pad_id=pad_id)
        self.settings = merge_settings(DEFAULT_SETTINGS, settings or {})
        _check_decoder_text(decoder.config, self.tokenizer)
        self.runtime = Runtime()
        self._uncond = None

    # -- construction / files ------------------------------------------------------------------

    @property
    def trace_counts(self) -> dict[str, int]:
        """Traces (= compilations) per stage so far."""
        return self.runtime.trace_counts

    @property
    def super_res(self) -> list[list]:
        """The upsampling stages, each a list of its models (first, then the last-step model)."""
        return [[self.super_res_models[m] for m in st["models"] if m in self.super_res_models]
                for st in self.settings["super_res"]]

    def components(self) -> dict[str, Any]:
        out = {"text_encoder" if pipeline_folder.is_text_encoder(self.clip) else "clip": self.clip,
               "decoder": self.decoder}
        if self.prior is not None:
            out["prior"] = self.prior
        if self.ar_prior is not None:
            out["ar_prior"] = self.ar_prior
        out.update(self.super_res_models)
        return out

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *, dtype: str | None = None,
                        cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, allow_pickle: bool = False
                        ) -> "UnCLIPPipeline":
        """Load a pipeline: None or 'shapes' (the bundled model), an unclip-jax pipeline folder,
        a diffusers UnCLIPPipeline folder or a Hub id such as 'kakaobrain/karlo-v1-alpha'
        (converted once into the cache; see :mod:`unclip_jax.pipeline.sources`). ``dtype``
        sets every component's compute dtype (e.g. 'bfloat16' on accelerators). ``cache_dir``:
        where converted (and downloaded) folders go; ``local_files_only``: never download;
        ``allow_pickle``: read pickled .bin weights (torch.load(weights_only=True))."""
        path = sources.resolve(None if source is None else os.fspath(source),
                               cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                               local_files_only=local_files_only, allow_pickle=allow_pickle)
        if dtype is not None and dtype not in DTYPES:
            raise PipelineError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
        manifest = pipeline_folder.read_manifest(path)
        comps = manifest["components"]
        over = {"dtype": dtype} if dtype else None
        load = lambda name: pipeline_folder.load_component(  # noqa: E731
            path, name, manifest, config_overrides=over)
        text_name = "clip" if "clip" in comps else "text_encoder" if "text_encoder" in comps else None
        missing = [n for n, ok in (("clip or text_encoder", text_name), ("decoder", "decoder" in comps)) if not ok]
        if missing:
            raise pipeline_folder.FolderError(
                f"{path} lacks the component(s) {', '.join(missing)} that every pipeline needs; "
                f"it holds {', '.join(sorted(comps))}.")
        prior = ar_prior = None
        for name in ("prior", "ar_prior"):
            if name in comps:
                m = load(name)
                if comps[name]["class"] == "ARPrior":
                    ar_prior = m
                else:
                    prior = m
        sr = {name: load(name) for name, e in comps.items() if e["class"] == "SuperRes"}
        tok = manifest.get("tokenizer", {})
        return cls(clip=load(text_name), decoder=load("decoder"), prior=prior, ar_prior=ar_prior,
                   super_res=sr, settings=manifest.get("sampling", {}),
                   context_length=tok.get("context_length"), pad_id=tok.get("pad_id"))

    def save_pretrained(self, path: str | os.PathLike, *, dtype: str | None = None) -> None:
        """Write the whole pipeline as one folder, atomically (a good folder at ``path`` is only
        replaced once the new one is complete). ``dtype`` narrows float storage."""
        comps = self.components()
        sampling = copy.deepcopy(self.settings)

        def write(tmp):
            entries = {name: pipeline_folder.save_component(tmp, name, m, dtype=dtype,
                                                            update_manifest=False)
                       for name, m in comps.items()}
            tokenizer = {"kind": "clip_bpe", "vocab": "bpe_simple_vocab_16e6",
                         "context_length": self.tokenizer.context_length,
                         "pad_id": int(self.tokenizer.pad_id)}
            pipeline_folder.save_manifest(tmp, components=entries, sampling=sampling,
                                          replace=True, tokenizer=tokenizer)

        pipeline_folder.save_folder_atomically(path, write)

    # -- settings --------------------------------------------------------------------------------

    def stage_settings(self, stage: str, overrides: dict | None = None,
                       index: int | None = None) -> dict:
        """A stage's settings (``index``: which upsampling stage) with the non-None
        ``overrides`` on top, checked (a PipelineError says what to change)."""
        base = self.settings[stage] if index is None else self.settings[stage][index]
        s = dict(base)
        s.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return check_stage(stage, s)

    # -- text ------------------------------------------------------------------------------------

    def tokenize(self, prompts: str | Sequence[str], *, truncate: bool = False):
        """The checked token rows of ``prompts`` (see :func:`check_prompts`)."""
        return check_prompts(self.tokenizer, prompts, truncate=truncate)

    def encode_ids(self, ids):
        """(z_t float32 [P, D], hidden float32 [P, L, W]) of token ids [P, L]."""
        return stages.encode_ids(self.runtime, self.clip, ids)

    def encode_text(self, prompts: str | Sequence[str], *, truncate: bool = False) -> TextInputs:
        """Tokenize and encode captions with CLIP's text tower (no attention mask, as diffusers
        runs it: the Transformer is causal, so padding never reaches real tokens). A caption
        longer than the context is refused unless ``truncate`` (keep its first tokens)."""
        tok = self.tokenize(prompts, truncate=truncate)
        z_t, hidden = self.encode_ids(tok.ids)
        if self._uncond is None:
            u = self.tokenizer([""], allow_empty=True)
            uz, uh = self.encode_ids(u.ids)
            self._uncond = (uz, uh, np.asarray(u.mask), np.asarray(u.ids))
        return TextInputs(np.asarray(tok.ids), np.asarray(tok.mask), z_t, hidden, *self._uncond)

    # -- prior -----------------------------------------------------------------------------------

    def sample_image_embeds(self, text: TextInputs, rng=None, *, num_images: int = 1,
                            prior: str = "diffusion", steps: int | None = None,
                            guidance_scale: float | None = None, best_of: int | None = None,
                            sampler: str | None = None, x_T=None, noise=None, **settings):
        """z_i [P * num_images, D] (prompt-major). prior='none' returns z_t itself (the paper's
        no-prior baseline). x_T [N * best_of, D] and noise [steps, N * best_of, D] replace the
        draws from ``rng`` (diffusion prior)."""
        if prior not in PRIORS:
            raise PipelineError(f"prior must be one of {PRIORS}, got {prior!r}.")
        rep = lambda a: jnp.repeat(jnp.asarray(a), num_images, axis=0)  # noqa: E731
        z_t, hidden, mask = rep(text.text_embed), rep(text.text_hidden), rep(text.mask)
        if prior == "none":
            return z_t
        if rng is None:
            rng = jax.random.key(0)
        if prior == "ar":
            return self._sample_ar(z_t, hidden, mask, rng, guidance_scale=guidance_scale,
                                   best_of=best_of, **settings)
        if self.prior is None:
            raise PipelineError("This pipeline has no diffusion prior; use prior='ar' or 'none'.")
        s = self.stage_settings("prior", dict(settings, steps=steps, guidance_scale=guidance_scale,
                                              best_of=best_of, sampler=sampler))
        uncond = TextConditioning(text.uncond_embed, text.uncond_hidden,
                                  jnp.asarray(text.uncond_mask))
        return stages.prior_stage(self.runtime, self.prior, s, z_t, hidden, mask, uncond, rng,
                                  x_T, noise)

    def _sample_ar(self, z_t, hidden, mask, rng, *, guidance_scale=None, best_of=None, **settings):
        if self.ar_prior is None:
            raise PipelineError("This pipeline has no autoregressive prior (component 'ar_prior' "
                                "or 'prior' of class ARPrior); use prior='diffusion' or 'none'.")
        s = self.stage_settings("ar_prior", dict(settings, guidance_scale=guidance_scale,
                                                 best_of=best_of))
        cfg = self.ar_prior.config
        ctx = cfg.text_context
        if hidden.shape[1] < ctx or hidden.shape[2] != cfg.text_width:
            raise PipelineError(f"The AR prior reads {ctx} text states of width {cfg.text_width}; "
                                f"the text encoder gives {hidden.shape[1]} of {hidden.shape[2]}.")
        self.ar_prior.quantizer.require_fitted()
        return stages.ar_prior_stage(self.runtime, self.ar_prior, s, z_t, hidden, mask, rng)

    # -- decoder ---------------------------------------------------------------------------------

    def decode(self, image_embed, text: TextInputs, rng=None, *, num_images: int | None = None,
               steps: int | None = None, guidance_scale: float | None = None,
               sampler: str | None = None, eta: float | None = None, x_T=None, noise=None,
               **settings):
        """Images [N, s, s, 3] in [-1, 1] from z_i [N, D]; ``text`` rows are repeated to N
        (N / P images per prompt). x_T [N, s, s, 3] and noise [steps, N, s, s, 3] replace
        draws from ``rng``."""
        image_embed = jnp.asarray(image_embed, jnp.float32)
        n = image_embed.shape[0]
        p = np.asarray(text.tokens).shape[0]
        if n % p:
            raise PipelineError(f"{n} image embeddings for {p} prompts: need a multiple.")
        per = num_images or n // p
        rep = lambda a: jnp.repeat(jnp.asarray(a), per, axis=0)  # noqa: E731
        z_t, hidden, mask, tokens = (rep(a) for a in (text.text_embed, text.text_hidden,
                                                       text.mask, text.tokens))
        s = self.stage_settings("decoder", dict(settings, steps=steps,
                                                guidance_scale=guidance_scale, sampler=sampler,
                                                eta=eta))
        if rng is None:
            rng = jax.random.key(0)
        uncond = (text.uncond_embed, text.uncond_hidden, jnp.asarray(text.uncond_mask),
                  jnp.asarray(text.uncond_tokens, jnp.int32))
        return stages.decoder_stage(self.runtime, self.decoder, s, image_embed, z_t, hidden, mask,
                                    tokens, uncond, rng, x_T, noise)

    # -- upsamplers --------------------------------------------------------------------------------

    def upsample(self, images, rng=None, *, index: int = 0, steps: int | None = None,
                 sampler: str | None = None, eta: float | None = None, x_T=None, noise=None,
                 **settings):
        """Run upsampling stage ``index`` on images [N, h, w, 3] in [-1, 1]; returns
        [N, size, size, 3] in [-1, 1] (clipped). x_T / noise as for :meth:`decode`."""
        n_stages = len(self.settings["super_res"])
        if not 0 <= index < n_stages:
            raise PipelineError(f"Upsampling stage {index} does not exist; this pipeline has "
                                f"{n_stages}.")
        s = self.stage_settings("super_res", dict(settings, steps=steps, sampler=sampler, eta=eta),
                                index)
        names = [m for m in s["models"] if m in self.super_res_models]
        if not names:
            raise PipelineError(f"Upsampling stage {index} needs the component(s) "
                                f"{s['models']}, which this pipeline lacks.")
        if rng is None:
            rng = jax.random.key(0)
        models = [(m, self.super_res_models[m]) for m in (names[0], names[-1])[:len(names)]]
        return stages.upsample_stage(self.runtime, index, models, s,
                                     jnp.asarray(images, jnp.float32), rng, x_T, noise)

    # -- all together --------------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str], num_images: int = 1, seed: int = 0, *,
                 prior: str = "diffusion", upsample: int | None = None,
                 prior_settings: dict | None = None, decoder_settings: dict | None = None,
                 super_res_settings: dict | None = None, return_float: bool = False,
                 progress: Callable[[str, int], None] | None = None,
                 batch_size: int | None = None, key=None, truncate: bool = False):
        """Images for each prompt: uint8 [P * num_images, H, W, 3], prompt-major.

        ``upsample``: how many upsampling stages to run (default: all whose models are present).
        ``*_settings`` override the stage defaults (e.g. ``{'steps': 10}``). ``progress(stage,
        total)`` is called as each stage finishes (stage 'prior', 'decoder', 'super_res_<i>';
        total = the number of such calls), e.g. to drive a progress bar. ``batch_size``: at most
        this many images per compiled call (the last batch is padded, so one compile serves
        all); each batch takes its rows of the whole batch's noise, so the images are those of
        the unbatched call; without it, more than AUTO_BATCH_SIZE images run in batches of
        that many. ``key`` (a jax.random key) replaces ``seed`` (an int in [0, 2**64)).
        ``truncate``: cut prompts longer than the text context instead of refusing them.
        Every argument is checked (a PipelineError says what to change) before any work,
        including whether the images fit in memory."""
        info = PipelineInfo.of(self)
        req = info.check_request(prompts, num_images=num_images, seed=None if key is not None
                                 else seed, prior=prior, upsample=upsample,
                                 batch_size=batch_size, prior_settings=prior_settings,
                                 decoder_settings=decoder_settings,
                                 super_res_settings=super_res_settings, truncate=truncate,
                                 tokenizer=self.tokenizer)
        text = self.encode_text(prompts, truncate=truncate)
        key = seed_key(seed) if key is None else key
        k_prior, k_dec, k_sr = jax.random.split(key, 3)
        ps = dict(prior_settings or {})
        ds, ss = dict(decoder_settings or {}), dict(super_res_settings or {})
        available, n_up = info.upsample_stages, req.upsample
        sr_keys = list(zip(available[:n_up], jax.random.split(k_sr, max(n_up, 1))))
        n = text.tokens.shape[0] * num_images
        bs = req.batch_size
        batches = -(-n // bs)
        calls = (batches if prior == "diffusion" else 1) + (1 + n_up) * batches

        def done(stage: str, value):
            if progress is not None:
                jax.block_until_ready(value)
                progress(stage, calls)
            return value

        if bs == n:
            z_i = done("prior", self.sample_image_embeds(text, k_prior, num_images=num_images,
                                                         prior=prior, **ps))
            x = done("decoder", self.decode(z_i, text, k_dec, num_images=num_images, **ds))
            for i, k in sr_keys:
                x = done(f"super_res_{i}", self.upsample(x, k, index=i, **ss))
            x = np.asarray(x)
        else:
            x = np.concatenate(list(self._batches(text, num_images, bs, prior, k_prior, k_dec,
                                                  sr_keys, ps, ds, ss, done)))
        return x if return_float else to_uint8(x)

    def _batches(self, text: TextInputs, num_images: int, bs: int, prior: str, k_prior, k_dec,
                 sr_keys, ps: dict, ds: dict, ss: dict, done):
        """generate's images in batches of ``bs`` rows (float [m, H, W, 3] each), every stage
        fed its rows of the whole batch's draws (:func:`stages.draws`). The AR prior and no
        prior (embeddings only) run over all rows at once."""
        n = text.tokens.shape[0] * num_images
        rows = np.repeat(np.arange(text.tokens.shape[0]), num_images)
        if prior != "diffusion":
            z_all = done("prior", self.sample_image_embeds(text, k_prior, num_images=num_images,
                                                           prior=prior, **ps))
        else:
            s_prior = self.stage_settings("prior", ps)
            best = int(s_prior["best_of"])
            prior_spec = stage_spec("prior", s_prior)
            if self.prior is None:
                raise PipelineError("This pipeline has no diffusion prior; use prior='ar' or "
                                    "'none'.")
        dec_spec = stage_spec("decoder", self.stage_settings("decoder", ds))
        cfg = self.decoder.config
        dec_shape = (n, cfg.image_size, cfg.image_size, cfg.image_channels)
        sr_specs = []
        for i, _ in sr_keys:
            s = self.stage_settings("super_res", ss, i)
            first = self.super_res_models[[m for m in s["models"] if m in self.super_res_models][0]]
            sr_specs.append((stage_spec("super_res", s),
                             (n, int(s["size"]), int(s["size"]), first.config.image_channels)))
        for lo in range(0, n, bs):
            idx = np.minimum(np.arange(lo, lo + bs), n - 1)   # the last batch: padded
            r = rows[idx]
            tb = text._replace(tokens=text.tokens[r], mask=text.mask[r],
                               text_embed=jnp.asarray(text.text_embed)[r],
                               text_hidden=jnp.asarray(text.text_hidden)[r])
            if prior == "diffusion":
                shape = (n * best, self.prior.config.embed_dim)
                x_T, noise = stages.draws(prior_spec, k_prior, shape, lo * best, bs * best)
                z_i = done("prior", self.sample_image_embeds(tb, k_prior, x_T=x_T, noise=noise,
                                                             **ps))
            else:
                z_i = jnp.asarray(z_all)[idx]
            x_T, noise = stages.draws(dec_spec, k_dec, dec_shape, lo, bs)
            x = done("decoder", self.decode(z_i, tb, k_dec, x_T=x_T, noise=noise, **ds))
            for (i, k), (spec, shape) in zip(sr_keys, sr_specs):
                x_T, noise = stages.draws(spec, k, shape, lo, bs)
                x = done(f"super_res_{i}", self.upsample(x, k, index=i, x_T=x_T, noise=noise,
                                                         **ss))
            yield np.asarray(x)[:min(bs, n - lo)]

    def __call__(self, prompt: str | Sequence[str], num_images_per_prompt: int = 1, *,
                 prior_num_inference_steps: int | None = None,
                 decoder_num_inference_steps: int | None = None,
                 super_res_num_inference_steps: int | None = None,
                 prior_guidance_scale: float | None = None,
                 decoder_guidance_scale: float | None = None, generator=None,
                 seed: int | None = None, output_type: str = "pil", return_dict: bool = True,
                 prior: str = "diffusion", upsample: int | None = None,
                 batch_size: int | None = None,
                 progress: Callable[[str, int], None] | None = None, truncate: bool = False):
        """diffusers-style: ``pipe("a red circle", num_images_per_prompt=4).images`` -> a list
        of PIL images (prompt-major), the images :meth:`generate` makes for the same seed.

        Arguments named as in diffusers' UnCLIPPipeline mean the same; None keeps the
        pipeline's setting. ``generator``: an int seed, a jax.random key, or anything with
        ``initial_seed()`` (a seeded torch.Generator); or pass ``seed`` (default 0: the same
        call gives the same images). ``output_type``: 'pil', or 'np' (float32 [N, H, W, 3] in
        [0, 1], as diffusers). ``return_dict=False`` returns ``(images,)``. Beyond diffusers:
        ``prior`` ('diffusion', 'ar', 'none'), ``upsample`` (how many upsampling stages),
        ``batch_size`` (images per compiled call), ``progress`` (as for generate), ``truncate``
        (cut prompts longer than the text context instead of refusing them)."""
        if output_type not in OUTPUT_TYPES:
            raise PipelineError(f"output_type must be one of {OUTPUT_TYPES}, got "
                                f"{output_type!r}.")
        if generator is not None and seed is not None:
            raise PipelineError("Pass either generator or seed, not both.")
        key = _key_of(generator) if generator is not None else seed_key(
            0 if seed is None else seed)
        pick = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
        if prior != "diffusion" and prior_num_inference_steps is not None:
            raise PipelineError(f"prior_num_inference_steps applies to the diffusion prior; "
                                f"prior={prior!r} has no steps.")
        x = self.generate(
            prompt, num_images=num_images_per_prompt, key=key, prior=prior, upsample=upsample,
            prior_settings=pick(steps=prior_num_inference_steps,
                                guidance_scale=prior_guidance_scale),
            decoder_settings=pick(steps=decoder_num_inference_steps,
                                  guidance_scale=decoder_guidance_scale),
            super_res_settings=pick(steps=super_res_num_inference_steps),
            return_float=True, progress=progress, batch_size=batch_size, truncate=truncate)
        if output_type == "np":
            images = np.clip(x * 0.5 + 0.5, 0.0, 1.0).astype(np.float32)
        else:
            images = [Image.fromarray(im) for im in to_uint8(x)]
        return UnCLIPPipelineOutput(images) if return_dict else (images,)


AUTO_BATCH_SIZE = 16
"""generate without batch_size runs more images than this in batches of this many."""


def check_prompts(tokenizer, prompts, *, truncate: bool = False, what: str = "prompt",
                  hint: str = "truncate=True"):
    """``tokenizer(prompts)`` after checking them: one caption or a non-empty list of
    non-blank strings of valid Unicode, none longer than the context unless ``truncate``.
    ``what`` names them in errors (e.g. '--prompt'), ``hint`` the way to allow truncation."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence):
        raise PipelineError(f"Pass the {what}s as a string or a list of strings, got "
                            f"{type(prompts).__name__}.")
    prompts = list(prompts)
    if not prompts:
        raise PipelineError(f"No {what} given: pass at least one caption.")
    room = tokenizer.context_length - 2
    for i, p in enumerate(prompts):
        name = what if len(prompts) == 1 else f"{what} number {i + 1}"
        if not isinstance(p, str):
            raise PipelineError(f"{name} is a {type(p).__name__}, not a string.")
        if not p.strip():
            raise PipelineError(f"{name} is empty; give it a caption.")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise PipelineError(f"{name} is not valid text (it holds bytes that "
                                "are not UTF-8); pass UTF-8 text.") from None
        long = len(p) > LONG_TEXT   # tokenized only as far as needed to tell it does not fit
        n = len(tokenizer.encode(p, limit=room + 1 if long else None))
        if not n:
            raise PipelineError(f"{name} ({_shorten(p)!r}) is empty once cleaned "
                                "(only spaces or control characters); give it a caption.")
        if n > room and not truncate:
            count = f"more than {room}" if long else str(n)
            raise CaptionError(f"{name} is {count} tokens long, but the context "
                               f"holds {room} (plus start and end): {_shorten(p)!r}. Shorten "
                               f"it, or pass {hint} to keep only the first tokens.")
    return tokenizer(prompts, truncate=truncate)


def _shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


def available_memory() -> int | None:
    """Bytes of host memory available now (None when unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gb(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GB"


@dataclasses.dataclass
class Request:
    """A checked generate request: ``upsample`` stages, ``batch_size`` images per call,
    ``count`` images of ``size`` x ``size``, about ``memory`` bytes of host memory."""
    upsample: int
    batch_size: int
    count: int
    size: int
    memory: int


@dataclasses.dataclass
class PipelineInfo:
    """What generate checks a request against, from a loaded pipeline (:meth:`of`) or from a
    folder's manifest without loading its weights (:meth:`from_folder`, so that a command
    refuses bad flags before the slow load)."""
    context_length: int
    settings: dict
    upsample_stages: list
    has_prior: bool
    has_ar_prior: bool
    decoder_size: int

    @classmethod
    def of(cls, pipe: "UnCLIPPipeline") -> "PipelineInfo":
        sr = pipe.settings["super_res"]
        return cls(pipe.tokenizer.context_length, pipe.settings,
                   [i for i, st in enumerate(sr)
                    if any(m in pipe.super_res_models for m in st["models"])],
                   pipe.prior is not None, pipe.ar_prior is not None,
                   int(pipe.decoder.config.image_size))

    @classmethod
    def from_folder(cls, path: str) -> "PipelineInfo | None":
        """The info of pipeline folder ``path`` from its manifest; None when the manifest does
        not say (loading the folder then reports what is wrong). Bad sampling settings in it
        raise their PipelineError."""
        try:
            manifest = pipeline_folder.read_manifest(path)
            comps = manifest["components"]
            text = comps.get("clip") or comps.get("text_encoder")
            ctx = (manifest.get("tokenizer") or {}).get("context_length") or \
                text["config"]["context_length"]
            ctx = check_int("the manifest's tokenizer context_length", ctx, lo=3, hi=100_000)
            settings = merge_settings(DEFAULT_SETTINGS, manifest.get("sampling") or {})
            sr = [n for n, e in comps.items() if e["class"] == "SuperRes"]
            kinds = {n: comps[n]["class"] for n in ("prior", "ar_prior") if n in comps}
            return cls(ctx, settings,
                       [i for i, st in enumerate(settings["super_res"])
                        if any(m in sr for m in st["models"])],
                       any(k != "ARPrior" for k in kinds.values()),
                       any(k == "ARPrior" for k in kinds.values()),
                       int(comps["decoder"]["config"]["image_size"]))
        except PipelineError:
            raise
        except Exception:  # noqa: BLE001 - from_pretrained says what is wrong
            return None

    def size_after(self, upsample: int) -> int:
        """The side of the images after ``upsample`` upsampling stages."""
        if not upsample:
            return self.decoder_size
        return int(self.settings["super_res"][self.upsample_stages[upsample - 1]]["size"])

    def check_request(self, prompts, *, num_images=1, seed=0, prior="diffusion", upsample=None,
                      batch_size=None, prior_settings=None, decoder_settings=None,
                      super_res_settings=None, truncate=False, tokenizer=None,
                      names: dict | None = None) -> Request:
        """Check a generate request (see UnCLIPPipeline.generate) before any work; a
        PipelineError (or CaptionError) says what to change. ``names`` maps argument names to
        how the caller spells them in errors (e.g. {'upsample': '--upsample'})."""
        names = names or {}
        name = lambda k: names.get(k, k)  # noqa: E731
        if tokenizer is None:
            tokenizer = get_tokenizer(self.context_length)
        tokens = check_prompts(tokenizer, prompts, truncate=truncate, what=name("prompt"),
                               hint=name("truncate") + ("=True" if "truncate" not in names
                                                        else ""))
        num_images = check_int(name("num_images"), num_images, lo=1)
        if seed is not None:
            check_seed(seed, name("seed"))
        if prior not in PRIORS:
            raise PipelineError(f"{name('prior')} must be one of {PRIORS}, got {prior!r}.")
        if prior == "diffusion" and not self.has_prior:
            raise PipelineError("This pipeline has no diffusion prior; use prior 'ar' or 'none'.")
        if prior == "ar" and not self.has_ar_prior:
            raise PipelineError("This pipeline has no autoregressive prior; use prior "
                                "'diffusion' or 'none'.")
        n_avail = len(self.upsample_stages)
        if upsample is None:
            n_up = n_avail
        else:
            n_up = check_int(name("upsample"), upsample, lo=0)
            if n_up > n_avail:
                raise PipelineError(f"{name('upsample')} {n_up}, but this pipeline has {n_avail} "
                                    f"upsampling stage(s) with their models; give 0 to "
                                    f"{n_avail}.")
        for what, over in (("prior_settings", prior_settings),
                           ("decoder_settings", decoder_settings),
                           ("super_res_settings", super_res_settings)):
            if over is not None and not isinstance(over, dict):
                raise PipelineError(f"{what} must be a dict such as {{'steps': 10}}, got "
                                    f"{type(over).__name__}.")
        pick = lambda d: {k: v for k, v in (d or {}).items() if v is not None}  # noqa: E731
        if prior == "diffusion":
            check_stage("prior", {**self.settings["prior"], **pick(prior_settings)})
        elif prior == "ar":
            check_stage("ar_prior", {**self.settings["ar_prior"], **pick(prior_settings)})
        elif pick(prior_settings):
            raise PipelineError(f"prior 'none' has no settings, got {pick(prior_settings)}.")
        check_stage("decoder", {**self.settings["decoder"], **pick(decoder_settings)})
        for i in self.upsample_stages[:n_up]:
            check_stage("super_res", {**self.settings["super_res"][i],
                                      **pick(super_res_settings)})
        n = int(tokens.ids.shape[0]) * num_images
        if batch_size is None:
            bs = min(n, AUTO_BATCH_SIZE)
        else:
            bs = min(check_int(name("batch_size"), batch_size, lo=1), n)
        size = self.size_after(n_up)
        # The images as float32 (twice while joined) and uint8, and the largest stage's draws.
        memory = n * size * size * 3 * (4 + 4 + 1 + 4)
        free = available_memory()
        if free is not None and memory > free:
            raise PipelineError(
                f"{n} images of {size}x{size} need about {_gb(memory)} of memory, but "
                f"{_gb(free)} is available; ask for fewer images at once (run again with "
                f"another {name('seed')} for more).")
        return Request(n_up, bs, n, size, memory)


@dataclasses.dataclass
class UnCLIPPipelineOutput:
    """What calling the pipeline returns: ``images``, a list of PIL images ('pil') or a float
    array [N, H, W, 3] in [0, 1] ('np'), prompt-major."""
    images: Any


def _key_of(generator):
    """A jax.random key from an int seed, a key (typed, or raw uint32 [2]) or a seeded
    torch.Generator (anything with ``initial_seed()``)."""
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return seed_key(int(generator))
    if hasattr(generator, "initial_seed"):
        return seed_key(check_seed(int(generator.initial_seed()), "generator's seed"))
    if isinstance(generator, (jax.Array, np.ndarray)):
        if jnp.issubdtype(generator.dtype, jax.dtypes.prng_key) and generator.shape == ():
            return generator
        if generator.dtype == np.uint32 and generator.shape == (2,):
            return jax.random.wrap_key_data(jnp.asarray(generator))
    raise PipelineError("generator must be an int seed, one jax.random key or a seeded "
                        f"torch.Generator; got {type(generator).__name__} (a list of generators "
                        "per image is not supported: pass one).")


__all__ = ["AUTO_BATCH_SIZE", "PipelineInfo", "UnCLIPPipeline", "UnCLIPPipelineOutput",
           "check_prompts"]
