"""The unclip-jax pipeline folder: one manifest (unclip.json), one safetensors file per component.

    DIR/unclip.json
        {"format": "unclip-jax-pipeline", "version": 1,
         "components": {NAME: {"class": CLASS, "config": {dataclass fields},
                               "weights": "NAME.safetensors"}},
         "tokenizer": {"context_length": 77, ...},
         "sampling": {per-stage defaults, see unclip_jax.pipeline.DEFAULT_SETTINGS}}
    DIR/NAME.safetensors
        the WHOLE ``nnx.state(module)`` (parameters and buffers: the diffusion prior's
        clip_mean / clip_std, the AR prior's PCA quantizer, ...) flattened with '.'-joined paths,
        e.g. ``unet.down.0.res.1.conv1.kernel``, in our layout (kernels [in, out], HWIO).

CLASS is one of ``CLASSES``: 'CLIP' (both towers), 'CLIPText' (the text tower and its projection
only, :class:`unclip_jax.clip.text_encoder.CLIPTextEncoder`: what a diffusers UnCLIPPipeline
ships, stored under the name 'text_encoder'), 'DiffusionPrior', 'ARPrior', 'Decoder',
'SuperRes'. Usual NAMEs: 'clip' or 'text_encoder', 'prior' (and/or 'ar_prior'), 'decoder',
'super_res_first', 'super_res_last'.

Tensors may be stored in a narrower float type (``save_component(..., dtype='bfloat16')``); each
is cast on load to the dtype of the variable it fills (the config's ``param_dtype`` for
parameters). Integer buffers are stored as they are; a tensor is never cast between integer and
float types (a FolderError names it).

A folder is untrusted input: :func:`read_manifest` checks every field (types, finite numbers in
range, each ``weights`` a relative path that stays inside the folder, symlinks resolved locally,
components the pipeline uses together of matching sizes), and each safetensors header is checked
before any data is read (:mod:`unclip_jax.io.safetensors`).

Writes never lose what is not ours (:func:`save_folder_atomically`): the new files are written
into a temporary sibling folder, then moved in; only the manifest and the weights files it lists
are replaced, the rest of the folder is kept; a non-empty folder that is not a pipeline folder
is refused; an interrupted save leaves the old pipeline loadable.
Every refusal is a :class:`FolderError` (a :class:`unclip_jax.errors.UserError`) naming what is
wrong and what to do: a missing folder or manifest, an unknown format or version, an unknown
component, a field of the wrong type, and missing / unexpected / misshapen tensors listed by name.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import re
import shutil
import tempfile
import typing
import uuid
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from unclip_jax.clip.model import CLIP, CLIPConfig
from unclip_jax.clip.text_encoder import CLIPTextEncoder
from unclip_jax.errors import UserError
from unclip_jax.io import outputs, paths, safetensors
from unclip_jax.io.atomic import atomic_write, umask
from unclip_jax.models.ar_prior import ARPrior, ARPriorConfig
from unclip_jax.models.decoder import Decoder, DecoderConfig
from unclip_jax.models.diffusion_prior import DiffusionPrior, PriorConfig
from unclip_jax.models.layers import abstract_init
from unclip_jax.models.transformer import (stack_layer_names, unstack_layer_names,
                                           unstack_layer_shapes)
from unclip_jax.models.upsampler import SuperRes, SuperResConfig

FORMAT = "unclip-jax-pipeline"
VERSION = 1
MANIFEST = "unclip.json"
CLASSES = ("CLIP", "CLIPText", "DiffusionPrior", "ARPrior", "Decoder", "SuperRes")
COMPONENT_NAMES = ("clip", "text_encoder", "prior", "ar_prior", "decoder", "super_res_first",
                   "super_res_last")


class FolderError(UserError, ValueError):
    """A pipeline folder that cannot be read or written as asked; the message says what to do."""


def is_text_encoder(module) -> bool:
    """Whether ``module`` is the text-only CLIP (stored as class 'CLIPText')."""
    return isinstance(module, CLIPTextEncoder)


# --------------------------------------------------------------------------------------------
# Classes: name <-> (config dataclass, builder)
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, tuple[type, Callable]] = {
    "CLIP": (CLIPConfig, lambda c: CLIP(c, rngs=nnx.Rngs(0))),
    "CLIPText": (CLIPConfig, lambda c: CLIPTextEncoder(c, nnx.Rngs(0))),
    "DiffusionPrior": (PriorConfig, lambda c: DiffusionPrior(c, rngs=nnx.Rngs(0))),
    "ARPrior": (ARPriorConfig, lambda c: ARPrior(c, rngs=nnx.Rngs(0))),
    "Decoder": (DecoderConfig, lambda c: Decoder(c, nnx.Rngs(0))),
    "SuperRes": (SuperResConfig, lambda c: SuperRes(c, nnx.Rngs(0))),
}


def class_name(module) -> str:
    """The manifest class of a module (a FolderError for anything else)."""
    if is_text_encoder(module):
        return "CLIPText"
    for cls in (CLIP, DiffusionPrior, ARPrior, Decoder, SuperRes):
        if isinstance(module, cls):
            return cls.__name__
    raise FolderError(f"Cannot save a {type(module).__name__}: a pipeline component must be one "
                      f"of {', '.join(CLASSES)}.")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    try:  # a numpy / jax dtype or scalar type
        return np.dtype(value).name
    except TypeError:
        raise FolderError(f"Config value {value!r} ({type(value).__name__}) cannot be stored in "
                          f"{MANIFEST}.") from None


def config_to_dict(config) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict (tuples as lists, dtypes as names)."""
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def config_from_dict(cls: str, fields: dict[str, Any], where: str):
    """Rebuild the config dataclass of manifest class ``cls`` from its stored fields, each
    checked against the field's type (one FolderError naming the field)."""
    if not isinstance(cls, str) or cls not in _REGISTRY:
        raise FolderError(f"{where}: unknown component class {_short(cls)}; this version of "
                          f"unclip-jax reads {', '.join(CLASSES)}.")
    config_cls = _REGISTRY[cls][0]
    if not isinstance(fields, dict):
        raise FolderError(f"{where}: 'config' must be an object of field -> value, not a "
                          f"{type(fields).__name__}; the folder is damaged: re-export it.")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise FolderError(f"{where}: config keys {_short(unknown)} are not fields of "
                          f"{config_cls.__name__}; the folder was written by another version of "
                          "unclip-jax.")
    hints = typing.get_type_hints(config_cls)
    for key, value in fields.items():
        problem = _field_problem(hints[key], value)
        if problem:
            raise FolderError(f"{where}: config field {key!r} is {_short(value)}, {problem}; "
                              "the manifest is damaged: re-export the folder.")
    fields = {k: tuple(_tuplify(v)) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return config_cls(**fields)
    except Exception as e:  # noqa: BLE001 - a config's own checks raise several kinds
        raise FolderError(f"{where}: invalid {config_cls.__name__}: {e}") from None


MAX_LAYERS = 4096
"""The most layers (blocks) a config read from a file may ask for: building more would take
forever before the weights could even be compared."""


def config_field_problems(config_cls: type, fields: dict[str, Any]) -> list[str]:
    """'FIELD is VALUE, expected ...' for every field of ``fields`` (JSON values, lists for
    tuples) that cannot fill the dataclass ``config_cls`` (the checks of the manifest), and
    for layer counts above :data:`MAX_LAYERS`."""
    hints = typing.get_type_hints(config_cls)
    out = [f"{k} is {_short(v)}, more than {MAX_LAYERS} layers" for k, v in fields.items()
           if k in _LAYER_FIELDS and _is_int(v) and v > MAX_LAYERS]
    for key, value in fields.items():
        if key in hints:
            problem = _field_problem(hints[key], list(value) if isinstance(value, tuple)
                                     else value)
            if problem:
                out.append(f"{key} is {_short(value)}, {problem}")
    return out


_MAX_INT = 2**31 - 1
_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile manifest can hold huge values)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(v) -> bool:
    return type(v) is int


