"""Convert a diffusers ``UnCLIPPipeline`` folder (Karlo) into an unclip-jax pipeline folder.

    convert_diffusers_pipeline(src, dst, allow_pickle=False, dtype=None) -> report

The source is what ``UnCLIPPipeline.save_pretrained`` writes (or a download of
kakaobrain/karlo-v1-alpha):

    model_index.json
    prior/            PriorTransformer                      -> 'prior' (DiffusionPrior)
    text_encoder/     transformers CLIPTextModelWithProjection -> 'text_encoder' (CLIPText)
                      (a full CLIPModel there, with its vision tower, -> 'clip' (CLIP))
    tokenizer/        CLIPTokenizer: must be CLIP's BPE vocabulary (checked against ours when
                      vocab.json is present); its model_max_length and pad token are kept
    text_proj/ + decoder/   UnCLIPTextProjModel + UNet2DConditionModel -> 'decoder' (Decoder)
    super_res_first/, super_res_last/   UNet2DModel -> 'super_res_first' / 'super_res_last'
    prior_scheduler/, decoder_scheduler/, super_res_scheduler/   UnCLIPScheduler configs
                      -> the manifest's sampling defaults (variance, clipping, prediction type)

Weights are read from safetensors only. A component with only pickled weights (``*.bin``) is
refused unless ``allow_pickle=True``; then it is read with ``torch.load(weights_only=True)``
(tensors only, no code) and staged as safetensors before the usual loader reads it. fp16
variant files (``*.fp16.safetensors``) are used when the plain file is absent. Every tensor is
accounted for: a missing, unexpected or misshapen tensor in any component stops the conversion
with a list of their names (nothing is written). Components are converted one at a time and freed,
so peak memory is about one component; the output folder appears only when complete.

The text encoder: diffusers ships only CLIP's text tower with its projection, so it is stored as
class 'CLIPText' under the name 'text_encoder' (parameter names equal the text side of our full
CLIP); a folder that also holds the vision tower is stored as a full 'CLIP' under 'clip'.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from unclip_jax.clip.text_encoder import CLIPTextEncoder
from unclip_jax.clip.tokenizer import Tokenizer
from unclip_jax.convert import hf_clip
from unclip_jax.convert.diffusers import load_decoder, load_prior, load_super_res
from unclip_jax.errors import UserError
from unclip_jax.io import paths, pipeline_folder, safetensors
from unclip_jax.io.safetensors import TensorFiles
from unclip_jax.models.layers import abstract_init
from unclip_jax.torch_weights import PICKLE_SUFFIXES, load_into, weight_files

REQUIRED = ("prior", "text_encoder", "tokenizer", "text_proj", "decoder")
OPTIONAL = ("super_res_first", "super_res_last")
SCHEDULERS = ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")
_STEMS = {"text_encoder": "model"}  # everything else: diffusion_pytorch_model
WRITES = tuple(f"{n}.safetensors" for n in ("clip", "text_encoder", "prior", "decoder")
               + OPTIONAL)   # the weights files a conversion may write
# diffusers UnCLIPPipeline.__call__ defaults.
PIPELINE_CALL_DEFAULTS = dict(prior_steps=25, decoder_steps=25, super_res_steps=7,
                              prior_guidance_scale=4.0, decoder_guidance_scale=8.0)


class ConvertError(UserError, ValueError):
    """A source folder that cannot be converted; the message says what is wrong and what to do.
    ``missing`` / ``unexpected`` list tensor names when the cause is a tensor mismatch."""

    def __init__(self, message: str, missing=(), unexpected=()):
        super().__init__(message)
        self.missing, self.unexpected = list(missing), list(unexpected)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConvertError(f"{path} is missing; expected a folder written by diffusers "
                           "UnCLIPPipeline.save_pretrained.")
    if os.path.getsize(path) > 64 * 2**20:
        raise ConvertError(f"{path} is too large for a config file; the folder is damaged.")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConvertError(f"{path} is not valid JSON ({str(e)[:200]}).") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path} must hold a JSON object, not a {type(value).__name__}.")
    return value


_READ_SUFFIXES = (".json", ".txt", ".safetensors") + PICKLE_SUFFIXES
# config.json keys that count layers / blocks: a huge value would take forever to build
_COUNT_KEYS = ("num_layers", "layers_per_block", "num_hidden_layers", "num_attention_heads",
               "attention_head_dim", "num_embeddings", "additional_embeddings")


def _check_source_files(src: str) -> None:
    """Every file conversion reads stays inside ``src`` (symlinks resolved; a Hugging Face
    cache snapshot may link into its blobs/), and every component's config.json is sane."""
    blobs = [b for b in [paths.hf_cache_blobs(src)] if b]
    entries = ["model_index.json"] + list(REQUIRED + OPTIONAL + SCHEDULERS)
    for name in entries:
        p = os.path.join(src, name)
        if not os.path.lexists(p):
            continue
        if not paths.inside(p, src, also=blobs):
            raise ConvertError(f"{p} is a symlink that leads out of the source folder (to "
                               f"{os.path.realpath(p)}); only files inside {src} are read. Copy "
                               "it into the folder instead.")
        if not os.path.isdir(p):
            continue
        for f in sorted(os.listdir(p)):
            q = os.path.join(p, f)
            if f.endswith(_READ_SUFFIXES) and not paths.inside(q, src, also=blobs):
                raise ConvertError(f"{q} is a symlink that leads out of the source folder (to "
                                   f"{os.path.realpath(q)}); only files inside {src} are read. "
                                   "Copy the file into the folder instead.")
        config = os.path.join(p, "config.json")
        if os.path.isfile(config):
            _check_counts(config, _read_json(config))


