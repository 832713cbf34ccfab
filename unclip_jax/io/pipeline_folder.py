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
parameters). Integer buffers are stored as they are.

Writes are atomic: files go to a temporary name in the same folder and are renamed over the
old one, so an interrupted save leaves the previous good file (and manifest) in place. The
tensors are read and written by :mod:`unclip_jax.io.safetensors`.
Every refusal is a :class:`FolderError` (a :class:`unclip_jax.errors.UserError`) naming what is
wrong and what to do: a missing folder or manifest, an unknown format or version, an unknown
component, and missing / unexpected / misshapen tensors listed by name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
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
from unclip_jax.io import paths, safetensors
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
    """Rebuild the config dataclass of manifest class ``cls`` from its stored fields."""
    if cls not in _REGISTRY:
        raise FolderError(f"{where}: unknown component class {cls!r}; this version of unclip-jax "
                          f"reads {', '.join(CLASSES)}.")
    config_cls = _REGISTRY[cls][0]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise FolderError(f"{where}: config keys {unknown} are not fields of {config_cls.__name__}; "
                          "the folder was written by another version of unclip-jax.")
    fields = {k: tuple(_tuplify(v)) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return config_cls(**fields)
    except (TypeError, ValueError) as e:
        raise FolderError(f"{where}: invalid {config_cls.__name__}: {e}") from None


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
    """The validated manifest of a pipeline folder."""
    folder = paths.check(folder)
    _check_folder(folder)
    path = manifest_path(folder)
    if not paths.isfile(path):
        raise FolderError(f"{folder} has no {MANIFEST}: it is not an unclip-jax pipeline folder "
                          "(write one with UnCLIPPipeline.save_pretrained, or convert a diffusers "
                          "folder with `unclip-jax convert --from diffusers SRC --out DST`).")
    try:
        with paths.open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FolderError(f"{path} is not valid JSON ({e}); the folder is damaged, re-export it.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise FolderError(f"{path} has format {got!r}, expected {FORMAT!r}: this is not an "
                          "unclip-jax pipeline manifest.")
    if manifest.get("version") != VERSION:
        raise FolderError(f"{path} is format version {manifest.get('version')!r}; this unclip-jax "
                          f"reads version {VERSION}. Use the unclip-jax release that wrote it, or "
                          "re-export the folder.")
    comps = manifest.setdefault("components", {})
    if not isinstance(comps, dict):
        raise FolderError(f"{path}: 'components' must be an object of name -> entry.")
    for name, entry in comps.items():
        if not isinstance(entry, dict) or not {"class", "config", "weights"} <= set(entry):
            raise FolderError(f"{path}: component {name!r} needs 'class', 'config' and 'weights'.")
        if entry["class"] not in CLASSES:
            raise FolderError(f"{path}: component {name!r} has unknown class {entry['class']!r}; "
                              f"known: {', '.join(CLASSES)}.")
    manifest.setdefault("tokenizer", {})
    manifest.setdefault("sampling", {})
    return manifest


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
        if dtype is not None and (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
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
    if not name or not name.replace("_", "").isalnum():
        raise FolderError(f"Component name {name!r} must be letters, digits and underscores.")
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
    weights = paths.join(folder, entry["weights"])
    if not paths.isfile(weights):
        raise FolderError(f"{folder} lacks {entry['weights']}, the weights of component {name!r}; "
                          "the folder is incomplete: re-export it.")
    try:
        tensors = safetensors.TensorFiles([weights])
    except safetensors.SafetensorsError as e:
        raise FolderError(f"{weights} cannot be read ({e}); re-export the folder.") from None

    abstract = abstract_init(lambda: build(config))
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
    arrays = stack_layer_names({k: tensors.read(k) for k in shapes},
                               {k: tuple(v.shape) for k, v in flat.items()})
    for key, var in flat.items():
        var.set_value(jnp.asarray(arrays[key]).astype(var.dtype))
    return nnx.merge(graphdef, state)


def save_folder_atomically(folder: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_folder)`` to fill a fresh sibling folder, then swap it in for ``folder``:
    an existing good folder is replaced only once the new one is complete (remotely, where
    there is no rename, the old folder is deleted and the new one copied in its place)."""
    folder = paths.absolute(folder)
    parent = paths.dirname(folder)
    paths.makedirs(parent)
    if paths.isfile(folder):
        raise FolderError(f"{folder} exists and is not a folder; choose another output path.")
    if paths.isdir(folder) and paths.listdir(folder) and not paths.isfile(manifest_path(folder)):
        raise FolderError(f"{folder} exists, is not empty and is not an unclip-jax pipeline "
                          "folder; refusing to replace it. Choose an empty or new folder.")
    if paths.is_remote(folder):
        tmp = paths.join(parent, f".{paths.basename(folder)}.{uuid.uuid4().hex}.tmp")
        try:
            write(tmp)
            paths.rmtree(folder)
            paths.replace(tmp, folder)
        except BaseException:
            paths.rmtree(tmp)
            raise
        return
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~umask())   # mkdtemp makes 0700
        write(tmp)
        if os.path.isdir(folder):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