def _is_number(v) -> bool:
    return type(v) in (int, float)


def _field_problem(hint, value) -> str | None:
    """Why ``value`` cannot fill a config field annotated ``hint`` (None when it can). A union
    (``int | tuple``: one value or one per level) takes what any of its members takes."""
    if hint is Any:   # dtype, param_dtype
        return None if value in _DTYPE_NAMES else f"expected one of {', '.join(_DTYPE_NAMES)}"
    args = typing.get_args(hint)
    if args and typing.get_origin(hint) is not tuple:
        if value is None and type(None) in args:
            return None
        problems = [_field_problem(a, value) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else " or ".join(problems)
    if hint is bool:
        return None if type(value) is bool else "expected true or false"
    if hint is int:
        if not _is_int(value):
            return "expected an integer"
        return None if 0 <= value <= _MAX_INT else f"expected an integer in [0, {_MAX_INT}]"
    if hint is float:
        if not _is_number(value):
            return "expected a number"
        return None if math.isfinite(value) else "expected a finite number"
    if hint is str:
        return None if isinstance(value, str) and len(value) < 100 else "expected a short string"
    if hint is tuple or typing.get_origin(hint) is tuple:
        return None if _small_list(value) else ("expected a list of at most 64 entries (whole "
                                                "numbers, finite numbers, true/false or null)")
    return None


def _small_list(value, depth: int = 0) -> bool:
    """A JSON list a tuple field can hold: at most 64 entries of non-negative integers up to
    2**31 - 1, finite numbers, booleans, nulls, short strings or such lists (two deep)."""
    if not isinstance(value, list) or len(value) > 64 or depth > 2:
        return False
    for v in value:
        if isinstance(v, list):
            if not _small_list(v, depth + 1):
                return False
        elif not (v is None or type(v) is bool or (_is_int(v) and 0 <= v <= _MAX_INT)
                  or (type(v) is float and math.isfinite(v))
                  or (isinstance(v, str) and len(v) < 100)):
            return False
    return True


def _tuplify(v):
    return [tuple(_tuplify(x)) if isinstance(x, list) else x for x in v]


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------

def manifest_path(folder: str) -> str:
    return paths.join(folder, MANIFEST)


def _check_folder(folder: str) -> None:
    if not paths.isdir(folder):
        raise FolderError(f"Pipeline folder {folder!r} does not exist; pass a folder written by "
                          "UnCLIPPipeline.save_pretrained or `unclip-jax convert`.")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The validated manifest of a pipeline folder: every field is checked (types, ranges, the
    weights paths staying inside the folder) and a problem is one FolderError naming it."""
    folder = paths.check(folder)
    _check_folder(folder)
    path = manifest_path(folder)
    if not paths.isfile(path):
        raise FolderError(f"{folder} has no {MANIFEST}: it is not an unclip-jax pipeline folder "
                          "(write one with UnCLIPPipeline.save_pretrained, or convert a diffusers "
                          "folder with `unclip-jax convert --from diffusers SRC --out DST`).")
    if not paths.inside(path, folder):
        raise FolderError(f"{path} is a symlink that leads out of the folder; a pipeline "
                          "folder's files must lie inside it. Copy the manifest in instead.")
    try:
        size = paths.getsize(path)
    except OSError as e:
        raise FolderError(f"{path} cannot be read ({e}).") from None
    if size > MAX_MANIFEST_BYTES:
        raise FolderError(f"{path} is {size} bytes, more than a manifest ever needs "
                          f"({MAX_MANIFEST_BYTES}); the folder is damaged: re-export it.")
    try:
        with paths.open(path, encoding="utf-8") as f:
            manifest = json.loads(f.read(), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FolderError(f"{path} is not valid JSON ({_short(str(e), 120)}); the folder is "
                          "damaged: re-export it.") from None
    except OSError as e:
        raise FolderError(f"{path} cannot be read ({e}).") from None
    validate_manifest(manifest, folder)
    manifest.setdefault("components", {})
    manifest.setdefault("tokenizer", {})
    manifest.setdefault("sampling", {})
    return manifest


MAX_MANIFEST_BYTES = 16 * 2**20
_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def validate_manifest(manifest: Any, folder: str) -> None:
    """Check a parsed manifest's structure and every field; one FolderError names the first
    problem and what to do. Weights paths must be relative, inside ``folder`` (symlinks
    resolved, locally)."""
    path = manifest_path(folder)

    def bad(what: str, fix: str = "the manifest is damaged: re-export the folder") -> FolderError:
        return FolderError(f"{path}: {what}; {fix}.")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise FolderError(f"{path} has format {_short(got)}, expected {FORMAT!r}: this is not an "
                          "unclip-jax pipeline manifest.")
    version = manifest.get("version")
    if not _is_int(version) or version != VERSION:
        raise FolderError(f"{path} is format version {_short(version)}; this unclip-jax "
                          f"reads version {VERSION}. Use the unclip-jax release that wrote it, or "
                          "re-export the folder.")
    comps = manifest.get("components", {})
    if not isinstance(comps, dict):
        raise bad(f"'components' must be an object of name -> entry, not a "
                  f"{type(comps).__name__}")
    files: dict[str, str] = {}
    for name, entry in comps.items():
        if not _NAME.match(name):
            raise bad(f"component name {_short(name)} must be letters, digits and underscores")
        where = f"component {name!r}"
        if not isinstance(entry, dict):
            raise bad(f"{where} must be an object with 'class', 'config' and 'weights', not a "
                      f"{type(entry).__name__}")
        lacking = [k for k in ("class", "config", "weights") if k not in entry]
        if lacking:
            raise bad(f"{where} lacks {', '.join(repr(k) for k in lacking)} (it needs 'class', "
                      "'config' and 'weights')")
        if not isinstance(entry["class"], str) or entry["class"] not in CLASSES:
            raise bad(f"{where} has unknown class {_short(entry['class'])} (known: "
                      f"{', '.join(CLASSES)})", "use the unclip-jax release that wrote it, or "
                      "re-export the folder")
        weights_problem(folder, entry["weights"], f"{path}: {where}")
        if entry["weights"] in files:
            raise bad(f"components {files[entry['weights']]!r} and {name!r} share the weights "
                      f"file {entry['weights']!r}")
        files[entry["weights"]] = name
        config_from_dict(entry["class"], entry["config"], f"{path} {where}")
    _validate_tokenizer(manifest.get("tokenizer", {}), bad)
    _validate_sampling(manifest.get("sampling", {}), bad)
    _check_compatible(comps, manifest.get("tokenizer", {}), bad)


# well-known component names -> the classes the pipeline can use under them
_NAME_CLASSES = {"clip": ("CLIP", "CLIPText"), "text_encoder": ("CLIP", "CLIPText"),
                 "prior": ("DiffusionPrior", "ARPrior"), "ar_prior": ("ARPrior", "DiffusionPrior"),
                 "decoder": ("Decoder",)}


def _check_compatible(comps: dict, tok: dict, bad) -> None:
    """Components that cannot work together (mixed from runs of other sizes) are refused here,
    not by a shape error in the middle of sampling."""
    for name, allowed in _NAME_CLASSES.items():
        if name in comps and comps[name]["class"] not in allowed:
            raise bad(f"component {name!r} has class {comps[name]['class']!r}; the pipeline uses "
                      f"{name!r} as a {' or '.join(allowed)}",
                      "rename the component or re-export the folder")
    text = next((n for n in ("clip", "text_encoder") if n in comps), None)
    if text is None:
        return
    t = comps[text]["config"]
    embed, width = t.get("embed_dim", 512), t.get("text_width", 512)
    ctx, vocab = t.get("context_length", 77), t.get("vocab_size", 49408)
    if tok.get("context_length") is not None and tok["context_length"] > ctx:
        raise bad(f"tokenizer.context_length {tok['context_length']} is longer than component "
                  f"{text!r} reads ({ctx} tokens)", "fix the manifest or re-export the folder")
    if tok.get("pad_id") is not None and tok["pad_id"] >= vocab:
        raise bad(f"tokenizer.pad_id {tok['pad_id']} is not a token of component {text!r} "
                  f"(vocab_size {vocab})", "fix the manifest or re-export the folder")
    needs = []
    for name, entry in comps.items():
        if name not in _NAME_CLASSES:   # other names (an experiment's 'prior2') are not used
            continue                    # by the pipeline together with the text encoder
        c = entry["config"]
        if entry["class"] in ("DiffusionPrior", "ARPrior"):
            needs.append((name, "embed_dim", c.get("embed_dim"), embed, "embed_dim"))
        if entry["class"] == "Decoder":
            needs.append((name, "clip_dim", c.get("clip_dim", 768), embed, "embed_dim"))
            if c.get("text_encoder", "clip") == "clip":
                w = c.get("text_width") or c.get("clip_dim", 768)
                needs.append((name, "text_width", w, width, "text_width"))
    for name, field, got, want, theirs in needs:
        if got is not None and got != want:
            raise bad(f"component {name!r} has {field} {got}, but component {text!r} has "
                      f"{theirs} {want}: they were not trained together",
                      "export every component from matching runs")


def weights_problem(folder: str, weights: Any, where: str) -> None:
    """Refuse a component's ``weights`` entry that is not a relative path inside ``folder``."""
    problem = paths.relative_problem(weights)
    if problem is None and not paths.inside(paths.join(folder, weights), folder):
        problem = "is a symlink (or under one) that leads out of the folder"
    if problem:
        raise FolderError(f"{where}: 'weights' {_short(weights)} {problem}; it must name a file "
                          "inside the pipeline folder, e.g. \"decoder.safetensors\". Fix the "
                          "manifest or re-export the folder.")


def _validate_tokenizer(tok: Any, bad) -> None:
    if not isinstance(tok, dict):
        raise bad(f"'tokenizer' must be an object, not a {type(tok).__name__}")
    for key in ("kind", "vocab"):
        if key in tok and not isinstance(tok[key], str):
            raise bad(f"tokenizer.{key} is {_short(tok[key])}, expected a string")
    ctx = tok.get("context_length")
    if ctx is not None and not (_is_int(ctx) and 3 <= ctx <= 100_000):
        raise bad(f"tokenizer.context_length is {_short(ctx)}, expected an integer in "
                  "[3, 100000]")
    pad = tok.get("pad_id")
    if pad is not None and not (_is_int(pad) and 0 <= pad < 10_000_000):
        raise bad(f"tokenizer.pad_id is {_short(pad)}, expected a token id (an integer >= 0)")


# key -> (check, what it must be) for the sampling settings (unclip_jax.pipeline.settings
# validates their meaning when the pipeline is built; these are the types and ranges).
def _int_in(lo, hi):
    return lambda v: _is_int(v) and lo <= v <= hi


def _num_in(lo, hi, *, open_lo=False):
    return lambda v: (_is_number(v) and math.isfinite(v) and (v > lo if open_lo else v >= lo)
                      and v <= hi)


_SAMPLING_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "sampler": (lambda v: isinstance(v, str), "a sampler name"),
    "schedule": (lambda v: isinstance(v, str), "a schedule name"),
    "variance": (lambda v: v is None or isinstance(v, str), "a variance name or null"),
    "prediction_type": (lambda v: isinstance(v, str), "a prediction type name"),
    "steps": (_int_in(1, 100_000), "an integer in [1, 100000]"),
    "num_train_steps": (_int_in(1, 100_000), "an integer in [1, 100000]"),
    "float32_cumprod": (lambda v: type(v) is bool, "true or false"),
    "eta": (_num_in(0.0, 1e6), "a finite number >= 0"),
    "clip_range": (lambda v: v is None or _num_in(0.0, 1e9, open_lo=True)(v),
                   "a finite number > 0, or null"),
    "guidance_scale": (_num_in(-1e6, 1e6), "a finite number"),
    "best_of": (_int_in(1, 10_000), "an integer in [1, 10000]"),
    "size": (_int_in(1, 65_536), "an image size in [1, 65536]"),
    "start_t": (lambda v: v is None or _int_in(0, 100_000)(v), "an integer >= 0, or null"),
    "models": (lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v),
               "a list of component names"),
    "temperature": (_num_in(0.0, 1e6, open_lo=True), "a finite number > 0"),
    "top_p": (_num_in(0.0, 1.0, open_lo=True), "a number in (0, 1]"),
    "dot_percentile": (_num_in(0.0, 100.0), "a number in [0, 100]"),
}


