"""Where ``UnCLIPPipeline.from_pretrained(source)`` finds its folder.

    None or "shapes"             the bundled Shapes model (unclip_jax/assets/shapes)
    a folder with unclip.json    an unclip-jax pipeline folder, loaded as it is
    a folder with model_index.json   a diffusers UnCLIPPipeline folder: converted once
                                 (unclip_jax.convert, what `unclip-jax convert` runs) into
                                 CACHE/converted/<name>-<key>, then loaded from there; the key
                                 hashes the folder's path and its files' sizes and times, so an
                                 edited folder is converted again
    "owner/name"                 a Hub id: the files conversion needs are downloaded with
                                 huggingface_hub.snapshot_download (its own cache, or
                                 CACHE/hub with ``cache_dir``), then as a diffusers folder

CACHE is ``cache_dir`` or the user's cache directory (:func:`unclip_jax.compilation_cache.
user_cache_dir`). Delete CACHE/converted to free the space.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys

from unclip_jax.assets import SHAPES
from unclip_jax.compilation_cache import user_cache_dir
from unclip_jax.convert.diffusers_pipeline import convert_diffusers_pipeline
from unclip_jax.io import paths
from unclip_jax.io.pipeline_folder import manifest_path
from unclip_jax.pipeline.settings import PipelineError

BUNDLED = {"shapes": SHAPES}
CONVERT_FORMAT = 1   # bump when the conversion's output changes: old cache entries are skipped
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHTS = ("*.safetensors",)
_PICKLES = ("*.bin",)
_CONFIGS = ("model_index.json", "*/*.json", "*/*.txt")


def is_pipeline_folder(path: str) -> bool:
    return paths.isfile(manifest_path(path))


def is_diffusers_folder(path: str) -> bool:
    return paths.isfile(paths.join(path, "model_index.json"))


def resolve(source=None, *, cache_dir: str | None = None, local_files_only: bool = False,
            allow_pickle: bool = False, log=None) -> str:
    """The unclip-jax pipeline folder that ``source`` names (converting or downloading first
    when needed; see the module docstring). ``log`` (default: stderr) hears about the slow
    one-time steps."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if source is None:
        source = "shapes"
    source = os.fspath(source)
    if source in BUNDLED and not os.path.exists(source):
        folder = BUNDLED[source]
        if not is_pipeline_folder(folder):
            raise PipelineError(f"The bundled {source!r} model is missing from {folder} (an "
                                "install without package data?); reinstall unclip-jax.")
        return folder
    if paths.is_remote(source) and is_pipeline_folder(source):
        return source   # a pipeline folder in a bucket is read in place
    if os.path.isdir(source):
        if is_pipeline_folder(source):
            return source
        if is_diffusers_folder(source):
            return converted(source, cache_dir=cache_dir, allow_pickle=allow_pickle, log=log)
        raise PipelineError(
            f"{source} is neither an unclip-jax pipeline folder (unclip.json) nor a diffusers "
            "UnCLIPPipeline folder (model_index.json); pass one of those, 'shapes' or a Hub id "
            "such as 'kakaobrain/karlo-v1-alpha'.")
    if os.path.exists(source) or not _HUB_ID.match(source):
        raise PipelineError(
            f"{source!r} is not a folder, 'shapes' or a Hub id ('owner/name'); pass a pipeline "
            "folder (unclip.json), a diffusers UnCLIPPipeline folder (model_index.json) or a "
            "Hub id such as 'kakaobrain/karlo-v1-alpha'.")
    folder = download(source, cache_dir=cache_dir, local_files_only=local_files_only,
                      allow_pickle=allow_pickle)
    if not is_diffusers_folder(folder):
        raise PipelineError(f"The Hub repository {source} has no model_index.json; it is not a "
                            "diffusers UnCLIPPipeline.")
    return converted(folder, cache_dir=cache_dir, allow_pickle=allow_pickle, log=log,
                     name=source.split("/")[-1])


def cache_key(src: str, allow_pickle: bool = False) -> str:
    """A hash of the folder's real path, its files' relative paths, sizes and modification
    times, and the conversion's format: it changes whenever the conversion would."""
    src = os.path.realpath(src)
    files = []
    for root, dirs, names in os.walk(src, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if n.startswith("."):
                continue
            p = os.path.join(root, n)
            st = os.stat(p)
            files.append((os.path.relpath(p, src), st.st_size, st.st_mtime_ns))
    blob = json.dumps({"source": src, "files": files, "format": CONVERT_FORMAT,
                       "allow_pickle": bool(allow_pickle)})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def converted(src: str, *, cache_dir: str | None = None, allow_pickle: bool = False,
              log=print, name: str | None = None) -> str:
    """The converted copy of diffusers folder ``src`` in the cache, converting it first (once;
    the folder appears atomically, complete or not at all)."""
    root = os.path.join(cache_dir or user_cache_dir(), "converted")
    base = re.sub(r"[^\w.-]", "_", name or os.path.basename(os.path.realpath(src))) or "pipeline"
    dst = os.path.join(root, f"{base}-{cache_key(src, allow_pickle)}")
    if is_pipeline_folder(dst):
        return dst
    log(f"converting the diffusers folder {src} once into {dst} (later loads read it from "
        "there)")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"Cannot create the cache folder {root} ({e}); pass cache_dir= a "
                            "writable folder, or convert by hand with `unclip-jax convert SRC "
                            "--out DST` and load DST.") from None
    convert_diffusers_pipeline(src, dst, allow_pickle=allow_pickle)
    return dst


def download(repo_id: str, *, cache_dir: str | None = None, local_files_only: bool = False,
             allow_pickle: bool = False) -> str:
    """A local snapshot of the Hub repository ``repo_id`` holding what conversion reads (configs,
    tokenizer files, safetensors; pickled .bin weights only with ``allow_pickle``)."""
    try:
        import huggingface_hub
    except ImportError:
        raise PipelineError(f"Loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub: "
                            'pip install "unclip-jax[hub]"; or download the diffusers folder '
                            "yourself and pass its path.") from None
    patterns = list(_CONFIGS + _WEIGHTS + (_PICKLES if allow_pickle else ()))
    try:
        return huggingface_hub.snapshot_download(
            repo_id, allow_patterns=patterns, local_files_only=local_files_only,
            cache_dir=os.path.join(cache_dir, "hub") if cache_dir else None)
    except Exception as e:  # noqa: BLE001 (offline, not found, gated, HTTP errors, ...)
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        raise PipelineError(
            f"Could not get {repo_id!r} from the Hugging Face Hub ({why}). If you are offline "
            "or the id is wrong: download the diffusers UnCLIPPipeline folder (e.g. `hf download "
            f"{repo_id} --local-dir DIR` where there is network) and pass its path, or convert "
            "it with `unclip-jax convert DIR --out OUT` and pass OUT.") from None
