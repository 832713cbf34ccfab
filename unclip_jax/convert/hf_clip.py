"""Load Hugging Face ``CLIPModel`` checkpoints (``save_pretrained`` folders) into :class:`CLIP`.

A folder holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` with its shards. Tensors are read and written by
:mod:`unclip_jax.io.safetensors` (bfloat16 included); pickled ``pytorch_model.bin`` files are
never opened.

Every parameter of our model must come from exactly one tensor of the file and every tensor of
the file must be used (the non-persistent ``*.position_ids`` buffers of older exports excepted);
otherwise one :class:`CheckpointMismatchError` names every missing, unexpected and misshapen
tensor before any data is read.

Layout conversions: torch ``Linear.weight`` [out, in] -> our ``kernel`` [in, out]; the patch
convolution OIHW -> HWIO; LayerNorm ``weight`` -> ``scale``. :func:`save_pretrained` writes the
reverse, a folder that ``transformers.CLIPModel.from_pretrained`` loads.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from unclip_jax.clip.model import ACTIVATIONS, CLIP, CLIPConfig, abstract_model
from unclip_jax.io import paths, pipeline_folder, safetensors
from unclip_jax.io.atomic import atomic_write
from unclip_jax.torch_weights import (  # noqa: F401 (the errors are re-exported)
    TORCH_METADATA, CheckpointError, CheckpointMismatchError, check_folder, load_into, read_json,
    state_dict, weight_files)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
IGNORED_SUFFIXES = (".position_ids",)  # non-parameter buffers of older exports
_SAVED_BY = "transformers CLIPModel.save_pretrained"
_MISMATCH_HINT = ("Check that config.json belongs to these weights and that they were saved "
                  "from a transformers CLIPModel.")

# Hugging Face defaults (transformers CLIPTextConfig / CLIPVisionConfig / CLIPConfig), used for
# keys that a config.json leaves out.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)
_TOP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def config_from_hf(hf: dict[str, Any], **overrides: Any) -> CLIPConfig:
    """Our :class:`CLIPConfig` from a Hugging Face CLIP ``config.json`` dict."""
    model_type = hf.get("model_type")
    if model_type in ("clip_text_model", "clip_vision_model"):
        raise CheckpointError(
            f"config.json describes a single CLIP tower (model_type {model_type!r}); expected a "
            "full CLIPModel (model_type 'clip' with text_config and vision_config).")
    if model_type != "clip" and not ("text_config" in hf and "vision_config" in hf):
        raise CheckpointError(
            f"config.json is not a CLIP config: model_type {model_type!r}, architectures "
            f"{hf.get('architectures')}; expected model_type 'clip' with text_config and "
            "vision_config, as written by transformers CLIPModel.save_pretrained.")
    for key in ("text_config", "vision_config", "text_config_dict", "vision_config_dict"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise CheckpointError(f"config.json: {key} must be an object, not a "
                                  f"{type(hf[key]).__name__}.")
    t = {**_TEXT_DEFAULTS, **(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
    v = {**_VISION_DEFAULTS, **(hf.get("vision_config") or {}),
         **(hf.get("vision_config_dict") or {})}
    top = {**_TOP_DEFAULTS, **hf}

    problems = []
    if t["hidden_act"] != v["hidden_act"] or t["hidden_act"] not in ACTIVATIONS:
        problems.append(f"hidden_act text={t['hidden_act']!r} vision={v['hidden_act']!r}; "
                        f"supported: the same one of {ACTIVATIONS} in both towers")
    eps = (t["layer_norm_eps"], v["layer_norm_eps"])
    if not all(type(e) in (int, float) and math.isfinite(e) and e > 0 for e in eps):
        problems.append(f"layer_norm_eps must be a positive number (text {eps[0]!r}, vision "
                        f"{eps[1]!r})")
    elif not math.isclose(t["layer_norm_eps"], v["layer_norm_eps"]):
        problems.append(f"layer_norm_eps differs between towers (text {t['layer_norm_eps']}, "
                        f"vision {v['layer_norm_eps']})")
    if v["num_channels"] != 3:
        problems.append(f"vision num_channels is {v['num_channels']}; only RGB (3) is supported")
    if not isinstance(t["eos_token_id"], int):
        problems.append(f"text eos_token_id must be a single int, got {t['eos_token_id']!r}")
    if problems:
        raise CheckpointError("Unsupported CLIP config.json: " + "; ".join(problems) + ".")

    fields = dict(
        embed_dim=top["projection_dim"],
        vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"],
        text_width=t["hidden_size"], text_layers=t["num_hidden_layers"],
        text_heads=t["num_attention_heads"], text_mlp_dim=t["intermediate_size"],
        image_size=v["image_size"], patch_size=v["patch_size"],
        vision_width=v["hidden_size"], vision_layers=v["num_hidden_layers"],
        vision_heads=v["num_attention_heads"], vision_mlp_dim=v["intermediate_size"],
        activation=t["hidden_act"], layer_norm_eps=float(t["layer_norm_eps"]),
        eos_token_id=t["eos_token_id"], logit_scale_init=top["logit_scale_init_value"])
    problems = pipeline_folder.config_field_problems(CLIPConfig, fields)
    if problems:
        raise CheckpointError("Unsupported CLIP config.json: " + "; ".join(problems) + ".")
    fields["logit_scale_init"] = float(fields["logit_scale_init"])
    fields.update(overrides)
    return CLIPConfig(**fields)


def config_to_hf(config: CLIPConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for a model with this config."""
    common = dict(hidden_act=config.activation, layer_norm_eps=config.layer_norm_eps,
                  attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0)
    text = dict(common, model_type="clip_text_model", vocab_size=config.vocab_size,
                hidden_size=config.text_width, intermediate_size=config.text_mlp,
                num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                max_position_embeddings=config.context_length, projection_dim=config.embed_dim,
                eos_token_id=config.eos_token_id, bos_token_id=49406, pad_token_id=1)
    vision = dict(common, model_type="clip_vision_model", hidden_size=config.vision_width,
                  intermediate_size=config.vision_mlp, num_hidden_layers=config.vision_layers,
                  num_attention_heads=config.vision_heads, num_channels=3,
                  image_size=config.image_size, patch_size=config.patch_size,
                  projection_dim=config.embed_dim)
    return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=config.embed_dim,
                logit_scale_init_value=config.logit_scale_init, initializer_factor=1.0,
                text_config=text, vision_config=vision)


