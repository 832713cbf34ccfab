"""unCLIP end to end: caption -> CLIP text encoding -> prior -> z_i -> decoder -> upsamplers.

    pipe = UnCLIPPipeline.from_pretrained("out/karlo")          # an unclip-jax pipeline folder
    images = pipe.generate(["a red circle at the top left"], num_images=2, seed=0)
    # uint8 [2, H, W, 3]

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

Every stage is a ``jax.jit``-compiled pure function of the split model state whose loop is one
``lax.scan``; the compiled functions are cached per stage and static settings, so a second call
with the same shapes compiles nothing (``trace_counts`` counts traces per stage). When the batch
divides the number of devices, the batch axis is sharded over a 1-D mesh ('data') of all devices
(``jax.device_put`` with a ``NamedSharding``) and the parameters are replicated. Randomness comes
only from the ``rng`` keys (``generate`` derives them from ``seed``): same seed, same images.
Every loop also accepts explicit starting noise ``x_T`` and per-step ``noise`` arrays, which is
how the parity test feeds diffusers' own draws.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from unclip_jax import export
from unclip_jax.errors import UserError

SAMPLERS = ("unclip", "ddpm", "ddim", "dpm++")
PRIORS = ("diffusion", "ar", "none")
STAGES = ("prior", "ar_prior", "decoder", "super_res")

# The defaults of diffusers' UnCLIPPipeline for Karlo (UnCLIPScheduler configs of
# kakaobrain/karlo-v1-alpha). "schedule": the training schedule of the stage; "float32_cumprod":
# build alphas_cumprod as torch does (float32 betas, float32 running product) for exact parity.
_SCHEDULE = dict(schedule="cosine", num_train_steps=1000, float32_cumprod=True)
DEFAULT_SETTINGS: dict[str, Any] = {
    "prior": dict(_SCHEDULE, sampler="unclip", steps=25, guidance_scale=4.0,
                  variance="fixed_small_log", clip_range=5.0, best_of=1, eta=0.0),
    "ar_prior": dict(guidance_scale=1.0, temperature=1.0, top_p=1.0, dot_percentile=50.0,
                     best_of=1),
    "decoder": dict(_SCHEDULE, sampler="unclip", steps=25, guidance_scale=8.0,
                    variance="learned_range", clip_range=1.0, eta=0.0,
                    prediction_type="epsilon"),
    "super_res": [dict(_SCHEDULE, models=["super_res_first", "super_res_last"], size=256,
                       sampler="unclip", steps=7, variance="fixed_small_log", clip_range=1.0,
                       eta=0.0, start_t=None)],
}
_STAGE_KEYS = {
    "prior": set(DEFAULT_SETTINGS["prior"]),
    "ar_prior": set(DEFAULT_SETTINGS["ar_prior"]),
    "decoder": set(DEFAULT_SETTINGS["decoder"]),
    "super_res": set(DEFAULT_SETTINGS["super_res"][0]),
}


class PipelineError(UserError, ValueError):
    """A pipeline call that cannot run as asked; the message says what to change."""


class TextInputs(NamedTuple):
    """The encoded captions (one row per prompt) and the empty caption (one row) for guidance."""
    tokens: Any       # int32 [P, L]
    mask: Any         # bool [P, L], true through the end-of-text token
    text_embed: Any   # float32 [P, D]: z_t
    text_hidden: Any  # float32 [P, L, W]: the text Transformer's last hidden states
    uncond_embed: Any   # [1, D]
    uncond_hidden: Any  # [1, L, W]
    uncond_mask: Any    # [1, L]


# --------------------------------------------------------------------------------------------
# Schedules and the one sampler driver every stage uses
# --------------------------------------------------------------------------------------------

def stage_schedule(s: dict):
    """The full training schedule of a stage (float64 betas; or torch's float32 cumprod)."""
    import jax.numpy as jnp

    from unclip_jax import diffusion
    n = int(s.get("num_train_steps", 1000))
    name = s.get("schedule", "cosine")
    if name == "cosine" and s.get("float32_cumprod", False):
        # diffusers' UnCLIPScheduler: float32 betas, float32 alphas and running product. Its
        # one-step updates (prev_t = t - 1, e.g. the last step t = 0 -> clean data) use those
        # float32 betas / alphas directly, so they are kept too: betas[0] / (1 - acp[0]) is
        # 1 + ~1e-3 there, not 1, and exact parity needs the same rounding.
        betas = diffusion.cosine_betas(n).astype(np.float32)
        alphas = (np.float32(1.0) - betas).astype(np.float32)
        acp = np.cumprod(alphas, dtype=np.float32)
        full = diffusion.make_schedule_from_alphas_cumprod(acp.astype(np.float64))
        return full._replace(betas=jnp.asarray(betas), alphas=jnp.asarray(alphas))
    return diffusion.get_schedule(name, n)


def _grid(s: dict) -> np.ndarray:
    """The visited original timesteps, ascending. With ``start_t`` (upsamplers) the grid spans
    [0, start_t] only: sampling starts from the bicubic-upsampled image noised to that level."""
    from unclip_jax import diffusion
    n, steps, sampler = int(s.get("num_train_steps", 1000)), int(s["steps"]), s["sampler"]
    if s.get("start_t") is not None:
        n = int(s["start_t"]) + 1
    spec = {"unclip": f"linspace{steps}", "dpm++": f"dpmsolver{steps}"}.get(sampler, str(steps))
    return np.asarray(diffusion.space_timesteps(n, spec))


def run_sampler(model_fn, s: dict, x_T, rng, noise, *, prediction_type: str,
                learned_variance: bool):
    """Run the sampler named by stage settings ``s`` from x_T (one lax.scan); returns x0."""
    import jax
    from unclip_jax import diffusion
    with jax.ensure_compile_time_eval():
        full = stage_schedule(s)
        grid = _grid(s)
    clip = s.get("clip_range")
    clip_kw = dict(clip="none" if clip is None else "static",
                   clip_range=1.0 if clip is None else float(clip))
    sampler = s["sampler"]
    if sampler == "unclip":
        return diffusion.unclip_sample(model_fn, full, x_T, grid[::-1].copy(), rng,
                                       prediction_type=prediction_type,
                                       variance_type=s["variance"], noise=noise, **clip_kw)
    schedule = diffusion.respace(full, grid)
    if sampler == "ddpm":
        var = "learned_range" if learned_variance else "fixed_small"
        return diffusion.ddpm_sample(model_fn, schedule, x_T, rng, prediction_type=prediction_type,
                                     variance_type=var, noise=noise, **clip_kw)
    if sampler == "ddim":
        eta = float(s.get("eta", 0.0))
        return diffusion.ddim_sample(model_fn, schedule, x_T, rng if eta else None, eta=eta,
                                     prediction_type=prediction_type,
                                     noise=noise if eta else None, **clip_kw)
    return diffusion.dpm_solver_pp_sample(model_fn, schedule, x_T, prediction_type=prediction_type,
                                          **clip_kw)


def _check_stage(stage: str, s: dict) -> dict:
    unknown = sorted(set(s) - _STAGE_KEYS[stage])
    if unknown:
        raise PipelineError(f"Unknown {stage} setting(s) {unknown}; known: "
                            f"{sorted(_STAGE_KEYS[stage])}.")
    if "sampler" in s:
        if s["sampler"] not in SAMPLERS:
            raise PipelineError(f"{stage} sampler must be one of {SAMPLERS}, got {s['sampler']!r}.")
        lo = 2 if s["sampler"] == "unclip" else 1
        if not lo <= int(s["steps"]) <= int(s.get("num_train_steps", 1000)):
            raise PipelineError(f"{stage} steps must be in [{lo}, "
                                f"{s.get('num_train_steps', 1000)}] for sampler "
                                f"{s['sampler']!r}, got {s['steps']}.")
        if s.get("variance") not in (None, "fixed_small_log", "learned_range"):
            raise PipelineError(f"{stage} variance must be 'fixed_small_log' or 'learned_range', "
                                f"got {s['variance']!r}.")
    if int(s.get("best_of", 1)) < 1:
        raise PipelineError(f"{stage} best_of must be at least 1, got {s['best_of']}.")
    if s.get("prediction_type", "epsilon") not in ("epsilon", "sample", "v_prediction"):
        raise PipelineError(f"{stage} prediction_type must be 'epsilon', 'sample' or "
                            f"'v_prediction' (what the model was trained to predict), got "
                            f"{s['prediction_type']!r}.")
    start = s.get("start_t")
    if start is not None:
        n = int(s.get("num_train_steps", 1000))
        lo = max(1, int(s.get("steps", 1)) - 1)
        if not lo <= int(start) <= n - 1:
            raise PipelineError(f"{stage} start_t must be in [{lo}, {n - 1}] (at least one "
                                f"timestep per sampling step), got {start}; None starts from "
                                "pure noise.")
    return s


def _freeze(s: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in s.items()))


