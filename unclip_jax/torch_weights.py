"""Reading PyTorch-layout safetensors checkpoints into Flax NNX modules, and writing them back.

Every importer (Hugging Face CLIP, diffusers' prior, decoder and super-resolution UNets) is a
*name table*: our parameter path -> (the checkpoint's tensor name, a layout kind). This module
does the rest, the same way for all of them:

* finds the weights of a folder: ``<stem>.safetensors``, a sharded
  ``<stem>.safetensors.index.json`` or a variant (``<stem>.fp16.safetensors``), every file
  inside the folder (no '..', no absolute names, no symlinks out); pickled ``.bin`` / ``.pt``
  files are refused, never opened (unpickling can run code);
* refuses an integer tensor for a float parameter (or the reverse): never cast;
* checks the table against the file before reading any data: every parameter must come from
  exactly one tensor and every tensor must be used (names in ``ignore`` excepted); otherwise one
  :class:`CheckpointMismatchError` lists every missing, unexpected and misshapen tensor;
* maps the stacked layers of a :class:`unclip_jax.models.transformer.Stack` row by row: tables
  name per-layer paths (``("blocks", 3, "attn", ...)``), as checkpoints do;
* converts layouts: ``'linear'`` torch [out, in] <-> our kernel [in, out]; ``'conv'`` OIHW <-> HWIO;
  ``'copy'`` as is; and fills an abstract (``nnx.eval_shape``) model in place, so the logical-axis
  metadata of its parameters survives.

The files themselves are read and written by :mod:`unclip_jax.io.safetensors`; torch-side files
are written with :data:`TORCH_METADATA`, which transformers and diffusers require.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unclip_jax.errors import UserError
from unclip_jax.io import paths
from unclip_jax.io.safetensors import TensorFiles, dtype_kind
from unclip_jax.models.transformer import layer_paths, unstack_layer_shapes

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
LAYOUTS = ("linear", "conv", "copy")
TORCH_METADATA = {"format": "pt"}  # the safetensors metadata torch-side loaders check

# our parameter path (tuple of attribute names / indices) -> (tensor name, layout kind)
NameTable = dict[tuple, tuple[str, str]]


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that cannot be loaded as asked; the message says what to do."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the model: lists every offending name."""

    def __init__(self, path: str, what: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple, tuple]], hint: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"Checkpoint {path} does not match the {what}:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected))
        for name, got, want in mismatched:
            lines.append(f"  shape mismatch: {name} has shape {got} in the file, the model "
                         f"expects {want} (in the file's layout)")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


def check_folder(path: str, what: str) -> None:
    """Refuse a path that is not an existing folder, saying what was expected there."""
    if not os.path.isdir(path):
        raise CheckpointError(f"Checkpoint folder {path!r} does not exist (or is not a folder); "
                              f"expected {what}.")


MAX_JSON_BYTES = 64 * 2**20


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from ``path`` (inside its folder: a symlink out is refused), or a
    CheckpointError saying what is wrong with it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist.")
    _inside_or_refuse(path, os.path.dirname(os.path.abspath(path)), "The config")
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is {os.path.getsize(path)} bytes, too large for a config; "
                              "the folder is damaged.")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {str(e)[:200]}") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}.")
    return value


def _inside_or_refuse(file: str, folder: str, what: str) -> str:
    """``file`` if it (every symlink resolved) stays inside ``folder`` (or the Hugging Face
    cache's blobs/ a snapshot folder links into); else a CheckpointError."""
    if not paths.inside(file, folder, also=[b for b in [paths.hf_cache_blobs(folder)] if b]):
        raise CheckpointError(f"{what} {file} is a symlink (or under one) that leads out of "
                              f"{folder} (to {os.path.realpath(file)}); weights and configs "
                              "are only read from inside the folder given. Copy the file into "
                              "the folder instead.")
    return file


def weight_files(path: str, stem: str, saved_by: str) -> list[str]:
    """The safetensors file(s) of a folder: ``stem.safetensors``, a sharded index, or a
    variant such as ``stem.fp16.safetensors`` when the plain file is absent.

    Every file (and the index's shard names) must stay inside ``path``: no absolute names, no
    '..', no symlinks leading out. ``saved_by`` names what writes such folders, for the error
    messages (e.g. "transformers CLIPModel.save_pretrained").
    """
    index = os.path.join(path, f"{stem}.safetensors.index.json")
    single = os.path.join(path, f"{stem}.safetensors")
    if os.path.isfile(index):
        _inside_or_refuse(index, path, "The index")
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map' object (tensor name -> shard "
                                  "file); the folder is damaged: save it again.")
        for name in weight_map.values():
            problem = paths.relative_problem(name)
            if problem:
                raise CheckpointError(f"{index} names a shard {str(name)[:80]!r} that {problem}; "
                                      "shards must be files inside the folder.")
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not os.path.isfile(os.path.join(path, name))]
        if absent:
            raise CheckpointError(f"{index} lists shard(s) missing from {path}: "
                                  + ", ".join(absent))
        return [_inside_or_refuse(os.path.join(path, name), path, "The shard")
                for name in files]
    if os.path.isfile(single):
        return [_inside_or_refuse(single, path, "The weights file")]
    names = os.listdir(path)
    variants = sorted(n for n in names if n.startswith(stem + ".") and n.endswith(".safetensors")
                      and os.path.isfile(os.path.join(path, n)))
    if variants:   # e.g. diffusion_pytorch_model.fp16.safetensors
        return [_inside_or_refuse(os.path.join(path, variants[0]), path, "The weights file")]
    pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise CheckpointError(
            f"{path} holds only pickled PyTorch weights ({', '.join(pickled)}); they are not "
            "loaded because unpickling can run arbitrary code. Re-save them as safetensors "
            f"(load with the library that wrote them and call save_pretrained with "
            "safe_serialization=True, the default), and load the new folder.")
    raise CheckpointError(f"{path} has no {stem}.safetensors or {stem}.safetensors.index.json; "
                          f"expected a folder written by {saved_by}.")


