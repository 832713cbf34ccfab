"""Load diffusers' unCLIP UNets (Karlo's decoder and super-resolution models) into our modules.

* :func:`load_super_res` reads a ``UNet2DModel`` folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``) in Karlo's ``super_res_first`` / ``super_res_last``
  layout (``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D``, ``UNetMidBlock2D`` with or
  without attention) and returns a :class:`~unclip_jax.models.upsampler.SuperRes`.
* :func:`load_decoder` reads a diffusers ``UnCLIPPipeline`` folder, its ``decoder/``
  (``UNet2DConditionModel``: ``ResnetDownsampleBlock2D`` / ``SimpleCrossAttnDownBlock2D``,
  ``UNetMidBlock2DSimpleCrossAttn``, ``SimpleCrossAttnUpBlock2D`` / ``ResnetUpsampleBlock2D``,
  class_embed_type "identity") and ``text_proj/`` (``UnCLIPTextProjModel``) subfolders, and
  returns a :class:`~unclip_jax.models.decoder.Decoder` with ``text_encoder='clip'``.

Each is a name table (our parameter path -> diffusers tensor name and layout) handed to
``unclip_jax.torch_weights.load_into``, which checks every tensor before reading any.
Within these layouts the options that change the computation are read: in/out channels,
block_out_channels (multiples of the first), layers_per_block, attention_head_dim,
cross_attention_dim, norm_num_groups / norm_eps, resnet_time_scale_shift, act_fn (UNet2DModel
keeps SiLU outside its resnets, as diffusers does), resnet_skip_time_act, center_input_sample,
the super-res add_attention (with its attention_head_dim, normalised with norm_num_groups),
dropout, time_embedding_dim, flip_sin_to_cos / freq_shift, and the decoder's sample_size
(our ``image_size``). Anything else is refused with a message naming the offending key.
"""
from __future__ import annotations

import os
from typing import Any


from unclip_jax.models.decoder import Decoder, DecoderConfig, abstract_decoder
from unclip_jax.models.unet_blocks import ACTIVATIONS, UNetConfig
from unclip_jax.models.upsampler import SuperRes, SuperResConfig, abstract_super_res
from unclip_jax.io.safetensors import TensorFiles
from unclip_jax.torch_weights import (CheckpointError, NameTable, check_folder, load_into,
                                      read_json, weight_files)

_WEIGHTS_STEM = "diffusion_pytorch_model"
_SAVED_BY = "diffusers ModelMixin.save_pretrained"

# diffusers' constructor defaults for the keys we read (a config.json may leave them out).
_UNET2D_DEFAULTS = dict(
    in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    dropout=0.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
    num_class_embeds=None, attention_head_dim=8, attn_norm_num_groups=None)
_COND_DEFAULTS = dict(
    in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, mid_block_scale_factor=1,
    dropout=0.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
    attention_head_dim=8, num_attention_heads=None, encoder_hid_dim=None,
    encoder_hid_dim_type=None, class_embed_type=None, addition_embed_type=None,
    num_class_embeds=None, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
    conv_in_kernel=3, conv_out_kernel=3, class_embeddings_concat=False,
    mid_block_only_cross_attention=None, cross_attention_norm=None, transformer_layers_per_block=1,
    dual_cross_attention=False, use_linear_projection=False, upcast_attention=False,
    sample_size=None)
_TEXT_PROJ_DEFAULTS = dict(clip_extra_context_tokens=4, clip_embeddings_dim=768)


# --------------------------------------------------------------------------------------------
# Name tables
# --------------------------------------------------------------------------------------------

def _linear(table: NameTable, ours: tuple, theirs: str) -> None:
    table[(*ours, "kernel")] = (f"{theirs}.weight", "linear")
    table[(*ours, "bias")] = (f"{theirs}.bias", "copy")


def _conv(table: NameTable, ours: tuple, theirs: str) -> None:
    table[(*ours, "kernel")] = (f"{theirs}.weight", "conv")
    table[(*ours, "bias")] = (f"{theirs}.bias", "copy")


def _norm(table: NameTable, ours: tuple, theirs: str) -> None:
    table[(*ours, "scale")] = (f"{theirs}.weight", "copy")
    table[(*ours, "bias")] = (f"{theirs}.bias", "copy")


