"""The unCLIP applications (paper section 3): variations, interpolations, text diffs, and the
typographic-attack probe, on top of :class:`unclip_jax.pipeline.UnCLIPPipeline`.

    pipe = UnCLIPPipeline.from_pretrained(folder)
    out = variations(pipe, image_uint8, num_images=4, seed=0, eta=1.0)     # out.images uint8
    out = interpolate(pipe, image_a, image_b, num_frames=5, mode="slerp_latent")
    out = textdiff(pipe, image, "a photo of a cat", "an anime drawing of a cat",
                   thetas=(0, 0.25, 0.5))
    out = probe(pipe, image, ["an apple", "an iPod"], num_reconstructions=4)
    z = slerp(a, b, theta)

How each works (paper section 3):

* z_i = CLIP(image) (the image tower of the pipeline's CLIP; a text-only CLIP cannot run these).
* The image, resized to the decoder's resolution, is DDIM-inverted (eta = 0) to x_T through the
  decoder conditioned on z_i and on a caption (by default the empty caption, as Karlo's image
  variation pipeline does), with the same classifier-free guidance used to decode. DDIM from that
  x_T with eta = 0 reconstructs the image; eta > 0 gives variations that keep its layout.
  ``refine_iters`` > 0 solves each inversion step exactly by fixed-point iteration (see
  :func:`unclip_jax.diffusion.ddim_invert`), so eta = 0 reproduces the input up to the iteration's
  convergence even where the model is far from the data (a random decoder, say).
* Interpolation slerps z_i between two images; x_T is either one random draw for every frame
  ('fixed') or the slerp of the two images' inverted latents ('slerp_latent', whose end frames
  reconstruct the inputs).
* Text diffs: z_d = normalise(z_t(target) - z_t(source)), scaled to |z_i|, and
  z_theta = slerp(z_i, z_d, theta), each decoded with DDIM eta = 0 from the image's inverted x_T;
  theta = 0 is the plain reconstruction (:func:`reconstruct`).
* The probe: CLIP's zero-shot probabilities of the labels for the image (softmax of
  exp(logit_scale) * cosine, the learned CLIP temperature, capped at 100 as CLIP does) beside
  the decoder's samples from the image's z_i (the pipeline's default decoder sampler).

Every result is then run through the pipeline's upsamplers (``upsample``: how many stages, default
all). Where frames should differ only by z_i (interpolations, text diffs), every frame gets the
same upsampler noise, so a frame does not depend on how many frames were asked for.
All compiled functions are cached on the pipeline (``pipe.trace_counts`` counts their traces).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from struct import error as struct_error
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, UnidentifiedImageError

from unclip_jax import diffusion
from unclip_jax.clip.preprocess import preprocess, resize_and_crop, to_rgb
from unclip_jax.diffusion import SamplerSpec, SamplerSpecError, spec_from_settings
from unclip_jax.errors import UserError
from unclip_jax.pipeline import TextInputs, decoder_model_fn, stage_spec, to_uint8
from unclip_jax.pipeline.stages import text_guidance
from unclip_jax.pipeline import settings as _settings
from unclip_jax.pipeline.settings import MAX_ETA, seed_key

MODES = ("fixed", "slerp_latent")
DEFAULT_STEPS = 50
DEFAULT_REFINE_ITERS = 2


class ApplicationError(UserError, ValueError):
    """An application asked of inputs it cannot use; the message says what to change."""


def check_int(name: str, value, **bounds) -> int:
    """settings.check_int, failing with an ApplicationError."""
    return _settings.check_int(name, value, error=ApplicationError, **bounds)


def check_float(name: str, value, **bounds) -> float:
    """settings.check_float, failing with an ApplicationError."""
    return _settings.check_float(name, value, error=ApplicationError, **bounds)


# --------------------------------------------------------------------------------------------
# slerp
# --------------------------------------------------------------------------------------------

def slerp(a, b, theta, *, eps: float = 1e-6):
    """Spherical interpolation from ``a`` (theta = 0) to ``b`` (theta = 1) along the last axis.

    a, b: [..., D] (same shape). theta: a scalar (result [..., D]) or a 1-D array [T] (result
    [T, ..., D]). The angle is that between the directions of a and b; the formula
    ``sin((1 - t) w) / sin w * a + sin(t w) / sin w * b`` is applied to the vectors as they are,
    so vectors of equal norm keep that norm. The endpoints are returned exactly. Nearly parallel
    vectors (sin w < eps) are linearly interpolated (the limit of the formula); so are exactly
    opposite ones, whose great circle is not unique. Traceable under ``jax.jit``.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"slerp needs a and b of one shape, got {a.shape} and {b.shape}.")
    dtype = jnp.result_type(a.dtype, b.dtype, jnp.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    t = jnp.asarray(theta, dtype)
    if t.ndim > 1:
        raise ValueError(f"theta must be a scalar or 1-D, got shape {t.shape}.")
    t = t.reshape(t.shape + (1,) * a.ndim)

    def unit(v):
        n = jnp.linalg.norm(v, axis=-1, keepdims=True)
        return v / jnp.maximum(n, jnp.finfo(dtype).tiny)

    ua, ub = unit(a), unit(b)
    # The angle from chord lengths: accurate for nearly parallel and nearly opposite vectors,
    # where arccos(dot) loses half the digits.
    omega = 2.0 * jnp.arctan2(jnp.linalg.norm(ua - ub, axis=-1, keepdims=True),
                              jnp.linalg.norm(ua + ub, axis=-1, keepdims=True))
    sin_omega = jnp.sin(omega)
    linear = sin_omega < eps
    safe = jnp.where(linear, 1.0, sin_omega)
    ca = jnp.where(linear, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe)
    cb = jnp.where(linear, t, jnp.sin(t * omega) / safe)
    out = ca * a + cb * b
    out = jnp.where(t == 0, a, out)
    return jnp.where(t == 1, b, out)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

MAX_IMAGE_PIXELS = 2 ** 26
"""The largest input image :func:`load_image` decodes by default (8192 x 8192 pixels)."""

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _png_bit_depth(head: bytes) -> int | None:
    """The bit depth a PNG's IHDR declares (None for other files)."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 25:
        return head[24]
    return None


def _scale16(values: np.ndarray) -> np.ndarray:
    """16-bit samples -> uint8 by the training decoder's rule (unclip_jax.data.images.
    decode_rgb): round(value / 257)."""
    return np.clip(np.round(values.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)


def load_image(path: str | os.PathLike, *, max_pixels: int | None = MAX_IMAGE_PIXELS
               ) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3]: greyscale expanded, palette and CMYK converted,
    transparency composited onto white; 16-bit PNGs (and 16-bit greyscale of other formats)
    scaled to 8 bits as the training input pipeline does (round(value / 257)). An image of more
    than ``max_pixels`` pixels (None: no limit) is refused from its header, before decoding.
    Every failure (missing, not an image, truncated, too large) is an ApplicationError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = ("is a folder" if os.path.isdir(path) else "is not a regular file"
                if os.path.exists(path) else "does not exist")
        raise ApplicationError(f"Image {path!r} {what}; pass the path of a PNG or JPEG file.")
    if max_pixels is not None:
        max_pixels = check_int("max_pixels", max_pixels, lo=1)
    try:
        with open(path, "rb") as f:
            head = f.read(32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None   # we check below
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
            with im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ApplicationError(
                        f"Image {path!r} is {w}x{h} ({w * h:,} pixels), more than the "
                        f"{max_pixels:,} allowed; shrink it, or raise the limit "
                        "(--max-image-pixels) if you have the memory.")
                if w * h == 0:
                    raise ApplicationError(f"Image {path!r} is empty ({w}x{h}).")
                if _png_bit_depth(head) == 16:
                    return _load_png16(path)
                im.load()
                if im.mode in _SIXTEEN_BIT:
                    return to_rgb(_scale16(np.asarray(im)))
                if im.mode in ("F", "I;16S", "I;32", "I;32S"):
                    raise ApplicationError(f"Image {path!r} has {im.mode} samples (not 8- or "
                                           "16-bit); save it as an 8- or 16-bit PNG or JPEG.")
                if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "1", "La", "RGBa"):
                    im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
                return to_rgb(im.copy())
    except ApplicationError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
            Image.DecompressionBombError, MemoryError, struct_error) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ApplicationError(f"Image {path!r} cannot be read as an image ({why}); pass a "
                               "PNG, JPEG or another format Pillow reads.") from None


def _with_rawmode(path: str, rawmode: str) -> np.ndarray:
    """The PNG at ``path`` decoded by Pillow with its samples unpacked as ``rawmode`` (one of
    the same bits per pixel, so the rows are unfiltered alike): a way to read the bytes of
    16-bit samples that Pillow would otherwise cut to their high byte."""
    with Image.open(path) as im:
        im.tile = [t._replace(args=rawmode if isinstance(t.args, str) else
                              (rawmode,) + tuple(t.args[1:])) for t in im.tile]
        im.load()
        return np.asarray(im)


def _load_png16(path: str) -> np.ndarray:
    """A 16-bit PNG as uint8 RGB, its samples scaled as the training input pipeline scales
    them (round(value / 257), alpha too, then composited onto white)."""
    with Image.open(path) as im:
        mode, tile = im.mode, im.tile
        if mode.startswith("I"):
            im.load()
            return to_rgb(_scale16(np.asarray(im)))
    raw = tile[0].args if isinstance(tile[0].args, str) else tile[0].args[0]
    if raw == "LA;16B":
        b = _with_rawmode(path, "RGBA").astype(np.uint16)    # L high, L low, A high, A low
        grey, alpha = b[..., 0] * 256 + b[..., 1], b[..., 2] * 256 + b[..., 3]
        return to_rgb(_scale16(np.stack([grey, grey, grey, alpha], axis=-1)))
    if raw in ("RGB;16B", "RGBA;16B"):
        high = _with_rawmode(path, raw).astype(np.uint16)
        low = _with_rawmode(path, raw.replace("16B", "16L")).astype(np.uint16)
        return to_rgb(_scale16(high * 256 + low))
    with Image.open(path) as im:   # a layout Pillow reads another way: its own 8 bits
        im.load()
        return to_rgb(im.copy())


def _as_image(image) -> np.ndarray:
    """One uint8 image (array [H, W(, C)] or PIL) -> uint8 RGB [H, W, 3]."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    arr = image if not isinstance(image, np.ndarray) else np.asarray(image)
    if isinstance(arr, np.ndarray) and arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ApplicationError(f"Pass one image [H, W, 3], not a batch of {arr.shape[0]}.")
        arr = arr[0]
    try:
        rgb = to_rgb(arr)
    except ValueError as e:
        raise ApplicationError(str(e)) from None
    if min(rgb.shape[:2]) < 1:
        raise ApplicationError(f"The image is empty (shape {rgb.shape}).")
    return rgb


