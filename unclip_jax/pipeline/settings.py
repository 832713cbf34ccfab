"""The pipeline's sampling settings: defaults (Karlo's), presets (the Shapes bundle's), validation.

A pipeline folder's manifest "sampling" section holds these per stage, under the same keys:
'prior', 'ar_prior', 'decoder' (dicts) and 'super_res' (a list, one dict per upsampling stage).
The sampler keys of a stage are :class:`unclip_jax.diffusion.SamplerSpec` fields (sampler, steps,
eta, clip_range, variance, prediction_type, schedule, num_train_steps, float32_cumprod, start_t);
the others are the stage's own (guidance_scale, best_of, models, size, ...).
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Any

import jax
import numpy as np

from unclip_jax.diffusion import SAMPLERS, SamplerSpec, SamplerSpecError, spec_from_settings
from unclip_jax.errors import UserError

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
                    prediction_type="epsilon", uncond_text="empty_caption",
                    caption_tokens=True),
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

_SHAPES_SCHEDULE = dict(schedule="cosine", num_train_steps=1000, float32_cumprod=False)

# Sampling defaults of the bundled Shapes pipeline (chosen with `unclip-jax eval --table`, see
# configs/shapes.py). The decoder's prediction_type (v for the Shapes decoder) is written from
# its training config when it is exported. The upsamplers start from their bicubic input noised
# to t = 60 rather than from pure noise (``start_t``): at 800 training steps they round the
# corners of small squares (judged circles), and the higher they start the more (one-object
# accuracy at 128 px, 160 test captions: 0.85 at t = 60, 0.80 at 120, 0.81 at 200, 0.88 for the
# decoder's own 32 px output); from t = 999 they leave grain.
SHAPES_SAMPLING: dict[str, Any] = {
    "prior": dict(_SHAPES_SCHEDULE, sampler="ddim", steps=16, guidance_scale=1.0,
                  variance="fixed_small_log", clip_range=None, best_of=2, eta=0.0),
    "ar_prior": dict(guidance_scale=1.0, temperature=1.0, top_p=1.0, dot_percentile=50.0,
                     best_of=2),
    "decoder": dict(_SHAPES_SCHEDULE, sampler="unclip", steps=25, guidance_scale=2.0,
                    variance="learned_range", clip_range=1.0, eta=0.0, uncond_text="dropped",
                    caption_tokens=True),
    "super_res": [dict(_SHAPES_SCHEDULE, models=["sr64"], size=64, sampler="ddim", steps=8,
                       variance="fixed_small_log", clip_range=1.0, eta=0.0, start_t=60),
                  dict(_SHAPES_SCHEDULE, models=["sr128"], size=128, sampler="ddim", steps=8,
                       variance="fixed_small_log", clip_range=1.0, eta=0.0, start_t=60)],
}
SAMPLING_PRESETS = {"shapes": SHAPES_SAMPLING}


class PipelineError(UserError, ValueError):
    """A pipeline call that cannot run as asked; the message says what to change."""


class SettingValueError(PipelineError):
    """A number (a count, a scale, a seed) out of its range, not finite, or not a number."""


SEED_LIMIT = 2 ** 64
"""Seeds are integers in [0, SEED_LIMIT): each gives its own random numbers (see seed_key)."""
MAX_GUIDANCE = 1000.0
MAX_ETA = 10.0


def check_int(name: str, value, *, lo: int | None = None, hi: int | None = None,
              error: type = None) -> int:
    """``value`` as an int (an integral float such as 25.0 from JSON is accepted) within
    [lo, hi]; else a SettingValueError (or ``error``) naming ``name``."""
    err = error or SettingValueError
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise err(f"{name} must be an integer, got {value!r}.")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(float(value)) or float(value) != int(value):
            raise err(f"{name} must be an integer, got {value!r}.")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        where = (f"in [{lo}, {hi}]" if lo is not None and hi is not None else
                 f"at least {lo}" if lo is not None else f"at most {hi}")
        raise err(f"{name} must be {where}, got {value}.")
    return value


def check_float(name: str, value, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, error: type = None) -> float:
    """``value`` as a finite float within [lo, hi] ((lo, hi] with ``lo_open``); else a
    SettingValueError (or ``error``) naming ``name``."""
    err = error or SettingValueError
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise err(f"{name} must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise err(f"{name} must be a finite number, got {value}.")
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and value > hi):
        left = "(" if lo_open else "["
        where = (f"in {left}{lo:g}, {hi:g}]" if lo is not None and hi is not None else
                 (f"greater than {lo:g}" if lo_open else f"at least {lo:g}") if lo is not None
                 else f"at most {hi:g}")
        raise err(f"{name} must be {where}, got {value:g}.")
    return value


def check_seed(seed, name: str = "seed") -> int:
    """A seed as an int in [0, 2**64); else a SettingValueError saying the range."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise SettingValueError(f"{name} must be an integer in [0, 2**64), got {seed!r}.")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise SettingValueError(f"{name} must be in [0, 2**64) (0 to {SEED_LIMIT - 1}), got "
                                f"{seed}. Pick a seed in that range.")
    return seed