def _validate_sampling(sampling: Any, bad) -> None:
    if not isinstance(sampling, dict):
        raise bad(f"'sampling' must be an object of stage -> settings, not a "
                  f"{type(sampling).__name__}")
    for stage, value in sampling.items():
        if stage == "super_res":
            if not isinstance(value, list):
                raise bad(f"sampling.super_res must be a list of stage settings, not a "
                          f"{type(value).__name__}")
            stages = [(f"sampling.super_res[{i}]", v) for i, v in enumerate(value)]
        else:
            label = stage if _NAME.match(stage) else _short(stage, 30)
            stages = [(f"sampling.{label}", value)]
        for where, settings in stages:
            if not isinstance(settings, dict):
                raise bad(f"{where} must be an object of setting -> value, not a "
                          f"{type(settings).__name__}")
            for key, v in settings.items():
                check, what = _SAMPLING_TYPES.get(key, (None, ""))
                if check is not None and not check(v):
                    raise bad(f"{where}.{key} is {_short(v)}, expected {what}",
                              "fix the manifest or re-export the folder")


def save_manifest(folder: str | os.PathLike, *, components: dict | None = None,
                  tokenizer: dict | None = None, sampling: dict | None = None,
                  replace: bool = False) -> dict[str, Any]:
    """Write (atomically) the manifest of ``folder``, merged into an existing one unless
    ``replace``; ``components`` entries are added or replaced by name. Returns the manifest."""
    folder = paths.check(folder)
    paths.makedirs(folder)
    if not replace and paths.isfile(manifest_path(folder)):
        manifest = read_manifest(folder)
    else:
        manifest = {"format": FORMAT, "version": VERSION, "components": {}, "tokenizer": {},
                    "sampling": {}}
    manifest["components"].update(components or {})
    if tokenizer is not None:
        manifest["tokenizer"] = dict(tokenizer)
    if sampling is not None:
        manifest["sampling"] = _jsonable(sampling)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(manifest_path(folder), lambda f: f.write(text), mode="w")
    return manifest


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------