def load_config(path: str, **overrides: Any) -> CLIPConfig:
    """Read ``path/config.json`` (a Hugging Face CLIP folder) into a :class:`CLIPConfig`."""
    check_folder(path, f"a folder written by {_SAVED_BY}")
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{path} has no {CONFIG_NAME}; expected a folder written by "
                              f"{_SAVED_BY} (config.json + model.safetensors).")
    return config_from_hf(read_json(config_file), **overrides)


# --------------------------------------------------------------------------------------------
# Name mapping: our parameter path -> (Hugging Face tensor name, layout kind)
# --------------------------------------------------------------------------------------------

# kind: 'linear' (torch [out, in] <-> our [in, out]), 'conv' (OIHW <-> HWIO), 'copy'.
_BLOCK_LINEARS = {("attn", "q_proj"): "self_attn.q_proj", ("attn", "k_proj"): "self_attn.k_proj",
                  ("attn", "v_proj"): "self_attn.v_proj",
                  ("attn", "out_proj"): "self_attn.out_proj",
                  ("mlp", "fc1"): "mlp.fc1", ("mlp", "fc2"): "mlp.fc2"}
_BLOCK_NORMS = {("ln_1",): "layer_norm1", ("ln_2",): "layer_norm2"}


def param_map(config: CLIPConfig) -> dict[tuple, tuple[str, str]]:
    """Every parameter path of ``CLIP(config)`` with its Hugging Face tensor name and layout."""
    table: dict[tuple, tuple[str, str]] = {}

    def linear(ours: tuple, theirs: str, bias: bool = True):
        table[(*ours, "kernel")] = (f"{theirs}.weight", "linear")
        if bias:
            table[(*ours, "bias")] = (f"{theirs}.bias", "copy")

    def norm(ours: tuple, theirs: str):
        table[(*ours, "scale")] = (f"{theirs}.weight", "copy")
        table[(*ours, "bias")] = (f"{theirs}.bias", "copy")

    for tower, hf_tower, n in (("text", "text_model", config.text_layers),
                               ("vision", "vision_model", config.vision_layers)):
        for i in range(n):
            ours, theirs = (tower, "encoder", "layers", i), f"{hf_tower}.encoder.layers.{i}"
            for sub, name in _BLOCK_LINEARS.items():
                linear((*ours, *sub), f"{theirs}.{name}")
            for sub, name in _BLOCK_NORMS.items():
                norm((*ours, *sub), f"{theirs}.{name}")

    table[("text", "token_embedding")] = ("text_model.embeddings.token_embedding.weight", "copy")
    table[("text", "position_embedding")] = (
        "text_model.embeddings.position_embedding.weight", "copy")
    norm(("text", "final_ln"), "text_model.final_layer_norm")
    table[("vision", "patch_embed", "kernel")] = (
        "vision_model.embeddings.patch_embedding.weight", "conv")
    table[("vision", "class_embedding")] = ("vision_model.embeddings.class_embedding", "copy")
    table[("vision", "position_embedding")] = (
        "vision_model.embeddings.position_embedding.weight", "copy")
    norm(("vision", "pre_ln"), "vision_model.pre_layrnorm")
    norm(("vision", "post_ln"), "vision_model.post_layernorm")
    linear(("text_projection",), "text_projection", bias=False)
    linear(("visual_projection",), "visual_projection", bias=False)
    table[("logit_scale",)] = ("logit_scale", "copy")
    return table


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def from_pretrained(path: str | os.PathLike, *, dtype: Any = "float32",
                    param_dtype: Any = "float32", **config_overrides: Any) -> CLIP:
    """Load a Hugging Face ``CLIPModel.save_pretrained`` folder as a :class:`CLIP`.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the parameters (tensors
    are cast to it); other keyword arguments override :class:`CLIPConfig` fields that do not
    change shapes (e.g. ``remat=True``). Raises :class:`CheckpointError` (a ValueError) for a
    missing folder, config or weights file, a non-CLIP config or pickled-only weights, and
    :class:`CheckpointMismatchError` naming every missing, unexpected or misshapen tensor.
    """
    path = os.fspath(path)
    config = load_config(path, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    tensors = safetensors.TensorFiles(weight_files(path, "model", _SAVED_BY))

    return load_into(abstract_model(config), param_map(config), tensors, path=path,
                     what="CLIP model built from its config.json",
                     ignore=lambda name: name.endswith(IGNORED_SUFFIXES), hint=_MISMATCH_HINT,
                     param_dtype=config.params_dtype)


def to_hf_state_dict(model: CLIP) -> dict[str, np.ndarray]:
    """The model's parameters as a Hugging Face ``CLIPModel`` state dict of numpy arrays."""
    return state_dict(model, param_map(model.config))


def save_pretrained(model: CLIP, path: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` that transformers' CLIPModel loads."""
    path = paths.check(path)
    safetensors.write(paths.join(path, SAFETENSORS_NAME), to_hf_state_dict(model),
                      metadata=TORCH_METADATA)
    text = json.dumps(config_to_hf(model.config), indent=2)
    atomic_write(paths.join(path, CONFIG_NAME), lambda f: f.write(text), mode="w")