def seed_key(seed):
    """The jax.random key of ``seed`` in [0, 2**64): all 64 bits count (JAX itself keeps only
    the low 32 of a Python int without x64), and seeds below 2**32 give jax.random.key(seed)."""
    seed = check_seed(seed)
    base = jax.random.key(0)
    if jax.random.key_data(base).shape != (2,):   # another PRNG implementation than threefry
        return jax.random.key(seed % 2 ** 31)
    data = np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(base))


def check_stage(stage: str, s: dict) -> dict:
    """``s`` (a stage's full settings) if valid, else a PipelineError saying what to change."""
    unknown = sorted(set(s) - _STAGE_KEYS[stage])
    if unknown:
        raise PipelineError(f"Unknown {stage} setting(s) {unknown}; known: "
                            f"{sorted(_STAGE_KEYS[stage])}.")
    s = _check_values(stage, dict(s))
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
    if s.get("uncond_text", "empty_caption") not in UNCOND_TEXT:
        raise PipelineError(f"{stage} uncond_text must be one of {UNCOND_TEXT} (what the "
                            f"decoder's training dropped the caption to), got "
                            f"{s['uncond_text']!r}.")
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
    if "sampler" in s:
        stage_spec(stage, s)
    return s


_INTS = {"steps": (1, 100_000), "num_train_steps": (1, 100_000), "best_of": (1, 1000),
         "size": (1, 16384)}
_FLOATS = {"guidance_scale": (0.0, MAX_GUIDANCE, False), "eta": (0.0, MAX_ETA, False),
           "temperature": (0.0, 100.0, True), "top_p": (0.0, 1.0, True),
           "dot_percentile": (0.0, 100.0, False)}
_STRINGS = ("sampler", "variance", "prediction_type", "schedule", "uncond_text")
# The decoder's unconditional text for classifier-free guidance (a decoder with caption tokens:
# CLIP's text states, text_encoder='clip', or its own text Transformer, 'transformer'):
# 'empty_caption' = the encoding of "" (CLIP's states or the empty caption's token ids; Karlo,
# diffusers' UnCLIPPipeline), 'dropped' = z_t zeroed and every token masked out, which is what
# `unclip-jax train`'s caption dropout shows the decoder (its exports write it).
UNCOND_TEXT = ("empty_caption", "dropped")
# caption_tokens=False drops the caption's tokens (out of the decoder's attention; a text
# Transformer's pooled state zeroed too) while z_i and z_t still condition it: the paper's
# "without the text path" comparison on a decoder that has one.


def _check_values(stage: str, s: dict) -> dict:
    """Every value of ``s`` of the right type and range (ints int, floats finite), normalised."""
    for key, value in s.items():
        name = f"{stage} {key}"
        if key in _INTS:
            s[key] = check_int(name, value, lo=_INTS[key][0], hi=_INTS[key][1])
        elif key in _FLOATS:
            lo, hi, lo_open = _FLOATS[key]
            s[key] = check_float(name, value, lo=lo, hi=hi, lo_open=lo_open)
        elif key == "clip_range" and value is not None:
            s[key] = check_float(name, value, lo=0.0, hi=1e6, lo_open=True)
        elif key == "start_t" and value is not None:
            s[key] = check_int(name, value, lo=0)
        elif key in _STRINGS and value is not None and not isinstance(value, str):
            raise SettingValueError(f"{name} must be a name (a string), got {value!r}.")
        elif key in ("float32_cumprod", "caption_tokens") and not isinstance(value, bool):
            raise SettingValueError(f"{name} must be true or false, got {value!r}.")
        elif key == "models" and (not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(m, str) for m in value)):
            raise SettingValueError(f"{name} must be a list of component names, got {value!r}.")
    return s


def stage_spec(stage: str, s: dict, **fixed) -> SamplerSpec:
    """The SamplerSpec of a stage's settings (``fixed``: what the model decides, e.g.
    prediction_type='sample' for the prior, learned_variance for 'ddpm')."""
    try:
        return spec_from_settings(s, **fixed)
    except SamplerSpecError as e:
        raise PipelineError(f"{stage} {e}") from None


def freeze(s: dict) -> tuple:
    """A hashable form of stage settings (a compiled-function cache key)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in s.items()))


def merge_settings(base: dict, over: dict) -> dict:
    """``base`` with the stages of ``over`` (a manifest's "sampling" section) merged in, checked."""
    out = copy.deepcopy(base)
    if over is not None and not isinstance(over, dict):
        raise PipelineError(f"The sampling settings must be a dict of stages, got "
                            f"{type(over).__name__}.")
    for stage, value in (over or {}).items():
        if stage not in STAGES:
            raise PipelineError(f"Unknown sampling stage {stage!r}; known: {STAGES}.")
        if stage == "super_res":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise PipelineError("sampling.super_res must be a list of stage settings.")
            out[stage] = [check_stage(stage, {**DEFAULT_SETTINGS[stage][0], **v}) for v in value]
        else:
            if not isinstance(value, dict):
                raise PipelineError(f"sampling.{stage} must be a dict of settings, got "
                                    f"{type(value).__name__}.")
            out[stage] = check_stage(stage, {**out[stage], **value})
    return out