def _resblock(table: NameTable, ours: tuple, theirs: str, has_shortcut: bool) -> None:
    _norm(table, (*ours, "norm1"), f"{theirs}.norm1")
    _conv(table, (*ours, "conv1"), f"{theirs}.conv1")
    _linear(table, (*ours, "time_emb_proj"), f"{theirs}.time_emb_proj")
    _norm(table, (*ours, "norm2"), f"{theirs}.norm2")
    _conv(table, (*ours, "conv2"), f"{theirs}.conv2")
    if has_shortcut:
        _conv(table, (*ours, "conv_shortcut"), f"{theirs}.conv_shortcut")


def _attention(table: NameTable, ours: tuple, theirs: str, context: bool) -> None:
    _norm(table, (*ours, "group_norm"), f"{theirs}.group_norm")
    for name in ("to_q", "to_k", "to_v") + (("add_k_proj", "add_v_proj") if context else ()):
        _linear(table, (*ours, name), f"{theirs}.{name}")
    _linear(table, (*ours, "to_out"), f"{theirs}.to_out.0")


def unet_param_map(c: UNetConfig, prefix: tuple = ("unet",)) -> NameTable:
    """Every parameter of ``UNet(c)`` (under ``prefix``) -> its diffusers tensor name."""
    if not c.resblock_updown:
        raise ValueError("Only the resblock_updown=True layout has a diffusers counterpart here.")
    table: NameTable = {}
    ctx = c.context_dim is not None
    widths = c.widths
    n = len(widths)
    _conv(table, (*prefix, "conv_in"), "conv_in")
    _linear(table, (*prefix, "time_embed", "linear_1"), "time_embedding.linear_1")
    _linear(table, (*prefix, "time_embed", "linear_2"), "time_embedding.linear_2")

    skips, width = [widths[0]], widths[0]
    for lvl, out in enumerate(widths):
        for i in range(c.num_res_blocks):
            _resblock(table, (*prefix, "down", lvl, "res", i), f"down_blocks.{lvl}.resnets.{i}",
                      width != out)
            if lvl in c.attention_levels:
                _attention(table, (*prefix, "down", lvl, "attn", i),
                           f"down_blocks.{lvl}.attentions.{i}", ctx)
            width = out
            skips.append(width)
        if lvl < n - 1:
            _resblock(table, (*prefix, "down", lvl, "resample"),
                      f"down_blocks.{lvl}.downsamplers.0", False)
            skips.append(out)

    _resblock(table, (*prefix, "mid", "res", 0), "mid_block.resnets.0", False)
    _resblock(table, (*prefix, "mid", "res", 1), "mid_block.resnets.1", False)
    if c.mid_attention:
        _attention(table, (*prefix, "mid", "attn"), "mid_block.attentions.0", ctx)

    for j, lvl in enumerate(reversed(range(n))):
        out = widths[lvl]
        for i in range(c.num_res_blocks + 1):
            _resblock(table, (*prefix, "up", j, "res", i), f"up_blocks.{j}.resnets.{i}",
                      width + skips.pop() != out)
            if lvl in c.attention_levels:
                _attention(table, (*prefix, "up", j, "attn", i), f"up_blocks.{j}.attentions.{i}",
                           ctx)
            width = out
        if lvl > 0:
            _resblock(table, (*prefix, "up", j, "resample"), f"up_blocks.{j}.upsamplers.0", False)

    _norm(table, (*prefix, "norm_out"), "conv_norm_out")
    _conv(table, (*prefix, "conv_out"), "conv_out")
    return table


def text_proj_param_map(c: DecoderConfig) -> NameTable:
    """The decoder's conditioning projections -> ``UnCLIPTextProjModel`` tensor names."""
    table: NameTable = {("null_image_embed",): ("learned_classifier_free_guidance_embeddings", "copy")}
    _linear(table, ("image_to_time",), "clip_image_embeddings_project_to_time_embeddings")
    if c.use_text_embed:
        _linear(table, ("text_to_time",), "embedding_proj")
    _linear(table, ("image_to_tokens",), "clip_extra_context_tokens_proj")
    if c.text_encoder != "none":
        _linear(table, ("text_to_context",), "encoder_hidden_states_proj")
        _norm(table, ("text_norm",), "text_encoder_hidden_states_norm")
    return table