def flat_state(module) -> dict[str, Any]:
    """'.'-joined path -> variable, for the whole ``nnx.state(module)``."""
    return {".".join(str(p) for p in path): var
            for path, var in nnx.state(module).flat_state()}


def module_tensors(module, dtype=None) -> dict[str, np.ndarray]:
    """The whole state as numpy arrays, floats optionally cast to ``dtype``."""
    out = {}
    for name, var in flat_state(module).items():
        a = np.asarray(jax.device_get(var[...]))
        if dtype is not None and (np.issubdtype(a.dtype, np.floating)
                                  or a.dtype.name == "bfloat16"):
            a = a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
        out[name] = a
    return unstack_layer_names(out)  # the per-layer names of stacked Transformer layers


def component_entry(name: str, module) -> dict[str, Any]:
    return {"class": class_name(module), "config": config_to_dict(module.config),
            "weights": f"{name}.safetensors"}


def save_component(folder: str | os.PathLike, name: str, module, *, dtype=None,
                   update_manifest: bool = True) -> dict[str, Any]:
    """Write ``folder/NAME.safetensors`` (atomically) and the component's manifest entry.

    ``dtype`` (e.g. 'bfloat16' or 'float16') narrows float tensors for storage; they are cast
    back to the config's dtypes on load. Returns the manifest entry.
    """
    folder = paths.check(folder)
    if not isinstance(name, str) or not _NAME.match(name):
        raise FolderError(f"Component name {name!r} must be 1 to 64 letters (a-z, A-Z), digits "
                          "and underscores.")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise FolderError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}.")
    entry = component_entry(name, module)
    paths.makedirs(folder)
    safetensors.write(paths.join(folder, entry["weights"]), module_tensors(module, dtype),
                      metadata={"format": FORMAT, "class": entry["class"]})
    if update_manifest:
        save_manifest(folder, components={name: entry})
    return entry