def decoder_model_fn(model, zi, z_t, hidden, mask, uncond, scale: float):
    """The guided decoder ``model_fn(x, t)`` (float32) of :meth:`UnCLIPPipeline.decode`: rows
    conditioned on z_i and the caption, guided against the learned null z_i with the empty
    caption's CLIP encoding ``uncond`` = (embed, hidden, mask), each [1, ...]."""
    import jax.numpy as jnp

    from unclip_jax.models.decoder import guided_decoder_fn
    cfg = model.config
    n = zi.shape[0]
    un = None
    if scale != 1.0 and cfg.text_encoder == "clip":
        ue, uh, um = (jnp.broadcast_to(a, (n,) + a.shape[1:]) for a in uncond)
        un = dict(text_embed=ue if cfg.use_text_embed else None, text_hidden=uh, text_mask=um)
    kw = dict(text_embed=z_t if cfg.use_text_embed else None)
    if cfg.text_encoder == "clip":
        kw.update(text_hidden=hidden, text_mask=mask)
    fn = guided_decoder_fn(model, zi, guidance_scale=scale, uncond=un, **kw)
    return lambda x, t: fn(x, t).astype(jnp.float32)


def resize_bicubic(images, size: int | tuple[int, int]):
    """[B, h, w, C] -> [B, H, W, C]: the upsamplers' conditioning resize (torch's antialiased
    bicubic, as diffusers' UnCLIPPipeline), the same function their training uses."""
    from unclip_jax.models.upsampler import resize_low_res
    return resize_low_res(images, size)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