# --------------------------------------------------------------------------------------------
# Config reading
# --------------------------------------------------------------------------------------------

def _read_config(path: str, class_name: str, defaults: dict) -> dict[str, Any]:
    check_folder(path, f"a {class_name} folder written by {_SAVED_BY}")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} has no config.json; expected a {class_name} folder written "
                              f"by {_SAVED_BY}.")
    raw = read_json(file)
    found = raw.get("_class_name")
    if found is not None and found != class_name:
        raise CheckpointError(f"{file} describes a {found}, expected a {class_name}.")
    return {**defaults, **raw}


def _require(cfg: dict, where: str, **expected) -> None:
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 (JSON has lists)
    problems = [f"{key}={cfg.get(key)!r} (supported: {want!r})"
                for key, want in expected.items() if norm(cfg.get(key)) != norm(want)]
    if problems:
        raise CheckpointError(f"Unsupported {where}: " + "; ".join(problems) + ".")


def _scale_shift(cfg: dict, where: str) -> bool:
    mode = cfg["resnet_time_scale_shift"]
    if mode not in ("default", "scale_shift"):
        raise CheckpointError(f"Unsupported {where}: resnet_time_scale_shift={mode!r} "
                              "(supported: 'default', 'scale_shift').")
    return mode == "scale_shift"


def _act(cfg: dict, where: str) -> str:
    """act_fn as diffusers' get_activation reads it (any case; 'swish' is SiLU)."""
    name = cfg["act_fn"]
    act = {"swish": "silu"}.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if act not in ACTIVATIONS:
        raise CheckpointError(f"Unsupported {where}: act_fn={name!r} (diffusers knows "
                              "'silu', 'swish', 'mish', 'gelu', 'relu').")
    return act


def super_res_config_from_diffusers(cfg: dict, **overrides) -> SuperResConfig:
    where = "UNet2DModel config (the super-res loader reads Karlo's super_res layout)"
    n = len(cfg["block_out_channels"])
    _require(cfg, where, down_block_types=["ResnetDownsampleBlock2D"] * n,
             up_block_types=["ResnetUpsampleBlock2D"] * n, mid_block_type="UNetMidBlock2D",
             time_embedding_type="positional",
             class_embed_type=None, num_class_embeds=None)
    if float(cfg["mid_block_scale_factor"]) != 1.0:
        raise CheckpointError(f"Unsupported {where}: mid_block_scale_factor must be 1.")
    groups, attn_groups = cfg["norm_num_groups"], cfg["attn_norm_num_groups"]
    if cfg["add_attention"] and (attn_groups not in (None, groups) or (
            attn_groups is None and cfg["resnet_time_scale_shift"] != "default")):
        raise CheckpointError(f"Unsupported {where}: add_attention=True with "
                              f"attn_norm_num_groups={attn_groups!r} (supported: the middle "
                              f"attention normalised with norm_num_groups={groups}).")
    cfg = dict(cfg, down_block_types=list(cfg["down_block_types"]),
               up_block_types=list(cfg["up_block_types"]))
    widths = list(cfg["block_out_channels"])
    base = widths[0]
    if any(w % base for w in widths) or cfg["in_channels"] % 2:
        raise CheckpointError(f"Unsupported {where}: block_out_channels {widths} must be "
                              f"multiples of the first, and in_channels ({cfg['in_channels']}) "
                              "even (noisy image + low-res image).")
    fields = dict(
        image_channels=cfg["in_channels"] // 2, out_channels=cfg["out_channels"], channels=base,
        channel_mult=tuple(w // base for w in widths), num_res_blocks=cfg["layers_per_block"],
        groups=cfg["norm_num_groups"], norm_eps=float(cfg["norm_eps"]),
        scale_shift=_scale_shift(cfg, where), dropout=float(cfg["dropout"]),
        act=_act(cfg, where), center_input=bool(cfg["center_input_sample"]),
        mid_attention=bool(cfg["add_attention"]),
        head_dim=cfg["attention_head_dim"] or widths[-1],
        time_embed_dim=cfg["time_embedding_dim"], flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]),
        freq_shift=float(cfg["freq_shift"]))
    fields.update(overrides)
    return SuperResConfig(**fields)