def load_component(folder: str | os.PathLike, name: str, manifest: dict | None = None, *,
                   config_overrides: dict | None = None):
    """Build the module stored as component ``name`` of ``folder``.

    Every variable of the module must come from exactly one tensor of its file, and every tensor
    must be used; otherwise one FolderError lists every missing, unexpected and misshapen tensor.
    ``config_overrides`` replace config fields that do not change shapes (e.g. ``dtype``).
    """
    folder = paths.check(folder)
    manifest = manifest or read_manifest(folder)
    comps = manifest["components"]
    if name not in comps:
        raise FolderError(f"{folder} has no component {name!r}; it holds "
                          f"{', '.join(sorted(comps)) or 'none'}.")
    entry = comps[name]
    where = f"{manifest_path(folder)} component {name!r}"
    fields = dict(entry["config"])
    fields.update(config_overrides or {})
    config = config_from_dict(entry["class"], fields, where)
    build = _REGISTRY[entry["class"]][1]
    weights_problem(folder, entry["weights"], where)
    weights = paths.join(folder, entry["weights"])
    if not paths.isfile(weights):
        raise FolderError(f"{folder} lacks {entry['weights']}, the weights of component {name!r}; "
                          "the folder is incomplete: re-export it.")
    try:
        tensors = safetensors.TensorFiles([weights])
    except safetensors.SafetensorsError as e:
        raise FolderError(f"{e} (component {name!r} of {folder}: re-export the folder)") from None
    _check_layer_counts(config, len(tensors.names()), where, weights)

    try:
        abstract = abstract_init(lambda: build(config))
    except Exception as e:  # noqa: BLE001 - a hostile config can break a constructor anywhere
        raise FolderError(f"{where}: its config does not describe a {entry['class']} that can be "
                          f"built ({type(e).__name__}: {_short(str(e), 200)}); re-export the "
                          "folder.") from None
    graphdef, state = nnx.split(abstract)
    flat = {".".join(str(p) for p in path): var for path, var in state.flat_state()}
    shapes = unstack_layer_shapes({k: tuple(v.shape) for k, v in flat.items()})  # per layer
    available = tensors.names()
    missing = sorted(set(shapes) - available)
    unexpected = sorted(available - set(shapes))
    misshapen = sorted(f"{k} (file {tensors.shape(k)}, model {shapes[k]})"
                       for k in set(shapes) & available if tensors.shape(k) != shapes[k])
    if missing or unexpected or misshapen:
        lines = [f"{weights} does not match the {entry['class']} its manifest entry describes:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected))
        if misshapen:
            lines.append(f"  misshapen tensors ({len(misshapen)}): " + ", ".join(misshapen))
        lines.append("Re-export the folder; the weights and the manifest must be written together.")
        raise FolderError("\n".join(lines))
    wanted = _per_layer_dtypes(flat)
    try:
        arrays = stack_layer_names(
            {k: safetensors.cast_checked(tensors.read(k), wanted[k], f"{weights}: tensor {k!r}")
             for k in shapes},
            {k: tuple(v.shape) for k, v in flat.items()})
    except safetensors.SafetensorsError as e:
        raise FolderError(str(e)) from None
    for key, var in flat.items():
        var.set_value(jnp.asarray(arrays[key]).astype(var.dtype))
    return nnx.merge(graphdef, state)


def _per_layer_dtypes(flat: dict) -> dict[str, np.dtype]:
    """Per-layer tensor name -> the numpy dtype of the variable it fills (zero-strided
    placeholders go through the same unstacking as the shapes: nothing is allocated)."""
    fake = {k: np.broadcast_to(np.zeros((), np.dtype(v.dtype)), tuple(v.shape))
            for k, v in flat.items()}
    return {k: a.dtype for k, a in unstack_layer_names(fake).items()}


_LAYER_FIELDS = ("text_layers", "vision_layers", "num_layers", "depth", "num_res_blocks",
                 "xf_layers")


def _check_layer_counts(config, tensor_count: int, where: str, weights: str) -> None:
    """Every layer holds at least one tensor: a config claiming more layers than its file has
    tensors is refused before the model is built (a huge count would take forever to build)."""
    for field in _LAYER_FIELDS:
        n = getattr(config, field, None)
        if isinstance(n, int) and n > tensor_count:
            raise FolderError(f"{where}: config field {field!r} is {n}, more layers than "
                              f"{weights} has tensors ({tensor_count}); the manifest does not "
                              "describe these weights: re-export the folder.")
    levels = len(getattr(config, "channel_mult", ()) or ())
    blocks = getattr(config, "num_res_blocks", 0) or 0
    if levels * max(blocks, 1) > tensor_count:
        raise FolderError(f"{where}: config describes {levels} levels of {blocks} blocks, more "
                          f"than {weights} has tensors ({tensor_count}); re-export the folder.")


def _listed_files(manifest: dict | None) -> set[str]:
    """The files a (validated) manifest owns: itself and every component's weights."""
    if manifest is None:
        return set()
    files = {MANIFEST} | {e["weights"] for e in manifest.get("components", {}).values()}
    for f in list(files):   # a save interrupted mid-switch: the file a backup stands in for
        m = _BACKUP.match(os.path.basename(f))
        if m and m.group(1).endswith(".safetensors"):
            files.add(posixpath.join(posixpath.dirname(f), m.group(1)))
    return files


_BACKUP = re.compile(r"^\.(.+)\.[0-9a-f]{8}\.old$")


def check_output(folder: str | os.PathLike, *, overwrite: bool = True,
                 adding: list[str] | None = None, will_write=(),
                 flag: str = "--out") -> dict | None:
    """Check, before any work, that a pipeline can be written to ``folder``: a new or empty
    folder, or an unclip-jax pipeline folder (replaced only when ``overwrite``). ``adding``:
    the component names a command adds to the folder (export) instead of replacing the whole
    pipeline; then only components already there need ``overwrite``. A non-empty folder that is
    not a pipeline folder is always refused, and so is one holding a file we would write that
    its manifest does not list (``will_write``: such file names). Returns the existing
    manifest (or None)."""
    folder = paths.check(folder)
    if not folder.strip():
        raise FolderError(f"{flag} is empty; give the folder to write the pipeline to.")
    over = "--overwrite" if flag.startswith("--") else "overwrite=True"
    if paths.exists(folder) and not paths.isdir(folder):
        raise FolderError(f"{flag} {folder} exists and is not a folder; choose another output "
                          "path.")
    if not paths.exists(folder):
        outputs.check_folder(folder, flag=flag)   # its parent must be a folder we can write
        return None
    outputs.check_folder(folder, flag=flag)       # permissions
    names = [n for n in paths.listdir(folder)]
    if not names:
        return None
    if MANIFEST not in names:
        raise FolderError(f"{flag} {folder} exists, is not empty and is not an unclip-jax "
                          "pipeline folder; refusing to replace it (nothing there is ours to "
                          "replace). Choose an empty or new folder.")
    try:
        manifest = read_manifest(folder)
    except FolderError as e:
        raise FolderError(f"{flag} {folder} holds a damaged pipeline manifest, so which of its "
                          f"files are ours is unknown; not writing there. Remove "
                          f"{manifest_path(folder)} or choose another folder. ({e})") from None
    comps = manifest["components"]
    if adding is None and not overwrite:
        raise FolderError(f"{flag} {folder} already holds an unclip-jax pipeline "
                          f"({', '.join(sorted(comps)) or 'no components'}). Pass {over} to "
                          f"replace it (only {MANIFEST} and the weights it lists are replaced; "
                          "your other files there are kept), or choose another folder.")
    if adding is not None and not overwrite:
        there = [n for n in adding if n in comps]
        if there:
            raise FolderError(f"{flag} {folder} already has the component(s) "
                              f"{', '.join(there)}. Pass {over} to replace them, or choose "
                              "another folder or --name.")
    ours = _listed_files(manifest)
    for file in [f"{n}.safetensors" for n in adding or ()] + list(will_write):
        if file in names and file not in ours:
            raise FolderError(f"{flag} {folder} holds {file}, which its {MANIFEST} does not "
                              "list (not a file unclip-jax wrote); not replacing it. Move it, "
                              "or choose another folder.")
    return manifest


def save_folder_atomically(folder: str | os.PathLike, write: Callable[[str], None], *,
                           overwrite: bool = True, adding: list[str] | None = None,
                           flag: str = "--out") -> None:
    """Run ``write(tmp_folder)`` to fill a fresh sibling folder with a manifest and the weights
    it adds, then move those files into ``folder``.

    ``folder`` is checked first (:func:`check_output`: new, empty, or a pipeline folder, which
    needs ``overwrite`` unless ``adding`` names only new components). Only our files are
    touched: the new manifest and weights replace the old manifest and the weights it listed
    (weights the new manifest no longer lists are removed); every other file in the folder is
    kept. Locally the switch is crash-safe: until the new manifest is renamed in, the folder's
    manifest points at the old weights (kept under hidden backup names while they are
    replaced), so an interrupted save leaves the old pipeline loadable. A new folder appears
    by one rename. Remotely (no rename) files are copied in, the manifest last."""
    folder = paths.absolute(folder)
    old = check_output(folder, overwrite=overwrite, adding=adding, flag=flag)
    if not paths.is_remote(folder):
        folder = os.path.realpath(folder)   # a symlinked --out: work beside its target
    parent = paths.dirname(folder)
    paths.makedirs(parent)
    remote = paths.is_remote(folder)
    if remote:
        tmp = paths.join(parent, f".{paths.basename(folder)}.{uuid.uuid4().hex}.tmp")
    else:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", suffix=".tmp",
                               dir=parent)
    try:
        if not remote:
            os.chmod(tmp, 0o777 & ~umask())   # mkdtemp makes 0700
        write(tmp)
        if paths.isfile(manifest_path(tmp)):   # never switch to a manifest we would refuse
            validate_manifest(_read_json_file(manifest_path(tmp)), folder)
        if not remote and not (os.path.isdir(folder) and os.listdir(folder)):
            if os.path.isdir(folder):
                os.rmdir(folder)          # an empty folder: the new one takes its place
            os.rename(tmp, folder)
            return
        _move_in(folder, tmp, old, remote)
    finally:
        paths.rmtree(tmp)