class UnCLIPPipeline:
    """Tokenizer, CLIP (or its text tower), prior(s), decoder and upsamplers, with sampling
    defaults (``settings``). See the module docstring."""

    def __init__(self, *, clip, decoder, prior=None, ar_prior=None, super_res: dict | None = None,
                 tokenizer=None, settings: dict | None = None, context_length: int | None = None,
                 pad_id: int | None = None):
        from unclip_jax.clip.tokenizer import Tokenizer
        self.clip = clip
        self.prior = prior
        self.ar_prior = ar_prior
        self.decoder = decoder
        self.super_res_models = dict(super_res or {})   # name -> SuperRes
        ctx = context_length or clip.config.context_length
        self.tokenizer = tokenizer or Tokenizer(context_length=ctx, pad_id=pad_id)
        self.settings = _merge_settings(DEFAULT_SETTINGS, settings or {})
        self.trace_counts: dict[str, int] = {}
        self._jit_cache: dict[Any, Any] = {}
        self._split_cache: dict[str, Any] = {}
        self._uncond = None

    # -- construction / files ------------------------------------------------------------------

    @property
    def super_res(self) -> list[list]:
        """The upsampling stages, each a list of its models (first, then the last-step model)."""
        return [[self.super_res_models[m] for m in st["models"] if m in self.super_res_models]
                for st in self.settings["super_res"]]

    def components(self) -> dict[str, Any]:
        out = {"text_encoder" if export.is_text_encoder(self.clip) else "clip": self.clip,
               "decoder": self.decoder}
        if self.prior is not None:
            out["prior"] = self.prior
        if self.ar_prior is not None:
            out["ar_prior"] = self.ar_prior
        out.update(self.super_res_models)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str | None = None
                        ) -> "UnCLIPPipeline":
        """Load an unclip-jax pipeline folder (see :mod:`unclip_jax.export`). ``dtype`` sets
        every component's compute dtype (e.g. 'bfloat16' on accelerators)."""
        path = os.fspath(path)
        manifest = export.read_manifest(path)
        comps = manifest["components"]
        over = {"dtype": dtype} if dtype else None
        load = lambda name: export.load_component(path, name, manifest, config_overrides=over)  # noqa: E731
        text_name = "clip" if "clip" in comps else "text_encoder" if "text_encoder" in comps else None
        missing = [n for n, ok in (("clip or text_encoder", text_name), ("decoder", "decoder" in comps)) if not ok]
        if missing:
            raise export.ExportError(f"{path} lacks the component(s) {', '.join(missing)} that "
                                     f"every pipeline needs; it holds {', '.join(sorted(comps))}.")
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
            entries = {name: export.save_component(tmp, name, m, dtype=dtype, update_manifest=False)
                       for name, m in comps.items()}
            export.save_manifest(tmp, components=entries, sampling=sampling, replace=True,
                                 tokenizer={"kind": "clip_bpe", "vocab": "bpe_simple_vocab_16e6",
                                            "context_length": self.tokenizer.context_length,
                                            "pad_id": int(self.tokenizer.pad_id)})

        export.save_folder_atomically(path, write)

    # -- plumbing: split state, sharding, jit cache ----------------------------------------------

    def _split(self, name: str, module):
        import jax
        from flax import nnx
        hit = self._split_cache.get(name)
        if hit is None or hit[0] is not module:
            graphdef, state = nnx.split(module)
            state = jax.device_put(state, self._replicated())
            hit = self._split_cache[name] = (module, graphdef, state)
        return hit[1], hit[2]

    def _mesh(self):
        import jax
        from jax.sharding import Mesh
        if "mesh" not in self._split_cache:
            self._split_cache["mesh"] = Mesh(np.asarray(jax.devices()), ("data",))
        return self._split_cache["mesh"]

    def _replicated(self):
        from jax.sharding import NamedSharding, PartitionSpec as P
        return NamedSharding(self._mesh(), P())

    def _put(self, x, batch_axis: int | None = 0):
        """Shard ``x`` over the devices along ``batch_axis`` when its size divides."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P
        if x is None:
            return None
        n = self._mesh().size
        if batch_axis is None or n == 1 or x.shape[batch_axis] % n:
            return jax.device_put(x, self._replicated())
        spec = [None] * x.ndim
        spec[batch_axis] = "data"
        return jax.device_put(x, NamedSharding(self._mesh(), P(*spec)))

    def _jit(self, stage: str, key: tuple, fn):
        import jax
        full_key = (stage, key)
        if full_key not in self._jit_cache:
            def traced(*args):
                self.trace_counts[stage] = self.trace_counts.get(stage, 0) + 1
                return fn(*args)
            self._jit_cache[full_key] = jax.jit(traced)
        return self._jit_cache[full_key]

    def _stage(self, stage: str, overrides: dict, index: int | None = None) -> dict:
        base = self.settings[stage] if index is None else self.settings[stage][index]
        s = dict(base)
        s.update({k: v for k, v in overrides.items() if v is not None})
        return _check_stage(stage, s)

    # -- text ------------------------------------------------------------------------------------

    def _encode_ids(self, ids):
        import jax.numpy as jnp
        gd, state = self._split("clip", self.clip)

        def fn(state, ids):
            from flax import nnx
            z_t, hidden = nnx.merge(gd, state).encode_text(ids)
            return z_t.astype(jnp.float32), hidden.astype(jnp.float32)

        return self._jit("text", (), fn)(state, self._put(jnp.asarray(ids, jnp.int32)))

    def encode_text(self, prompts: str | Sequence[str]) -> TextInputs:
        """Tokenize and encode captions with CLIP's text tower (no attention mask, as diffusers
        runs it: the Transformer is causal, so padding never reaches real tokens)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise PipelineError("No prompt given: pass at least one caption.")
        empty = [i for i, p in enumerate(prompts) if not p or not p.strip()]
        if empty:
            raise PipelineError(f"Prompt(s) {empty} are empty; give each image a caption.")
        tok = self.tokenizer(prompts, truncate=True)
        z_t, hidden = self._encode_ids(tok.ids)
        if self._uncond is None:
            u = self.tokenizer([""], allow_empty=True)
            uz, uh = self._encode_ids(u.ids)
            self._uncond = (uz, uh, np.asarray(u.mask))
        uz, uh, um = self._uncond
        return TextInputs(np.asarray(tok.ids), np.asarray(tok.mask), z_t, hidden, uz, uh, um)

    # -- prior -----------------------------------------------------------------------------------

    def sample_image_embeds(self, text: TextInputs, rng=None, *, num_images: int = 1,
                            prior: str = "diffusion", steps: int | None = None,
                            guidance_scale: float | None = None, best_of: int | None = None,
                            sampler: str | None = None, x_T=None, noise=None, **settings):
        """z_i [P * num_images, D] (prompt-major). prior='none' returns z_t itself (the paper's
        no-prior baseline). x_T [N * best_of, D] and noise [steps, N * best_of, D] replace the
        draws from ``rng`` (diffusion prior)."""
        import jax
        import jax.numpy as jnp
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
        s = self._stage("prior", dict(settings, steps=steps, guidance_scale=guidance_scale,
                                      best_of=best_of, sampler=sampler))
        from unclip_jax.models.diffusion_prior import TextConditioning
        from unclip_jax.models.prior_sampling import guided_denoiser
        k, d = int(s["best_of"]), self.prior.config.embed_dim
        n = z_t.shape[0]
        key_x, key_loop = jax.random.split(rng)
        if x_T is None:
            x_T = jax.random.normal(key_x, (n * k, d), jnp.float32)
        gd, state = self._split("prior", self.prior)
        scale = float(s["guidance_scale"])
        uncond = TextConditioning(text.uncond_embed, text.uncond_hidden, jnp.asarray(text.uncond_mask))

        def fn(state, z_t, hidden, mask, x_T, key, noise, uncond):
            from flax import nnx
            model = nnx.merge(gd, state)
            n = z_t.shape[0]
            r = lambda a: jnp.repeat(a, k, axis=0)  # noqa: E731
            cond = TextConditioning(r(z_t), r(hidden), r(mask))
            # the unconditional branch is what the prior trained with: its learned null when it
            # has one (our own priors), else the empty caption's encoding (Karlo's)
            un = None if scale == 1.0 or model.config.learned_null else TextConditioning(
                *(jnp.broadcast_to(a, (n * k,) + a.shape[1:]) for a in uncond))
            model_fn = guided_denoiser(model, cond, scale, un)
            x0 = run_sampler(model_fn, s, x_T, key, noise, prediction_type="sample",
                             learned_variance=False)
            z = model.denormalise(x0).reshape(n, k, d)
            if k == 1:
                return z[:, 0]
            scores = jnp.einsum("nkd,nd->nk", z, z_t.astype(jnp.float32))
            return jnp.take_along_axis(z, jnp.argmax(scores, 1)[:, None, None], axis=1)[:, 0]

        jitted = self._jit("prior", _freeze(s) + (("noise", noise is None),), fn)
        return jitted(state, self._put(z_t), self._put(hidden), self._put(mask),
                      self._put(jnp.asarray(x_T, jnp.float32)), key_loop,
                      None if noise is None else self._put(jnp.asarray(noise, jnp.float32), 1),
                      uncond)

    def _sample_ar(self, z_t, hidden, mask, rng, *, guidance_scale=None, best_of=None, **settings):
        if self.ar_prior is None:
            raise PipelineError("This pipeline has no autoregressive prior (component 'ar_prior' "
                                "or 'prior' of class ARPrior); use prior='diffusion' or 'none'.")
        s = self._stage("ar_prior", dict(settings, guidance_scale=guidance_scale, best_of=best_of))
        from unclip_jax.models import ar_prior as ar
        cfg = self.ar_prior.config
        ctx = cfg.text_context
        if hidden.shape[1] < ctx or hidden.shape[2] != cfg.text_width:
            raise PipelineError(f"The AR prior reads {ctx} text states of width {cfg.text_width}; "
                                f"the text encoder gives {hidden.shape[1]} of {hidden.shape[2]}.")
        self.ar_prior.quantizer.require_fitted()
        gd, state = self._split("ar_prior", self.ar_prior)

        def fn(state, z_t, hidden, mask, key):
            from flax import nnx
            out = ar.sample(nnx.merge(gd, state), z_t, hidden[:, :ctx], mask[:, :ctx], key,
                            num_candidates=int(s["best_of"]),
                            guidance_scale=float(s["guidance_scale"]),
                            temperature=float(s["temperature"]), top_p=float(s["top_p"]),
                            dot_percentile=s["dot_percentile"])
            return out["image_embed"]

        return self._jit("ar_prior", _freeze(s), fn)(state, self._put(z_t), self._put(hidden),
                                                     self._put(mask), rng)

    # -- decoder ---------------------------------------------------------------------------------

    def decode(self, image_embed, text: TextInputs, rng=None, *, num_images: int | None = None,
               steps: int | None = None, guidance_scale: float | None = None,
               sampler: str | None = None, eta: float | None = None, x_T=None, noise=None,
               **settings):
        """Images [N, s, s, 3] in [-1, 1] from z_i [N, D]; ``text`` rows are repeated to N
        (N / P images per prompt). x_T [N, s, s, 3] and noise [steps, N, s, s, 3] replace
        draws from ``rng``."""
        import jax
        import jax.numpy as jnp
        image_embed = jnp.asarray(image_embed, jnp.float32)
        n = image_embed.shape[0]
        p = np.asarray(text.tokens).shape[0]
        if n % p:
            raise PipelineError(f"{n} image embeddings for {p} prompts: need a multiple.")
        per = num_images or n // p
        rep = lambda a: jnp.repeat(jnp.asarray(a), per, axis=0)  # noqa: E731
        z_t, hidden, mask = rep(text.text_embed), rep(text.text_hidden), rep(text.mask)
        s = self._stage("decoder", dict(settings, steps=steps, guidance_scale=guidance_scale,
                                        sampler=sampler, eta=eta))
        cfg = self.decoder.config
        size = cfg.image_size
        if rng is None:
            rng = jax.random.key(0)
        key_x, key_loop = jax.random.split(rng)
        if x_T is None:
            x_T = jax.random.normal(key_x, (n, size, size, cfg.image_channels), jnp.float32)
        gd, state = self._split("decoder", self.decoder)
        scale = float(s["guidance_scale"])
        uncond = (text.uncond_embed, text.uncond_hidden, jnp.asarray(text.uncond_mask))

        def fn(state, zi, z_t, hidden, mask, x_T, key, noise, uncond):
            from flax import nnx
            model_fn = decoder_model_fn(nnx.merge(gd, state), zi, z_t, hidden, mask, uncond,
                                        scale)
            x = run_sampler(model_fn, s, x_T, key, noise, prediction_type=s["prediction_type"],
                            learned_variance=cfg.learned_variance)
            return jnp.clip(x, -1.0, 1.0)

        if cfg.text_encoder == "transformer":
            raise PipelineError("Decoders with their own text Transformer (text_encoder="
                                "'transformer') are not wired into the pipeline yet; use one "
                                "conditioned on CLIP's hidden states ('clip') or on z_i alone.")
        jitted = self._jit("decoder", _freeze(s) + (("noise", noise is None),), fn)
        return jitted(state, self._put(image_embed), self._put(z_t), self._put(hidden),
                      self._put(mask), self._put(jnp.asarray(x_T, jnp.float32)), key_loop,
                      None if noise is None else self._put(jnp.asarray(noise, jnp.float32), 1),
                      uncond)

    # -- upsamplers --------------------------------------------------------------------------------

    def upsample(self, images, rng=None, *, index: int = 0, steps: int | None = None,
                 sampler: str | None = None, eta: float | None = None, x_T=None, noise=None,
                 **settings):
        """Run upsampling stage ``index`` on images [N, h, w, 3] in [-1, 1]; returns
        [N, size, size, 3] in [-1, 1] (clipped). x_T / noise as for :meth:`decode`."""
        import jax
        import jax.numpy as jnp
        stages = self.settings["super_res"]
        if not 0 <= index < len(stages):
            raise PipelineError(f"Upsampling stage {index} does not exist; this pipeline has "
                                f"{len(stages)}.")
        s = self._stage("super_res", dict(settings, steps=steps, sampler=sampler, eta=eta), index)
        names = [m for m in s["models"] if m in self.super_res_models]
        if not names:
            raise PipelineError(f"Upsampling stage {index} needs the component(s) "
                                f"{s['models']}, which this pipeline lacks.")
        first = self.super_res_models[names[0]]
        last = self.super_res_models[names[-1]] if len(names) > 1 else None
        images = jnp.asarray(images, jnp.float32)
        n, size = images.shape[0], int(s["size"])
        c = first.config.image_channels
        if rng is None:
            rng = jax.random.key(0)
        key_x, key_loop = jax.random.split(rng)
        if x_T is None:
            x_T = jax.random.normal(key_x, (n, size, size, c), jnp.float32)
        gd1, st1 = self._split(names[0], first)
        gd2, st2 = self._split(names[-1], last) if last is not None else (None, None)
        grid = _grid(s)
        t_last = int(grid.min())
        # start_t: begin at the bicubic image noised to the grid's top step (SDEdit-style), so
        # the low-res content is kept and only detail is sampled; None starts from pure noise
        partial = s.get("start_t") is not None
        with jax.ensure_compile_time_eval():
            acp_top = float(stage_schedule(s).alphas_cumprod[int(grid.max())]) if partial else 1.0
        learned = first.config.learned_variance

        def fn(st1, st2, low, x_T, key, noise):
            from flax import nnx
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
            x = run_sampler(model_fn, s, x_T, key, noise, prediction_type="epsilon",
                            learned_variance=learned)
            return jnp.clip(x, -1.0, 1.0)

        jitted = self._jit(f"super_res_{index}", _freeze(s) + (("noise", noise is None),), fn)
        return jitted(st1, st2, self._put(images), self._put(jnp.asarray(x_T, jnp.float32)),
                      key_loop,
                      None if noise is None else self._put(jnp.asarray(noise, jnp.float32), 1))

    # -- all together --------------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str], num_images: int = 1, seed: int = 0, *,
                 prior: str = "diffusion", upsample: int | None = None,
                 prior_settings: dict | None = None, decoder_settings: dict | None = None,
                 super_res_settings: dict | None = None, return_float: bool = False,
                 progress: Callable[[str, int], None] | None = None):
        """Images for each prompt: uint8 [P * num_images, H, W, 3], prompt-major.

        ``upsample``: how many upsampling stages to run (default: all whose models are present).
        ``*_settings`` override the stage defaults (e.g. ``{'steps': 10}``). ``progress(stage,
        total)`` is called as each stage finishes (stage 'prior', 'decoder', 'super_res_<i>';
        total = the number of stages), e.g. to drive a progress bar."""
        import jax
        if num_images < 1:
            raise PipelineError(f"num_images must be at least 1, got {num_images}.")
        text = self.encode_text(prompts)
        k_prior, k_dec, k_sr = jax.random.split(jax.random.key(int(seed)), 3)
        ps = dict(prior_settings or {})
        available = [i for i, st in enumerate(self.settings["super_res"])
                     if any(m in self.super_res_models for m in st["models"])]
        n_up = len(available) if upsample is None else int(upsample)
        if n_up > len(available):
            raise PipelineError(f"upsample={n_up} but this pipeline has {len(available)} "
                                "upsampling stage(s) with their models.")

        def done(stage: str, value):
            if progress is not None:
                jax.block_until_ready(value)
                progress(stage, 2 + n_up)
            return value

        z_i = done("prior", self.sample_image_embeds(text, k_prior, num_images=num_images,
                                                     prior=prior, **ps))
        x = done("decoder", self.decode(z_i, text, k_dec, num_images=num_images,
                                        **(decoder_settings or {})))
        for i, key in zip(available[:n_up], jax.random.split(k_sr, max(n_up, 1))):
            x = done(f"super_res_{i}", self.upsample(x, key, index=i, **(super_res_settings or {})))
        if return_float:
            return np.asarray(x)
        return to_uint8(x)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8, as diffusers' pipelines round (x * 0.5 + 0.5) * 255."""
    x = np.clip(np.asarray(images, np.float32) * 0.5 + 0.5, 0.0, 1.0)
    return (x * 255).round().astype(np.uint8)


def _merge_settings(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for stage, value in (over or {}).items():
        if stage not in STAGES:
            raise PipelineError(f"Unknown sampling stage {stage!r}; known: {STAGES}.")
        if stage == "super_res":
            if not isinstance(value, list):
                raise PipelineError("sampling.super_res must be a list of stage settings.")
            out[stage] = [_check_stage(stage, {**DEFAULT_SETTINGS[stage][0], **v}) for v in value]
        else:
            out[stage] = _check_stage(stage, {**out[stage], **value})
    return out


__all__ = ["DEFAULT_SETTINGS", "PipelineError", "TextInputs", "UnCLIPPipeline", "resize_bicubic",
           "run_sampler", "stage_schedule", "to_uint8"]