def decoder_input(pipe, images: Sequence) -> np.ndarray:
    """uint8 images -> float32 [B, s, s, 3] in [-1, 1] at the decoder's resolution (shorter side
    resized with PIL bicubic, centre crop), the form the decoder was trained on."""
    size = pipe.decoder.config.image_size
    out = [resize_and_crop(_as_image(im), size).astype(np.float32) / 127.5 - 1.0 for im in images]
    return np.stack(out)


def _check_image_tower(pipe) -> None:
    if not hasattr(pipe.clip, "encode_image"):
        raise ApplicationError("This pipeline's CLIP has only its text tower (a diffusers "
                               "UnCLIPPipeline export); the image applications need CLIP's image "
                               "encoder: save the pipeline with the full CLIP (component 'clip').")


def image_embeds(pipe, images: Sequence) -> Any:
    """CLIP image embeddings z_i float32 [B, D] (not normalised) of uint8 images."""

    _check_image_tower(pipe)
    pixels = preprocess([_as_image(im) for im in images], image_size=pipe.clip.config.image_size)
    rt = pipe.runtime
    gd, state = rt.split("clip", pipe.clip)

    def fn(state, pixels):
        return nnx.merge(gd, state).encode_image(pixels).astype(jnp.float32)

    return rt.jit("app_clip_image", (), fn)(state, rt.put(jnp.asarray(pixels)))


