"""Load diffusers ``PriorTransformer`` folders (Karlo's prior) into :class:`DiffusionPrior`.

A folder written by ``PriorTransformer.save_pretrained`` holds ``config.json`` and
``diffusion_pytorch_model.safetensors`` (or a sharded index). A pipeline folder whose prior sits
in a ``prior/`` subfolder (``UnCLIPPipeline.save_pretrained``) is accepted as well. Pickled
``.bin`` weights are refused, never opened.

Config mapping (diffusers -> :class:`PriorConfig`): embedding_dim -> embed_dim,
embedding_proj_dim -> text_embed_dim, num_embeddings -> context_length, num_attention_heads /
attention_head_dim / num_layers, time_embed_dim, time_embed_act_fn -> time_embed_act,
norm_in_type='layer' -> norm_in, embedding_proj_norm_type='layer' -> text_embed_norm,
encoder_hid_proj_type='linear' -> text_proj, added_emb_type='prd' -> prd_token, clip_embed_dim
-> out_dim. The text tokens' width is embedding_dim (diffusers projects them with a
Linear(embedding_dim, inner)), or inner = heads * head_dim when encoder_hid_proj_type is None
(fed as they are). Activation names are read as diffusers reads them (any case; 'swish' is SiLU).

Refused, because diffusers' forward cannot run them with a text mask (as every unCLIP pipeline
passes it): ``additional_embeddings`` other than 3 + (1 if prd), ``num_embeddings`` < 1. Values
diffusers' constructor itself rejects are refused too.

``clip_mean`` / ``clip_std`` load into the module's buffers, and ``embed_norm`` defaults to
'mean_std' (Karlo's normalisation). One difference from diffusers: its forward drops the causal
mask altogether when no ``attention_mask`` is passed; ours is always causal (pass the text mask,
as every diffusers pipeline does, and the two agree).

:func:`save_prior` writes the reverse: a folder ``PriorTransformer.from_pretrained`` loads. Since
diffusers' pipelines undo the normalisation with ``x * clip_std + clip_mean``, a prior trained with
embed_norm 'scale' or 'l2_sqrt_dim' is saved with the statistics that reproduce its own
:meth:`DiffusionPrior.denormalise` (mean 0, std 1/embed_scale or 1/sqrt(D)).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from flax import nnx

from unclip_jax.io import pipeline_folder, safetensors
from unclip_jax.models.diffusion_prior import (TIME_ACTIVATIONS, DiffusionPrior, PriorConfig,
                                               abstract_prior)
from unclip_jax.torch_weights import (TORCH_METADATA, CheckpointError, check_folder, load_into,
                                      read_json, torch_layout_state, weight_files)

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
_SAVED_BY = "diffusers PriorTransformer.save_pretrained"
_HINT = ("Check that config.json belongs to these weights and that they were saved from a "
         "diffusers PriorTransformer.")

# diffusers PriorTransformer defaults, for keys a config.json leaves out.
_DEFAULTS = dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768,
                 num_embeddings=77, additional_embeddings=4, dropout=0.0,
                 time_embed_act_fn="silu", norm_in_type=None, embedding_proj_norm_type=None,
                 encoder_hid_proj_type="linear", added_emb_type="prd", time_embed_dim=None,
                 embedding_proj_dim=None, clip_embed_dim=None)


_ACT_ALIASES = {"swish": "silu"}  # diffusers' get_activation: lower-cased, swish = SiLU


def config_from_diffusers(d: dict[str, Any], **overrides: Any) -> PriorConfig:
    """Our :class:`PriorConfig` from a diffusers PriorTransformer ``config.json`` dict."""
    cls = d.get("_class_name")
    if cls is not None and cls != "PriorTransformer":
        raise CheckpointError(f"config.json describes a {cls!r}, not a PriorTransformer; pass the "
                              "folder of the prior (in a pipeline folder: its 'prior' subfolder).")
    c = {**_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}
    problems = []
    act = c["time_embed_act_fn"]
    c["time_embed_act_fn"] = _ACT_ALIASES.get(act.lower(), act.lower()) if isinstance(act, str) \
        else act
    choices = dict(norm_in_type=("layer", None), embedding_proj_norm_type=("layer", None),
                   encoder_hid_proj_type=("linear", None), added_emb_type=("prd", None),
                   time_embed_act_fn=TIME_ACTIVATIONS)
    for key, allowed in choices.items():
        if c[key] not in allowed:
            problems.append(f"{key}={c[key]!r} (supported: {allowed})")
    prd = c["added_emb_type"] == "prd"
    if c["additional_embeddings"] != 3 + prd:
        problems.append(f"additional_embeddings={c['additional_embeddings']} (a prior over a "
                        f"single embedding needs {3 + prd}: z_t, timestep, x_t"
                        f"{', prd token' if prd else ''}; with any other value diffusers' "
                        "forward fails on a text mask)")
    if not isinstance(c["num_embeddings"], int) or c["num_embeddings"] < 1:
        problems.append(f"num_embeddings={c['num_embeddings']!r} (unCLIP pipelines pass text "
                        "tokens: at least 1)")
    if problems:
        raise CheckpointError("Unsupported PriorTransformer config.json: " + "; ".join(problems)
                              + ".")
    heads, head_dim = c["num_attention_heads"], c["attention_head_dim"]
    inner = heads * head_dim if type(heads) is int and type(head_dim) is int else None
    fields = dict(
        embed_dim=c["embedding_dim"], text_embed_dim=c["embedding_proj_dim"],
        text_width=None if c["encoder_hid_proj_type"] == "linear" else inner,
        out_dim=c["clip_embed_dim"], context_length=c["num_embeddings"],
        num_heads=c["num_attention_heads"], head_dim=c["attention_head_dim"],
        num_layers=c["num_layers"], time_embed_dim=c["time_embed_dim"],
        time_embed_act=c["time_embed_act_fn"], norm_in=c["norm_in_type"] == "layer",
        text_embed_norm=c["embedding_proj_norm_type"] == "layer",
        text_proj=c["encoder_hid_proj_type"] == "linear", prd_token=prd,
        dropout=c["dropout"], embed_norm="mean_std")
    problems = pipeline_folder.config_field_problems(PriorConfig, fields)
    if problems:
        raise CheckpointError("Unsupported PriorTransformer config.json: " + "; ".join(problems)
                              + ".")
    fields["dropout"] = float(fields["dropout"])
    fields.update(overrides)
    if fields.get("learned_null"):
        raise CheckpointError("diffusers PriorTransformer checkpoints carry no null text "
                              "conditioning, so learned_null=True cannot be loaded; guide with "
                              "the CLIP encoding of the empty caption instead.")
    return PriorConfig(**fields)


def param_map(config: PriorConfig) -> dict[tuple, tuple[str, str]]:
    """Every variable path of ``DiffusionPrior(config)`` -> (diffusers tensor name, layout)."""
    table: dict[tuple, tuple[str, str]] = {}

    def linear(ours: tuple, theirs: str):
        table[(*ours, "kernel")] = (f"{theirs}.weight", "linear")
        table[(*ours, "bias")] = (f"{theirs}.bias", "copy")

    def norm(ours: tuple, theirs: str):
        table[(*ours, "scale")] = (f"{theirs}.weight", "copy")
        table[(*ours, "bias")] = (f"{theirs}.bias", "copy")

    linear(("time_embedding", "linear_1"), "time_embedding.linear_1")
    linear(("time_embedding", "linear_2"), "time_embedding.linear_2")
    linear(("proj_in",), "proj_in")
    if config.text_embed_norm:
        norm(("embedding_proj_norm",), "embedding_proj_norm")
    linear(("embedding_proj",), "embedding_proj")
    if config.text_proj:
        linear(("encoder_hidden_states_proj",), "encoder_hidden_states_proj")
    table[("positional_embedding",)] = ("positional_embedding", "copy")
    if config.prd_token:
        table[("prd_embedding",)] = ("prd_embedding", "copy")
    if config.norm_in:
        norm(("norm_in",), "norm_in")
    for i in range(config.num_layers):
        ours, theirs = ("blocks", i), f"transformer_blocks.{i}"
        norm((*ours, "norm1"), f"{theirs}.norm1")
        for name in ("to_q", "to_k", "to_v"):
            linear((*ours, "attn", name), f"{theirs}.attn1.{name}")
        linear((*ours, "attn", "to_out"), f"{theirs}.attn1.to_out.0")
        norm((*ours, "norm2"), f"{theirs}.norm3")
        linear((*ours, "mlp", "fc1"), f"{theirs}.ff.net.0.proj")
        linear((*ours, "mlp", "fc2"), f"{theirs}.ff.net.2")
    norm(("norm_out",), "norm_out")
    linear(("proj_out",), "proj_to_clip_embeddings")
    table[("clip_mean",)] = ("clip_mean", "copy")
    table[("clip_std",)] = ("clip_std", "copy")
    return table


def _prior_folder(path: str) -> str:
    check_folder(path, f"a folder written by {_SAVED_BY}")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        sub = os.path.join(path, "prior")
        if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            return sub
        raise CheckpointError(f"{path} has no {CONFIG_NAME} (nor prior/{CONFIG_NAME}); expected "
                              f"a folder written by {_SAVED_BY}.")
    return path


def load_config(path: str | os.PathLike, **overrides: Any) -> PriorConfig:
    """The :class:`PriorConfig` of a diffusers prior folder (or of a pipeline's ``prior/``)."""
    folder = _prior_folder(os.fspath(path))
    return config_from_diffusers(read_json(os.path.join(folder, CONFIG_NAME)), **overrides)


def load_prior(path: str | os.PathLike, *, dtype: Any = "float32", param_dtype: Any = "float32",
               **config_overrides: Any) -> DiffusionPrior:
    """Load a diffusers ``PriorTransformer.save_pretrained`` folder as a :class:`DiffusionPrior`.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype; other keyword arguments
    override :class:`PriorConfig` fields that do not change shapes (``embed_norm``, ``remat``,
    ``dropout``). ``clip_mean`` / ``clip_std`` come along. Raises :class:`CheckpointError` for a
    missing folder, config or weights, an unsupported config or pickled-only weights, and
    ``CheckpointMismatchError`` naming every missing, unexpected or misshapen tensor.
    """
    folder = _prior_folder(os.fspath(path))
    config = load_config(folder, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    tensors = safetensors.TensorFiles(weight_files(folder, WEIGHTS_STEM, _SAVED_BY))
    return load_into(abstract_prior(config), param_map(config), tensors, path=folder,
                     what="diffusion prior built from its config.json", hint=_HINT,
                     param_dtype=config.params_dtype)


def config_to_diffusers(config: PriorConfig) -> dict[str, Any]:
    """A diffusers ``config.json`` dict for a prior with this config."""
    problems = []
    if config.learned_null:
        problems.append("it has a learned null conditioning (learned_null=True), which "
                        "PriorTransformer cannot hold")
    if config.text_proj and config.token_width != config.embed_dim:
        problems.append(f"its text tokens are {config.token_width} wide, but PriorTransformer "
                        f"projects tokens of embedding_dim ({config.embed_dim})")
    if problems:
        raise CheckpointError("This prior cannot be saved as a diffusers PriorTransformer: "
                              + "; ".join(problems) + ".")
    return dict(
        _class_name="PriorTransformer", num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim, num_layers=config.num_layers,
        embedding_dim=config.embed_dim, num_embeddings=config.context_length,
        additional_embeddings=3 + int(config.prd_token), dropout=config.dropout,
        time_embed_act_fn=config.time_embed_act,
        norm_in_type="layer" if config.norm_in else None,
        embedding_proj_norm_type="layer" if config.text_embed_norm else None,
        encoder_hid_proj_type="linear" if config.text_proj else None,
        added_emb_type="prd" if config.prd_token else None,
        time_embed_dim=config.time_embed_dim, embedding_proj_dim=config.text_embed_dim,
        clip_embed_dim=config.out_dim)


def save_prior(model: DiffusionPrior, path: str | os.PathLike) -> None:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` for diffusers."""
    path = os.fspath(path)
    cfg = model.config
    table = param_map(cfg)
    config = config_to_diffusers(cfg)
    tensors = {name: a.astype(np.float32)
               for name, a in torch_layout_state(nnx.state(model), table).items()}
    d = cfg.output_dim
    if cfg.embed_norm != "mean_std":  # statistics that make x * std + mean our denormalise
        scale = cfg.embed_scale if cfg.embed_norm == "scale" else math.sqrt(d)
        tensors["clip_mean"] = np.zeros((1, d), np.float32)
        tensors["clip_std"] = np.full((1, d), 1.0 / scale, np.float32)
    safetensors.write(os.path.join(path, f"{WEIGHTS_STEM}.safetensors"), tensors,
                      metadata=TORCH_METADATA)
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