def decoder_config_from_diffusers(unet: dict, proj: dict, **overrides) -> DecoderConfig:
    where = "UNet2DConditionModel config (the decoder loader reads Karlo's decoder layout)"
    n = len(unet["block_out_channels"])
    down, up = list(unet["down_block_types"]), list(unet["up_block_types"])
    ok_down = {"ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"}
    ok_up = {"ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"}
    if len(down) != n or len(up) != n or set(down) - ok_down or set(up) - ok_up:
        raise CheckpointError(f"Unsupported {where}: down_block_types {down} / up_block_types "
                              f"{up}; supported: {sorted(ok_down)} / {sorted(ok_up)}, one per "
                              "entry of block_out_channels.")
    attn_down = tuple(i for i, b in enumerate(down) if b.startswith("SimpleCrossAttn"))
    attn_up = tuple(sorted(n - 1 - j for j, b in enumerate(up) if b.startswith("SimpleCrossAttn")))
    if attn_down != attn_up:
        raise CheckpointError(f"Unsupported {where}: the up path must mirror the down path "
                              f"(attention at levels {attn_down} going down, {attn_up} going up).")
    _require(unet, where, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
             class_embed_type="identity",
             time_embedding_type="positional", only_cross_attention=False,
             addition_embed_type=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
             time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
             conv_in_kernel=3, conv_out_kernel=3, class_embeddings_concat=False,
             cross_attention_norm=None, num_attention_heads=None)
    if unet["mid_block_only_cross_attention"] not in (None, False):
        raise CheckpointError(f"Unsupported {where}: mid_block_only_cross_attention must be false.")
    for key in ("mid_block_scale_factor", "resnet_out_scale_factor"):
        if float(unet[key]) != 1.0:
            raise CheckpointError(f"Unsupported {where}: {key} must be 1.")
    for key in ("attention_head_dim", "cross_attention_dim", "layers_per_block"):
        if not isinstance(unet[key], int):
            raise CheckpointError(f"Unsupported {where}: {key} must be a single int, got "
                                  f"{unet[key]!r}.")
    size = unet["sample_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise CheckpointError(f"Unsupported {where}: sample_size={size!r} (UnCLIPPipeline "
                              "samples square images of sample_size: a positive int).")
    widths = list(unet["block_out_channels"])
    base = widths[0]
    emb = unet["time_embedding_dim"] or 4 * base
    if proj.get("time_embed_dim") not in (None, emb) or \
            proj.get("cross_attention_dim") not in (None, unet["cross_attention_dim"]):
        raise CheckpointError(
            f"text_proj/config.json (time_embed_dim {proj.get('time_embed_dim')}, "
            f"cross_attention_dim {proj.get('cross_attention_dim')}) does not fit decoder/ "
            f"(time embedding {emb}, cross_attention_dim {unet['cross_attention_dim']}).")
    if any(w % base for w in widths):
        raise CheckpointError(f"Unsupported {where}: block_out_channels {widths} must be "
                              "multiples of the first.")
    fields = dict(
        image_channels=unet["in_channels"], out_channels=unet["out_channels"], channels=base,
        channel_mult=tuple(w // base for w in widths), num_res_blocks=unet["layers_per_block"],
        attention_levels=attn_down, mid_attention=True, head_dim=unet["attention_head_dim"],
        groups=unet["norm_num_groups"], norm_eps=float(unet["norm_eps"]),
        scale_shift=_scale_shift(unet, where), act=_act(unet, where),
        res_time_act=not unet["resnet_skip_time_act"],
        center_input=bool(unet["center_input_sample"]),
        dropout=float(unet["dropout"]), time_embed_dim=unet["time_embedding_dim"],
        flip_sin_to_cos=bool(unet["flip_sin_to_cos"]), freq_shift=float(unet["freq_shift"]),
        clip_dim=proj["clip_embeddings_dim"], context_dim=unet["cross_attention_dim"],
        clip_tokens=proj["clip_extra_context_tokens"], use_text_embed=True, text_encoder="clip",
        text_width=proj["clip_embeddings_dim"])
    if size is not None:  # else our default
        fields["image_size"] = size
    fields.update(overrides)
    return DecoderConfig(**fields)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

class _Prefixed(TensorFiles):
    """Tensors of several folders under one namespace (``prefix.name``)."""

    def __init__(self, parts: dict[str, TensorFiles]):
        self.headers, self._source = {}, {}
        for prefix, files in parts.items():
            for name, value in files.headers.items():
                self.headers[f"{prefix}.{name}"] = value
                self._source[f"{prefix}.{name}"] = (files, name)

    def read(self, name: str):
        files, original = self._source[name]
        return files.read(original)


def load_super_res(path: str | os.PathLike, *, dtype: Any = "float32",
                   param_dtype: Any = "float32", **overrides) -> SuperRes:
    """A diffusers ``UNet2DModel`` folder (Karlo's super-res layout) as our :class:`SuperRes`.

    ``overrides`` replace :class:`SuperResConfig` fields that do not change shapes (e.g.
    ``remat=True``). Raises ``CheckpointError`` for a missing / unsupported folder or config and
    ``CheckpointMismatchError`` naming every missing, unexpected or misshapen tensor.
    """
    path = os.fspath(path)
    cfg = _read_config(path, "UNet2DModel", _UNET2D_DEFAULTS)
    config = super_res_config_from_diffusers(cfg, dtype=dtype, param_dtype=param_dtype, **overrides)
    tensors = TensorFiles(weight_files(path, _WEIGHTS_STEM, _SAVED_BY))
    abstract = abstract_super_res(config)
    return load_into(abstract, unet_param_map(config.unet_config()), tensors, path=path,
                     what="super-resolution UNet built from its config.json",
                     hint="Check that config.json belongs to these weights.",
                     param_dtype=config.unet_config().params_dtype)


def load_decoder(path: str | os.PathLike, *, dtype: Any = "float32",
                 param_dtype: Any = "float32", **overrides) -> Decoder:
    """The decoder of a diffusers ``UnCLIPPipeline`` folder (``decoder/`` + ``text_proj/``).

    Returns a :class:`Decoder` (``text_encoder='clip'``) whose call equals the pipeline's
    ``text_proj`` (without guidance) followed by ``decoder(..., class_labels=...,
    attention_mask=...)`` with the extra tokens' mask set to true, in NHWC.
    """
    path = os.fspath(path)
    check_folder(path, "a diffusers UnCLIPPipeline folder with decoder/ and text_proj/")
    missing = [d for d in ("decoder", "text_proj") if not os.path.isdir(os.path.join(path, d))]
    if missing:
        raise CheckpointError(f"{path} has no {' or '.join(d + '/' for d in missing)} subfolder; "
                              "expected a diffusers UnCLIPPipeline folder (UnCLIPPipeline."
                              "save_pretrained writes decoder/ and text_proj/).")
    dec_path, proj_path = os.path.join(path, "decoder"), os.path.join(path, "text_proj")
    unet_cfg = _read_config(dec_path, "UNet2DConditionModel", _COND_DEFAULTS)
    proj_cfg = _read_config(proj_path, "UnCLIPTextProjModel", _TEXT_PROJ_DEFAULTS)
    config = decoder_config_from_diffusers(unet_cfg, proj_cfg, dtype=dtype,
                                           param_dtype=param_dtype, **overrides)
    tensors = _Prefixed({
        "decoder": TensorFiles(weight_files(dec_path, _WEIGHTS_STEM, _SAVED_BY)),
        "text_proj": TensorFiles(weight_files(proj_path, _WEIGHTS_STEM, _SAVED_BY))})
    table = {k: (f"decoder.{name}", kind)
             for k, (name, kind) in unet_param_map(config.unet_config()).items()}
    table.update({k: (f"text_proj.{name}", kind)
                  for k, (name, kind) in text_proj_param_map(config).items()})
    abstract = abstract_decoder(config)
    return load_into(abstract, table, tensors, path=path,
                     what="unCLIP decoder built from decoder/config.json and text_proj/config.json",
                     hint="Check that the config.json files belong to these weights.",
                     param_dtype=config.unet_config().params_dtype)