def _move_in(folder: str, tmp: str, old: dict | None, remote: bool) -> None:
    """Move the files of ``tmp`` (a manifest and weights) into ``folder``, replacing only the
    files ``old`` (its manifest before) lists; see :func:`save_folder_atomically`."""
    new_files = paths.listdir(tmp)
    if MANIFEST not in new_files:
        raise FolderError(f"Nothing was written for {folder}: no {MANIFEST} was produced.")
    new_manifest = _read_json_file(manifest_path(tmp))
    ours = _listed_files(old)
    existing = set(paths.listdir(folder)) if paths.isdir(folder) else set()
    for f in new_files:
        if paths.isdir(paths.join(tmp, f)):
            raise FolderError(f"Cannot write {folder}: {f} is a folder in the output.")
        if f in existing and f not in ours:
            raise FolderError(f"{folder} holds {f}, which its {MANIFEST} does not list (not a "
                              "file unclip-jax wrote); not replacing it. Move it, or choose "
                              "another folder.")
        if paths.isdir(paths.join(folder, f)):
            raise FolderError(f"{folder}: {f} is a folder where a file would be written; move "
                              "it or choose another folder.")
    weights = [f for f in new_files if f != MANIFEST]
    if remote:
        paths.makedirs(folder)
        for f in weights + [MANIFEST]:
            paths.replace(paths.join(tmp, f), paths.join(folder, f))
    else:
        backups = _back_up_replaced(folder, old, [f for f in weights if f in existing])
        for f in weights:
            os.replace(os.path.join(tmp, f), os.path.join(folder, f))
        os.replace(os.path.join(tmp, MANIFEST), manifest_path(folder))
        _fsync_dir(folder)
        for b in backups:
            os.remove(b)
    keep = _listed_files(new_manifest)
    for f in sorted(ours - keep):   # weights the old manifest listed and the new one does not
        p = paths.join(folder, f)
        # only what we write ourselves: a manifest naming some other file cannot get it deleted
        if _is_weights_name(f) and paths.isfile(p):
            paths.remove(p)