def _check_counts(path: str, cfg: dict, depth: int = 0) -> None:
    for key, value in cfg.items():
        if isinstance(value, dict) and depth < 4:   # e.g. a CLIPModel's text_config
            _check_counts(path, value, depth + 1)
        counts = value if isinstance(value, list) else [value]   # per block, or one for all
        if key in _COUNT_KEYS and value is not None and not all(
                type(v) is int and 0 <= v <= 4096 for v in counts):
            raise ConvertError(f"{path}: {key} is {str(value)[:40]!r}, expected an integer in "
                               "[0, 4096] (or a list of them); the config is damaged.")
        if isinstance(value, list) and len(value) > 256 and not key.startswith("_"):
            raise ConvertError(f"{path}: {key} lists {len(value)} entries; the config is "
                               "damaged.")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConvertError(f"{path}: {key} is {value}, not a finite number.")


# --------------------------------------------------------------------------------------------
# Weights: safetensors, fp16 variants, and (only when allowed) pickles staged as safetensors
# --------------------------------------------------------------------------------------------

def _stage_component(src: str, name: str, stage_root: str, allow_pickle: bool) -> str:
    """A folder with config.json and STEM.safetensors for component ``name`` (``src`` itself
    when it already has them; else a staged copy under ``stage_root``)."""
    folder = os.path.join(src, name)
    stem = _STEMS.get(name, "diffusion_pytorch_model")
    files = os.listdir(folder)
    if f"{stem}.safetensors" in files or f"{stem}.safetensors.index.json" in files:
        return folder
    staged = os.path.join(stage_root, name)
    os.makedirs(staged, exist_ok=True)
    for f in files:
        if f.endswith(".json"):
            shutil.copy(os.path.join(folder, f), staged)
    variants = sorted(f for f in files if f.startswith(stem + ".") and f.endswith(".safetensors"))
    if variants:  # e.g. diffusion_pytorch_model.fp16.safetensors: weight_files reads them
        shutil.rmtree(staged, ignore_errors=True)
        return folder
    pickled = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if not pickled:
        raise ConvertError(f"{folder} has no weights ({stem}.safetensors); the folder is "
                           "incomplete.")
    if not allow_pickle:
        raise ConvertError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}), which are not loaded by "
            "default because unpickling can run code. Re-save the pipeline with safetensors "
            "(diffusers save_pretrained does by default), or pass --allow-pickle to read them "
            "with torch.load(weights_only=True).")
    try:  # torch is not a dependency: only pickled folders need it
        import torch
    except ImportError:
        raise ConvertError(f"{folder} holds only pickled weights, and reading them needs torch, "
                           "which is not installed: pip install torch (the CPU wheel is enough), "
                           "or re-save the pipeline with safetensors.") from None
    tensors: dict[str, Any] = {}
    for f in pickled:
        try:
            sd = torch.load(os.path.join(folder, f), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (torch raises many kinds)
            raise ConvertError(f"{os.path.join(folder, f)} cannot be read with "
                               f"torch.load(weights_only=True): {e}") from None
        if not isinstance(sd, dict):
            raise ConvertError(f"{os.path.join(folder, f)} is not a state dict.")
        for k, v in sd.items():
            if not torch.is_tensor(v):
                raise ConvertError(f"{os.path.join(folder, f)}: entry {k!r} is not a tensor.")
            v = v.detach()
            if v.is_floating_point() and v.dtype not in (torch.float16, torch.float32,
                                                         torch.float64):
                v = v.float()   # bfloat16 and the like: numpy cannot hold them
            tensors[k] = np.ascontiguousarray(v.numpy())   # integers stay integers
    safetensors.write(os.path.join(staged, f"{stem}.safetensors"), tensors)
    return staged


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------

def _as_convert_error(name: str, e: Exception) -> ConvertError:
    return ConvertError(f"Component {name}/: {e}", getattr(e, "missing", ()),
                        getattr(e, "unexpected", ()))


def load_text_encoder(folder: str, *, dtype: str = "float32"):
    """A transformers CLIPTextModelWithProjection (or CLIPModel) folder -> (name, module)."""

    cfg = _read_json(os.path.join(folder, "config.json"))
    tensors = TensorFiles(weight_files(folder, "model", "transformers save_pretrained"))
    if cfg.get("model_type") == "clip" or any(n.startswith("vision_model.")
                                              for n in tensors.names()):
        return "clip", hf_clip.from_pretrained(folder, dtype=dtype)
    if cfg.get("model_type") not in (None, "clip_text_model"):
        raise ConvertError(f"{folder}/config.json has model_type {cfg.get('model_type')!r}; "
                           "expected a CLIP text encoder ('clip_text_model').")
    vision = {"hidden_act": cfg.get("hidden_act", "quick_gelu"),
              "layer_norm_eps": cfg.get("layer_norm_eps", 1e-5)}
    full = {"model_type": "clip", "text_config": cfg, "vision_config": vision,
            "projection_dim": cfg.get("projection_dim", 512)}
    config = hf_clip.config_from_hf(full, dtype=dtype)
    table = {p: v for p, v in hf_clip.param_map(config).items()
             if p[0] in ("text", "text_projection")}
    abstract = abstract_init(lambda: CLIPTextEncoder(config, __import__("flax").nnx.Rngs(0)))
    module = load_into(abstract, table, tensors, path=folder,
                       what="CLIP text encoder (with projection) built from its config.json",
                       ignore=lambda n: n.endswith(hf_clip.IGNORED_SUFFIXES),
                       param_dtype=config.params_dtype)
    return "text_encoder", module


def _tokenizer_settings(folder: str) -> dict:
    """The manifest's tokenizer section from a CLIPTokenizer folder (vocabulary checked)."""
    cfg = {}
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        cfg = _read_json(path)
    ctx = cfg.get("model_max_length", 77)
    if type(ctx) is not int or not 3 <= ctx <= 10_000:
        ctx = 77   # transformers writes a huge number when the length is unset
    ours = Tokenizer(context_length=ctx)
    vocab_file = os.path.join(folder, "vocab.json")
    if os.path.isfile(vocab_file):
        vocab = _read_json(vocab_file)
        if vocab != ours.encoder:
            raise ConvertError(f"{vocab_file} is not CLIP's BPE vocabulary (the one unclip-jax "
                               "ships); a pipeline with another tokenizer cannot be converted.")
    pad = cfg.get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    pad_id = ours.encoder.get(pad, ours.eot_id) if isinstance(pad, str) else ours.eot_id
    return {"kind": "clip_bpe", "vocab": "bpe_simple_vocab_16e6", "context_length": ctx,
            "pad_id": int(pad_id)}


def _scheduler_settings(src: str, name: str) -> dict:
    path = os.path.join(src, name, "scheduler_config.json")
    cfg = _read_json(path)
    if cfg.get("_class_name", "UnCLIPScheduler") != "UnCLIPScheduler":
        raise ConvertError(f"{path}: scheduler {str(cfg.get('_class_name'))[:60]!r} is not "
                           "supported; expected UnCLIPScheduler.")
    if cfg.get("beta_schedule", "squaredcos_cap_v2") != "squaredcos_cap_v2":
        raise ConvertError(f"{path}: beta_schedule {str(cfg['beta_schedule'])[:60]!r}; "
                           "UnCLIPScheduler supports only 'squaredcos_cap_v2'.")

    def field(key, default, ok, what):
        value = cfg.get(key, default)
        if not ok(value):
            raise ConvertError(f"{path}: {key} is {str(value)[:60]!r}, expected {what}; the "
                               "scheduler config is damaged.")
        return value

    steps = field("num_train_timesteps", 1000, lambda v: type(v) is int and 1 <= v <= 100_000,
                  "an integer in [1, 100000]")
    clip = field("clip_sample", True, lambda v: type(v) is bool, "true or false")
    clip_range = field("clip_sample_range", 1.0, lambda v: type(v) in (int, float)
                       and math.isfinite(v) and v > 0, "a finite number > 0")
    variance = field("variance_type", "fixed_small_log",
                     lambda v: v in ("fixed_small_log", "learned_range"),
                     "'fixed_small_log' or 'learned_range'")
    prediction = field("prediction_type", "epsilon", lambda v: isinstance(v, str),
                       "a prediction type name")
    return dict(schedule="cosine", num_train_steps=steps, float32_cumprod=True,
                sampler="unclip", variance=variance,
                clip_range=float(clip_range) if clip else None, prediction_type=prediction)


def _expect_prediction(s: dict, want: str, where: str) -> dict:
    got = s.pop("prediction_type")
    if got != want:
        raise ConvertError(f"{where}: prediction_type {got[:40]!r}; the "
                           f"{where.split('_')[0]} stage of unCLIP predicts {want!r}.")
    return s


def check_source(src: str) -> str:
    """Refuse a source that is not a local folder (one ConvertError saying what it is)."""
    if not os.path.isdir(src):
        what = "is a file, not a folder" if os.path.exists(src) else "does not exist"
        raise ConvertError(f"Source folder {src!r} {what}; pass a diffusers UnCLIPPipeline "
                           "folder (UnCLIPPipeline.save_pretrained).")
    return src


def convert_diffusers_pipeline(src: str | os.PathLike, dst: str | os.PathLike, *,
                               allow_pickle: bool = False, dtype: str | None = None,
                               log=None, overwrite: bool = True,
                               flag: str = "--out") -> dict[str, Any]:
    """Convert; returns {'components': {name: {'class', 'params', 'tensors'}}, 'sampling'}.

    ``dtype`` narrows float storage in the output ('float16' / 'bfloat16'; default float32).
    ``log`` (e.g. print) receives one line per converted component. ``dst`` must be new, empty
    or an unclip-jax pipeline folder; the last is replaced only with ``overwrite`` (the CLI's
    ``--overwrite``), and then only its manifest and the weights it lists: other files there
    are kept (see :func:`unclip_jax.io.pipeline_folder.save_folder_atomically`).
    """

    src, dst = os.fspath(src), os.fspath(dst)
    check_source(src)
    _check_source_files(src)
    index_path = os.path.join(src, "model_index.json")
    if os.path.isfile(index_path):
        cls = _read_json(index_path).get("_class_name")
        if cls not in (None, "UnCLIPPipeline"):
            raise ConvertError(f"{index_path} describes a {str(cls)[:60]}; expected an "
                               "UnCLIPPipeline.")
    missing = [d for d in REQUIRED + SCHEDULERS[:2] if not os.path.isdir(os.path.join(src, d))]
    if missing:
        raise ConvertError(f"{src} lacks the subfolder(s) {', '.join(m + '/' for m in missing)}; "
                           "expected a diffusers UnCLIPPipeline folder.")
    if not paths.is_remote(dst) and os.path.realpath(src) == os.path.realpath(dst):
        raise ConvertError(f"{flag} must differ from the source folder.")
    pipeline_folder.check_output(dst, overwrite=overwrite, flag=flag, will_write=WRITES)
    present_sr = [d for d in OPTIONAL if os.path.isdir(os.path.join(src, d))]

    # Everything cheap is checked before any weights are read.
    tokenizer = _tokenizer_settings(os.path.join(src, "tokenizer"))
    prior_s = _expect_prediction(_scheduler_settings(src, "prior_scheduler"), "sample",
                                 "prior_scheduler")
    dec_s = _expect_prediction(_scheduler_settings(src, "decoder_scheduler"), "epsilon",
                               "decoder_scheduler")
    d = PIPELINE_CALL_DEFAULTS
    sampling: dict[str, Any] = {
        "prior": dict(prior_s, steps=d["prior_steps"], guidance_scale=d["prior_guidance_scale"],
                      best_of=1, eta=0.0),
        "decoder": dict(dec_s, steps=d["decoder_steps"],
                        guidance_scale=d["decoder_guidance_scale"], eta=0.0),
        "super_res": [],
    }
    if present_sr:
        if not os.path.isdir(os.path.join(src, "super_res_scheduler")):
            raise ConvertError(f"{src} has {present_sr[0]}/ but no super_res_scheduler/.")
        sr_s = _expect_prediction(_scheduler_settings(src, "super_res_scheduler"), "epsilon",
                                  "super_res_scheduler")
        size = _read_json(os.path.join(src, present_sr[0], "config.json")).get("sample_size")
        if type(size) is not int or not 1 <= size <= 65_536:
            raise ConvertError(f"{src}/{present_sr[0]}/config.json needs an int sample_size "
                               "(the upsampled image size).")
        sampling["super_res"] = [dict(sr_s, models=present_sr, size=size,
                                      steps=d["super_res_steps"], eta=0.0)]
    dec_cfg = _read_json(os.path.join(src, "decoder", "config.json"))
    dec_size = dec_cfg.get("sample_size", 64)
    if type(dec_size) is not int or not 1 <= dec_size <= 65_536:
        raise ConvertError(f"{src}/decoder/config.json: sample_size {str(dec_size)[:40]!r} is "
                           "not an image size (an integer in [1, 65536]).")

    report: dict[str, Any] = {"components": {}, "sampling": sampling}
    stage_root = tempfile.mkdtemp(prefix="unclip-convert-")

    def write(tmp: str) -> None:
        entries = {}

        def keep(name: str, module) -> None:
            entries[name] = pipeline_folder.save_component(tmp, name, module, dtype=dtype,
                                                           update_manifest=False)
            flat = pipeline_folder.flat_state(module)
            params = sum(int(v[...].size) for v in flat.values())
            report["components"][name] = {"class": entries[name]["class"], "params": params,
                                          "tensors": len(flat)}
            if log:
                log(f"  {name}: {entries[name]['class']}, {params:,} values in "
                    f"{len(flat)} tensors")

        jobs = [("text_encoder", lambda: load_text_encoder(
                    _stage_component(src, "text_encoder", stage_root, allow_pickle))),
                ("prior", lambda: ("prior", _sampleable_prior(load_prior(
                    _stage_component(src, "prior", stage_root, allow_pickle))))),
                ("decoder", lambda: ("decoder", _load_decoder(src, stage_root, allow_pickle,
                                                              dec_size, load_decoder)))]
        jobs += [(n, (lambda n=n: (n, load_super_res(
            _stage_component(src, n, stage_root, allow_pickle))))) for n in present_sr]
        for source, job in jobs:
            try:
                name, module = job()
            except (UserError, ValueError) as e:  # config problems too
                raise _as_convert_error(source, e) from None
            except (TypeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as e:
                # a config.json with values of the wrong type breaks a constructor
                raise ConvertError(f"Component {source}/: its config.json cannot be used "
                                   f"({type(e).__name__}: {str(e)[:200]}); the folder is "
                                   "damaged or not a diffusers UnCLIPPipeline.") from None
            keep(name, module)
            del module
        pipeline_folder.save_manifest(tmp, components=entries, tokenizer=tokenizer,
                                      sampling=sampling, replace=True)

    try:
        pipeline_folder.save_folder_atomically(dst, write, overwrite=overwrite, flag=flag)
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)
    return report


def _sampleable_prior(prior):
    cfg = prior.config
    if cfg.output_dim != cfg.embed_dim:
        raise ConvertError(f"prior/config.json has clip_embed_dim={cfg.output_dim} but "
                           f"embedding_dim={cfg.embed_dim}: the prior's prediction is not an "
                           "image embedding, so neither UnCLIPPipeline nor ours can sample it "
                           "(load it alone with unclip_jax.convert.diffusers.load_prior).")
    return prior


def _load_decoder(src, stage_root, allow_pickle, size, load_decoder):
    dec = _stage_component(src, "decoder", stage_root, allow_pickle)
    proj = _stage_component(src, "text_proj", stage_root, allow_pickle)
    root = src
    if dec != os.path.join(src, "decoder") or proj != os.path.join(src, "text_proj"):
        root = os.path.join(stage_root, "_decoder_root")
        os.makedirs(root, exist_ok=True)
        for name, folder in (("decoder", dec), ("text_proj", proj)):
            link = os.path.join(root, name)
            if not os.path.exists(link):
                os.symlink(os.path.abspath(folder), link)
    return load_decoder(root, image_size=int(size))