def caption_inputs(pipe, caption: str | None = None, *, truncate: bool = False):
    """The decoder's text conditioning (:class:`unclip_jax.pipeline.TextInputs`, one row) for
    ``caption``; None or '' gives the empty caption (also used as its unconditional row). A
    caption longer than the context is refused unless ``truncate``."""
    if caption is not None and not isinstance(caption, str):
        raise ApplicationError(f"The caption must be a string, got {type(caption).__name__}.")
    if caption is not None and caption.strip():
        return pipe.encode_text([caption], truncate=truncate)
    tok = pipe.tokenizer([""], allow_empty=True)
    z, h = pipe.encode_ids(tok.ids)
    ids, mask = np.asarray(tok.ids), np.asarray(tok.mask)
    return TextInputs(ids, mask, z, h, z, h, mask, ids)


def _check_caption(name: str, caption: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise ApplicationError(f"The {name} is empty; give a caption describing the image "
                               "(e.g. 'a photo of a cat').")
    return caption


# --------------------------------------------------------------------------------------------
# The decoder's guided model, DDIM inversion and DDIM decoding
# --------------------------------------------------------------------------------------------

def _ddim_spacing(num_train_steps: int, steps: int) -> str:
    """The spacing of :func:`ddim_timesteps`: 'ddimN' where an integer stride gives N steps."""
    try:
        diffusion.space_timesteps(num_train_steps, f"ddim{int(steps)}")
        return f"ddim{int(steps)}"
    except ValueError:
        return str(int(steps))


def ddim_timesteps(num_train_steps: int, steps: int) -> np.ndarray:
    """The DDIM grid of the applications: a constant stride from timestep 0 (ADM's 'ddimN',
    diffusers' DDIM 'leading' spacing: 0, 20, ..., 980 for 50 of 1000), which stops short of the
    last training step; where no integer stride gives exactly ``steps``, evenly spaced sections
    (both ends). Inversion needs the first timestep to be 0. Stopping short of t = T - 1 matters
    for exact inversion: there sqrt(alphas_cumprod) is ~5e-5 (cosine schedule), so the first
    sampling step divides any mismatch in the noise estimate by that."""
    return diffusion.space_timesteps(num_train_steps, _ddim_spacing(num_train_steps, steps))


def ddim_spec(pipe, steps: int, *, eta: float = 0.0, clip_range: float | None = None
              ) -> SamplerSpec:
    """The applications' DDIM sampler: the decoder's training schedule and prediction type,
    on the :func:`ddim_timesteps` grid."""
    s = pipe.settings["decoder"]
    n = int(s.get("num_train_steps", 1000))
    if not 1 <= int(steps) <= n:
        raise ApplicationError(f"steps must be in [1, {n}], got {steps}.")
    try:
        return spec_from_settings(s, sampler="ddim", steps=int(steps), eta=float(eta),
                                  clip_range=clip_range, spacing=_ddim_spacing(n, steps),
                                  start_t=None, learned_variance=False)
    except SamplerSpecError as e:
        raise ApplicationError(str(e)) from None


def _text_rows(pipe, text, n: int):
    rep = lambda a: jnp.broadcast_to(jnp.asarray(a), (n,) + tuple(np.shape(a))[1:])  # noqa: E731
    rows = (rep(text.text_embed), rep(text.text_hidden), rep(np.asarray(text.mask)),
            rep(np.asarray(text.tokens, np.int32)))
    uncond = (jnp.asarray(text.uncond_embed), jnp.asarray(text.uncond_hidden),
              jnp.asarray(np.asarray(text.uncond_mask)),
              jnp.asarray(np.asarray(text.uncond_tokens, np.int32)))
    return rows, uncond


def _guidance(pipe, guidance_scale):
    return check_float("guidance_scale", pipe.settings["decoder"]["guidance_scale"]
                       if guidance_scale is None else guidance_scale, lo=0.0, hi=1000.0)


def invert(pipe, x0, image_embed, text=None, *, steps: int = DEFAULT_STEPS,
           guidance_scale: float | None = None, refine_iters: int = DEFAULT_REFINE_ITERS,
           clip_range: float | None = None):
    """DDIM-invert decoder-resolution images x0 [N, s, s, 3] in [-1, 1] to x_T, through the
    decoder conditioned on z_i [N, D] and ``text`` (:func:`caption_inputs`; default the empty
    caption). Decoding x_T with :func:`ddim_decode` (eta = 0, same settings) gives x0 back."""
    text = caption_inputs(pipe) if text is None else text
    x0 = jnp.asarray(x0, jnp.float32)
    zi = jnp.asarray(image_embed, jnp.float32)
    n = x0.shape[0]
    if zi.shape[0] != n:
        raise ApplicationError(f"{n} images but {zi.shape[0]} image embeddings.")
    scale, refine = _guidance(pipe, guidance_scale), int(refine_iters)
    spec = ddim_spec(pipe, steps, clip_range=clip_range)
    clip_kw = _clip_kw(spec.clip_range)
    rt = pipe.runtime
    gd, state = rt.split("decoder", pipe.decoder)
    rows, uncond = _text_rows(pipe, text, n)
    guide_text = text_guidance(pipe.settings["decoder"])

    def fn(state, x0, zi, rows, uncond):
        with jax.ensure_compile_time_eval():
            schedule = spec.sampling_schedule()
        model_fn = decoder_model_fn(nnx.merge(gd, state), zi, *rows, uncond, scale,
                                    *guide_text)
        return diffusion.ddim_invert(model_fn, schedule, x0, refine_iters=refine,
                                     prediction_type=spec.prediction_type, **clip_kw)

    return rt.jit("app_invert", (spec, scale, refine, guide_text), fn)(
        state, rt.put(x0), rt.put(zi), tuple(rt.put(a) for a in rows), uncond)


def ddim_decode(pipe, image_embed, x_T, text=None, rng=None, *, eta: float = 0.0,
                steps: int = DEFAULT_STEPS, guidance_scale: float | None = None,
                clip_range: float | None = None):
    """DDIM from x_T [N, s, s, 3] through the decoder conditioned on z_i [N, D] and ``text``
    (default the empty caption); eta > 0 needs ``rng``. Returns [N, s, s, 3] in [-1, 1]
    (clipped). ``clip_range`` clips every x0 estimate (None: no clipping, so that eta = 0 is the
    exact inverse of :func:`invert`)."""
    text = caption_inputs(pipe) if text is None else text
    x_T = jnp.asarray(x_T, jnp.float32)
    zi = jnp.asarray(image_embed, jnp.float32)
    n = x_T.shape[0]
    if zi.shape[0] != n:
        raise ApplicationError(f"{n} starting latents but {zi.shape[0]} image embeddings.")
    eta = check_float("eta", eta, lo=0.0, hi=MAX_ETA)
    if eta and rng is None:
        rng = jax.random.key(0)
    scale = _guidance(pipe, guidance_scale)
    spec = ddim_spec(pipe, steps, eta=eta, clip_range=clip_range)
    rt = pipe.runtime
    gd, state = rt.split("decoder", pipe.decoder)
    rows, uncond = _text_rows(pipe, text, n)
    guide_text = text_guidance(pipe.settings["decoder"])

    def fn(state, x_T, zi, rows, uncond, key):
        model_fn = decoder_model_fn(nnx.merge(gd, state), zi, *rows, uncond, scale,
                                    *guide_text)
        return jnp.clip(diffusion.sample(model_fn, spec, x_T, key), -1.0, 1.0)

    return rt.jit("app_ddim", (spec, scale, guide_text), fn)(
        state, rt.put(x_T), rt.put(zi), tuple(rt.put(a) for a in rows), uncond,
        rng if eta else None)


def _clip_kw(clip_range):
    if clip_range is None:
        return dict(clip="none")
    return dict(clip="static", clip_range=float(clip_range))


# --------------------------------------------------------------------------------------------
# Upsampling
# --------------------------------------------------------------------------------------------

def upsample_stages(pipe) -> list[int]:
    """Indices of the upsampling stages whose models the pipeline holds, in order."""
    return [i for i, st in enumerate(pipe.settings["super_res"])
            if any(m in pipe.super_res_models for m in st["models"])]


def _upsample(pipe, x, rng, upsample: int | None, *, shared_noise: bool, progress=None):
    """Run the first ``upsample`` (default: all) upsampling stages. shared_noise: every row gets
    the same starting and per-step noise (rows then differ only through their input)."""
    stages = upsample_stages(pipe)
    count = len(stages) if upsample is None else int(upsample)
    if not 0 <= count <= len(stages):
        raise ApplicationError(f"upsample={count}, but this pipeline has {len(stages)} "
                               "upsampling stage(s) with their models.")
    n = x.shape[0]
    for index, key in zip(stages[:count], jax.random.split(rng, max(count, 1))):
        if progress is not None:
            progress(f"upsample {index + 1}")
        kw = {}
        if shared_noise:
            s = pipe.stage_settings("super_res", {}, index)
            size = int(s["size"])
            c = x.shape[-1]
            k_x, k_noise = jax.random.split(key)
            one = (1, size, size, c)
            kw["x_T"] = jax.numpy.broadcast_to(jax.random.normal(k_x, one), (n,) + one[1:])
            steps = len(stage_spec("super_res", s).timesteps())
            kw["noise"] = jax.numpy.broadcast_to(jax.random.normal(k_noise, (steps,) + one),
                                                 (steps, n) + one[1:])
        x = pipe.upsample(x, key, index=index, **kw)
    return x


class _Progress:
    """Calls ``callback(done, total, stage)`` before each stage and once at the end."""

    def __init__(self, callback: Callable[[int, int, str], None] | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, stage: str) -> None:
        if self.callback is not None:
            self.callback(self.done, self.total, stage)
        self.done += 1

    def finish(self) -> None:
        if self.callback is not None:
            self.callback(self.total, self.total, "done")


def _n_upsample(pipe, upsample) -> int:
    """How many upsampling stages ``upsample`` runs (None: all), checked before any work."""
    n = len(upsample_stages(pipe))
    if upsample is None:
        return n
    count = check_int("upsample", upsample, lo=0)
    if count > n:
        raise ApplicationError(f"upsample={count}, but this pipeline has {n} upsampling "
                               f"stage(s) with their models; give 0 to {n}.")
    return count


# --------------------------------------------------------------------------------------------
# The applications
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Variations:
    images: np.ndarray       # uint8 [N, H, W, 3] after the upsamplers
    decoded: np.ndarray      # uint8 [N, s, s, 3] at the decoder's resolution
    image_embed: np.ndarray  # z_i [D]
    x_T: np.ndarray          # the inverted latent [s, s, 3]


@dataclasses.dataclass
class Interpolation:
    frames: np.ndarray       # uint8 [F, H, W, 3]
    decoded: np.ndarray      # uint8 [F, s, s, 3]
    thetas: np.ndarray       # [F], 0 (image A) ... 1 (image B)
    mode: str


@dataclasses.dataclass
class TextDiff:
    images: np.ndarray       # uint8 [T, H, W, 3], one per theta
    decoded: np.ndarray      # uint8 [T, s, s, 3]
    thetas: np.ndarray       # [T]
    text_diff: np.ndarray    # z_d [D], scaled to |z_i|


@dataclasses.dataclass
class Probe:
    labels: list
    probs: np.ndarray        # [L] zero-shot probabilities of the labels for the image
    cosine: np.ndarray       # [L] cosine similarities z_i . z_t
    images: np.ndarray       # uint8 [R, H, W, 3]: the decoder's samples from z_i
    decoded: np.ndarray      # uint8 [R, s, s, 3]


MAX_REFINE_ITERS = 100


def _common(steps, refine_iters, seed=0):
    check_int("steps", steps, lo=1)
    check_int("refine_iters", refine_iters, lo=0, hi=MAX_REFINE_ITERS)
    check_int("seed", seed, lo=0, hi=2 ** 64 - 1)


def reconstruct(pipe, image, seed: int = 0, *, steps: int = DEFAULT_STEPS,
                guidance_scale: float | None = None, refine_iters: int = DEFAULT_REFINE_ITERS,
                caption: str | None = None, upsample: int | None = None,
                clip_range: float | None = None, truncate: bool = False) -> Variations:
    """The image decoded back from its own z_i and inverted x_T (DDIM eta = 0): what
    variations with eta = 0 and text diffs at theta = 0 give. Upsampler noise comes from
    ``seed`` and is the one the other applications use for their frames."""
    return variations(pipe, image, 1, seed, eta=0.0, steps=steps, guidance_scale=guidance_scale,
                      refine_iters=refine_iters, caption=caption, upsample=upsample,
                      clip_range=clip_range, truncate=truncate)


def variations(pipe, image, num_images: int = 4, seed: int = 0, *, eta: float = 1.0,
               steps: int = DEFAULT_STEPS, guidance_scale: float | None = None,
               refine_iters: int = DEFAULT_REFINE_ITERS, caption: str | None = None,
               upsample: int | None = None, clip_range: float | None = None,
               progress: Callable | None = None, truncate: bool = False) -> Variations:
    """``num_images`` variations of one uint8 image (paper section 3.1): z_i = CLIP(image),
    x_T = DDIM inversion of the image through the decoder, then DDIM with ``eta`` from x_T
    (eta = 0 reconstructs the image; larger eta strays further). ``guidance_scale`` (default the
    pipeline's decoder setting) is used both to invert and to decode; ``caption`` conditions the
    decoder's text input (default the empty caption). Same seed, same images."""
    check_int("num_images", num_images, lo=1)
    check_float("eta", eta, lo=0.0, hi=MAX_ETA)
    _common(steps, refine_iters, seed)
    prog = _Progress(progress, 3 + _n_upsample(pipe, upsample))
    rgb = _as_image(image)
    prog("CLIP image embedding")
    zi = image_embeds(pipe, [rgb])
    text = caption_inputs(pipe, caption, truncate=truncate)
    prog("DDIM inversion")
    x_T = invert(pipe, decoder_input(pipe, [rgb]), zi, text, steps=steps,
                 guidance_scale=guidance_scale, refine_iters=refine_iters, clip_range=clip_range)
    n = int(num_images)
    k_dec, k_up = jax.random.split(seed_key(seed))
    prog("DDIM decoding")
    rep = lambda a: jax.numpy.repeat(a, n, axis=0)  # noqa: E731
    x = ddim_decode(pipe, rep(zi), rep(x_T), text, k_dec, eta=eta, steps=steps,
                    guidance_scale=guidance_scale, clip_range=clip_range)
    low = to_uint8(x)
    x = _upsample(pipe, x, k_up, upsample, shared_noise=float(eta) == 0.0, progress=prog)
    prog.finish()
    return Variations(to_uint8(x), low, np.asarray(zi[0]), np.asarray(x_T[0]))


def interpolate(pipe, image_a, image_b, num_frames: int = 5, seed: int = 0, *,
                mode: str = "fixed", steps: int = DEFAULT_STEPS,
                guidance_scale: float | None = None, refine_iters: int = DEFAULT_REFINE_ITERS,
                caption: str | None = None, upsample: int | None = None,
                clip_range: float | None = None, progress: Callable | None = None,
                batch_size: int | None = None, truncate: bool = False) -> Interpolation:
    """Frames between two images (paper section 3.2, figure 4): z_theta = slerp(z_a, z_b, theta)
    for ``num_frames`` thetas from 0 to 1, decoded with DDIM eta = 0 from x_T that is either
    one random draw (from ``seed``) shared by all frames (``mode='fixed'``) or
    slerp(x_T(a), x_T(b), theta) of the two images' DDIM-inverted latents
    (``mode='slerp_latent'``: the end frames reconstruct the inputs). ``batch_size`` decodes
    and upsamples at most that many frames per call (default: all at once); every frame's
    computation is its own, so the frames are the same."""
    if mode not in MODES:
        raise ApplicationError(f"mode must be one of {MODES}, got {mode!r}.")
    if isinstance(num_frames, (int, np.integer)) and num_frames < 2:
        raise ApplicationError(f"num_frames must be at least 2 (the two images), got "
                               f"{num_frames}.")
    check_int("num_frames", num_frames, lo=2)
    if batch_size is not None:
        check_int("batch_size", batch_size, lo=1)
    _common(steps, refine_iters, seed)
    f = int(num_frames)
    prog = _Progress(progress, 2 + (mode == "slerp_latent") + _n_upsample(pipe, upsample))
    rgb = [_as_image(image_a), _as_image(image_b)]
    prog("CLIP image embeddings")
    zi = image_embeds(pipe, rgb)
    thetas = np.linspace(0.0, 1.0, f)
    z = slerp(zi[0], zi[1], thetas)                                      # [F, D]
    text = caption_inputs(pipe, caption, truncate=truncate)
    k_x, k_up = jax.random.split(seed_key(seed))
    cfg = pipe.decoder.config
    shape = (cfg.image_size, cfg.image_size, cfg.image_channels)
    if mode == "fixed":
        x_T = jnp.broadcast_to(jax.random.normal(k_x, (1,) + shape), (f,) + shape)
    else:
        prog("DDIM inversion")
        lat = invert(pipe, decoder_input(pipe, rgb), zi, text, steps=steps,
                     guidance_scale=guidance_scale, refine_iters=refine_iters,
                     clip_range=clip_range)
        x_T = slerp(lat[0].reshape(-1), lat[1].reshape(-1), thetas).reshape((f,) + shape)
    prog("DDIM decoding")
    size = f if batch_size is None else int(batch_size)
    chunks = [slice(lo, min(f, lo + size)) for lo in range(0, f, size)]
    x = jnp.concatenate([ddim_decode(pipe, z[c], x_T[c], text, eta=0.0, steps=steps,
                                     guidance_scale=guidance_scale, clip_range=clip_range)
                         for c in chunks])
    low = to_uint8(x)
    x = jnp.concatenate([_upsample(pipe, x[c], k_up, upsample, shared_noise=True,
                                   progress=prog if i == 0 else None)
                         for i, c in enumerate(chunks)])
    prog.finish()
    return Interpolation(to_uint8(x), low, thetas, mode)


def _parse_thetas(thetas) -> np.ndarray:
    t = np.asarray(thetas, np.float64).reshape(-1)
    if t.size == 0:
        raise ApplicationError("Give at least one theta (e.g. 0,0.25,0.5).")
    if not np.all(np.isfinite(t)) or t.min() < 0 or t.max() > 1:
        raise ApplicationError(f"Every theta must lie in [0, 1], got {t.tolist()}.")
    return t


def text_diff_vector(pipe, image_embed, source_caption: str, target_caption: str, *,
                     truncate: bool = False):
    """z_d = normalise(z_t(target) - z_t(source)), scaled to the norm of z_i [D] so that slerp
    moves along the sphere z_i lives on."""
    _check_caption("source caption", source_caption)
    _check_caption("target caption", target_caption)
    z_t = jnp.asarray(pipe.encode_text([source_caption, target_caption], truncate=truncate)
                      .text_embed, jnp.float32)
    d = z_t[1] - z_t[0]
    norm = float(jnp.linalg.norm(d))
    if not norm > 1e-6 * float(jnp.linalg.norm(z_t[1])):
        raise ApplicationError(f"The captions {source_caption!r} and {target_caption!r} have the "
                               "same CLIP text embedding, so there is no direction to move in; "
                               "give a target caption that differs from the source.")
    zi = jnp.asarray(image_embed, jnp.float32)
    return d / norm * jnp.linalg.norm(zi)


def textdiff(pipe, image, source_caption: str, target_caption: str,
             thetas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), seed: int = 0, *,
             steps: int = DEFAULT_STEPS, guidance_scale: float | None = None,
             refine_iters: int = DEFAULT_REFINE_ITERS, caption: str | None = None,
             upsample: int | None = None, clip_range: float | None = None,
             progress: Callable | None = None, truncate: bool = False) -> TextDiff:
    """Edit an image towards a caption (paper section 3.3, figure 5): z_d = normalise(z_t(target)
    - z_t(source)) (scaled to |z_i|), z_theta = slerp(z_i, z_d, theta) for each theta, each
    decoded with DDIM eta = 0 from the image's inverted x_T. theta = 0 is :func:`reconstruct`.
    The paper keeps theta in about [0.25, 0.5]: beyond that the image loses its content."""
    _check_caption("source caption", source_caption)
    _check_caption("target caption", target_caption)
    t = _parse_thetas(thetas)
    _common(steps, refine_iters, seed)
    prog = _Progress(progress, 3 + _n_upsample(pipe, upsample))
    rgb = _as_image(image)
    prog("CLIP embeddings")
    zi = image_embeds(pipe, [rgb])
    z_d = text_diff_vector(pipe, zi[0], source_caption, target_caption, truncate=truncate)
    z = slerp(zi[0], z_d, t)                                             # [T, D]
    text = caption_inputs(pipe, caption, truncate=truncate)
    prog("DDIM inversion")
    x_T = invert(pipe, decoder_input(pipe, [rgb]), zi, text, steps=steps,
                 guidance_scale=guidance_scale, refine_iters=refine_iters, clip_range=clip_range)
    prog("DDIM decoding")
    x = ddim_decode(pipe, z, jax.numpy.repeat(x_T, t.size, axis=0), text, eta=0.0, steps=steps,
                    guidance_scale=guidance_scale, clip_range=clip_range)
    low = to_uint8(x)
    _, k_up = jax.random.split(seed_key(seed))
    x = _upsample(pipe, x, k_up, upsample, shared_noise=True, progress=prog)
    prog.finish()
    return TextDiff(to_uint8(x), low, t, np.asarray(z_d))