def _is_weights_name(f: str) -> bool:
    """A weights file name we write: NAME.safetensors, or a backup of one mid-switch."""
    m = _BACKUP.match(os.path.basename(f))
    return f.endswith(".safetensors") or bool(m and m.group(1).endswith(".safetensors"))


def _read_json_file(path: str) -> dict:
    with paths.open(path, encoding="utf-8") as f:
        return json.load(f)


def _back_up_replaced(folder: str, old: dict | None, replaced: list[str]) -> list[str]:
    """Before weights files the old manifest lists are replaced: link (or copy) each to a
    hidden backup name and point the old manifest at the backups, so the folder stays a
    loadable (old) pipeline until the new manifest is renamed in. Returns the backups."""
    if old is None or not replaced:
        return []
    tag = uuid.uuid4().hex[:8]
    renamed, backups = {}, []
    for f in replaced:
        backup = os.path.join(folder, f".{os.path.basename(f)}.{tag}.old")
        try:
            os.link(os.path.join(folder, f), backup)
        except OSError:
            shutil.copy2(os.path.join(folder, f), backup)
        renamed[f] = os.path.basename(backup)
        backups.append(backup)
    interim = json.loads(json.dumps(old))
    for entry in interim["components"].values():
        entry["weights"] = renamed.get(entry["weights"], entry["weights"])
    text = json.dumps(interim, indent=2, sort_keys=True) + "\n"
    atomic_write(manifest_path(folder), lambda fh: fh.write(text), mode="w")
    return backups


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