def to_ours(x: np.ndarray, kind: str) -> np.ndarray:
    """A checkpoint tensor in our layout."""
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    return x


def to_theirs(x: np.ndarray, kind: str) -> np.ndarray:
    """One of our parameters in the checkpoint's (torch) layout."""
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    return x


def theirs_shape(shape: tuple, kind: str) -> tuple:
    if kind == "linear":
        return tuple(reversed(shape))
    if kind == "conv":
        return tuple(shape[i] for i in (3, 2, 0, 1))
    return tuple(shape)


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def load_into(abstract: nnx.Module, table: NameTable, tensors: TensorFiles, *, path: str,
              what: str, ignore: Callable[[str], bool] = lambda name: False, hint: str = "",
              param_dtype: Any = jnp.float32) -> nnx.Module:
    """Fill ``abstract`` (built with ``nnx.eval_shape``) from ``tensors`` through ``table``.

    Every parameter of the module must be in ``table`` (else an AssertionError: the importer is
    wrong, not the file). Raises :class:`CheckpointMismatchError` listing every missing,
    unexpected (not ignored) and misshapen tensor before reading any data.
    """
    graphdef, state = nnx.split(abstract)
    flat = dict(state.flat_state())
    rows = {p: layer_paths(p, var.shape[0] if var.shape else 0) for p, var in flat.items()}
    shapes = unstack_layer_shapes({p: var.shape for p, var in flat.items()})  # per layer
    unmapped = sorted(path_str(q) for q in shapes if q not in table)
    if unmapped:
        raise AssertionError(f"No checkpoint name for parameter(s): {unmapped}")
    for p, (name, kind) in table.items():
        assert kind in LAYOUTS, (p, kind)

    available = tensors.names()
    missing, mismatched, used = [], [], set()
    for q, shape in shapes.items():
        name, kind = table[q]
        if name not in available:
            missing.append(name)
            continue
        used.add(name)
        want = theirs_shape(shape, kind)
        if tensors.shape(name) != want:
            mismatched.append((name, tensors.shape(name), want))
    unexpected = sorted(n for n in available - used if not ignore(n))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(path, what, sorted(missing), unexpected, mismatched, hint)

    # an integer tensor is never cast into a float parameter (or back): refused by name first
    wrong = sorted(f"{table[q][0]} ({tensors.dtype(table[q][0])}, the model's "
                   f"{np.dtype(var.dtype)})"
                   for p, var in flat.items() for q in rows[p]
                   if dtype_kind(tensors.dtype(table[q][0])) != dtype_kind(var.dtype))
    if wrong:
        raise CheckpointError(f"Checkpoint {path}: tensor(s) stored with a dtype of another kind "
                              f"than the model's variables (integer vs float), which are never "
                              f"cast: {', '.join(wrong[:5])}"
                              + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
                              + ". The weights do not belong to this model or were saved wrongly.")

    def read(q):
        name, kind = table[q]
        return np.array(to_ours(tensors.read(name), kind), order="C").astype(param_dtype)

    for p, var in flat.items():  # the abstract variables keep their logical-axis metadata
        if rows[p] == [p]:
            var.set_value(jnp.asarray(read(p)))
        else:
            var.set_value(jnp.asarray(np.stack([read(q) for q in rows[p]])))
    return nnx.merge(graphdef, state)


def torch_layout_state(state, table: NameTable) -> dict[str, np.ndarray]:
    """A flat nnx State as a torch-layout state dict of numpy float32 / float16 / float64 arrays
    (other dtypes become float32); stacked layers are written one tensor per layer."""
    out = {}
    for p, var in state.flat_state():
        array = np.asarray(jax.device_get(var[...]))
        if array.dtype not in (np.float32, np.float16, np.float64):
            array = array.astype(np.float32)
        qs = layer_paths(p, array.shape[0] if array.ndim else 0)
        for i, q in enumerate(qs):
            name, kind = table[q]
            out[name] = np.array(to_theirs(array if qs == [p] else array[i], kind), order="C")
    return out


def state_dict(module: nnx.Module, table: NameTable) -> dict[str, np.ndarray]:
    """The module's parameters as a torch-layout state dict of numpy arrays (float32 when the
    parameters are a dtype safetensors' numpy writer cannot store)."""
    return torch_layout_state(nnx.state(module, nnx.Param), table)