def zero_shot(pipe, image_embed, labels: Sequence[str], logit_scale: float | None = None, *,
              truncate: bool = False):
    """(probabilities [L], cosines [L]) of ``labels`` for one z_i [D]: softmax over
    ``logit_scale`` * cosine (default CLIP's learned exp(logit_scale), capped at 100)."""
    if logit_scale is not None:
        logit_scale = check_float("logit_scale", logit_scale, lo=0.0, hi=1000.0)
    z_t = jnp.asarray(pipe.encode_text(list(labels), truncate=truncate).text_embed, jnp.float32)
    zi = jnp.asarray(image_embed, jnp.float32).reshape(-1)
    unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    cos = unit(z_t) @ unit(zi)
    if logit_scale is None:
        logit_scale = min(float(np.exp(np.asarray(pipe.clip.logit_scale[...], np.float64))), 100.0)
    probs = jax.nn.softmax(float(logit_scale) * cos)
    return np.asarray(probs), np.asarray(cos)


def probe(pipe, image, labels: Sequence[str], num_reconstructions: int = 4, seed: int = 0, *,
          logit_scale: float | None = None, upsample: int | None = None,
          decoder_settings: dict | None = None, progress: Callable | None = None,
          truncate: bool = False) -> Probe:
    """The typographic-attack probe (paper section 3.4, figure 8): CLIP's zero-shot
    probabilities of ``labels`` for the image, beside ``num_reconstructions`` samples of the
    decoder from the image's z_i (the pipeline's decoder sampler and guidance, overridable with
    ``decoder_settings`` such as ``{'steps': 25}``; the empty caption)."""
    labels = list(labels)
    if not labels:
        raise ApplicationError("Give at least one label to probe (e.g. --label 'an apple').")
    for i, label in enumerate(labels):
        _check_caption(f"label {i}", label)
    check_int("num_reconstructions", num_reconstructions, lo=0)
    check_int("seed", seed, lo=0, hi=2 ** 64 - 1)
    if logit_scale is not None:
        check_float("logit_scale", logit_scale, lo=0.0, hi=1000.0)
    r = int(num_reconstructions)
    n_up = _n_upsample(pipe, upsample)
    prog = _Progress(progress, 2 + (n_up if r else 0))
    rgb = _as_image(image)
    prog("CLIP zero-shot")
    zi = image_embeds(pipe, [rgb])
    probs, cos = zero_shot(pipe, zi[0], labels, logit_scale, truncate=truncate)
    k_dec, k_up = jax.random.split(seed_key(seed))
    if r:
        prog("decoding")
        x = pipe.decode(jax.numpy.repeat(zi, r, axis=0), caption_inputs(pipe), k_dec,
                        num_images=r, **(decoder_settings or {}))
        low = to_uint8(x)
        x = _upsample(pipe, x, k_up, upsample, shared_noise=False, progress=prog)
        images = to_uint8(x)
    else:
        images = low = np.zeros((0, 1, 1, 3), np.uint8)
    prog.finish()
    return Probe(labels, probs, cos, images, low)


__all__ = ["ApplicationError", "Interpolation", "MODES", "Probe", "TextDiff", "Variations",
           "caption_inputs", "ddim_decode", "ddim_spec", "ddim_timesteps", "decoder_input", "image_embeds", "interpolate",
           "invert", "load_image", "probe", "reconstruct", "slerp", "text_diff_vector",
           "textdiff", "upsample_stages", "variations", "zero_shot"]
