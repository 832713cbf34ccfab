"""Load diffusers' unCLIP UNets (Karlo's decoder and super-resolution models) into our modules.

* :func:`load_super_res` reads a ``UNet2DModel`` folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``), Karlo's ``super_res_first`` / ``super_res_last``
  and its variants, and returns a :class:`~unclip_jax.models.upsampler.SuperRes`.
* :func:`load_decoder` reads a diffusers ``UnCLIPPipeline`` folder, its ``decoder/``
  (``UNet2DConditionModel``) and ``text_proj/`` (``UnCLIPTextProjModel``) subfolders, and
  returns a :class:`~unclip_jax.models.decoder.Decoder` with ``text_encoder='clip'``.

Each is a name table (our parameter path -> diffusers tensor name and layout) handed to
``unclip_jax.torch_weights.load_into``, which checks every tensor before reading any.

Read and converted (each with a parity test against diffusers in tests/test_convert_variants.py):

* both: block_out_channels (any widths), layers_per_block, norm_num_groups / norm_eps,
  resnet_time_scale_shift 'default' / 'scale_shift', act_fn, dropout, center_input_sample,
  time_embedding_dim, flip_sin_to_cos / freq_shift, mid_block_scale_factor, mid_block_type
  (None: no middle block), downsample_padding 0 / 1;
* UNet2DModel: down / up blocks ResnetDownsampleBlock2D, DownBlock2D, AttnDownBlock2D /
  ResnetUpsampleBlock2D, UpBlock2D, AttnUpBlock2D (downsample_type / upsample_type 'conv' or
  'resnet'), add_attention, attention_head_dim (None: one head), attn_norm_num_groups (None
  with 'scale_shift': no norm before the middle attention), time_embedding_type 'positional' /
  'learned' (num_train_timesteps);
* UNet2DConditionModel: down / up blocks ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D,
  DownBlock2D, AttnDownBlock2D / ResnetUpsampleBlock2D, SimpleCrossAttnUpBlock2D, UpBlock2D,
  AttnUpBlock2D in any mix, middle UNetMidBlock2DSimpleCrossAttn / UNetMidBlock2D / None;
  per-block layers_per_block, attention_head_dim (None: one head; the up path reads the list
  unreversed, as diffusers does) and cross_attention_dim (equal where attention reads it);
  only_cross_attention / mid_block_only_cross_attention, cross_attention_norm,
  resnet_out_scale_factor, resnet_skip_time_act, class_embed_type 'identity' / None / 'projection' /
  'simple_projection', class_embeddings_concat, time_embedding_type 'positional' / 'fourier',
  time_embedding_act_fn, timestep_post_act, time_cond_proj_dim (its projection only reads
  timestep_cond, which UnCLIPPipeline never passes: dropped), conv_in_kernel / conv_out_kernel
  (odd), encoder_hid_dim ('text_proj'), addition_embed_type 'text', sample_size (our
  ``image_size``). Options of blocks we do not build (the Transformer blocks'
  transformer_layers_per_block, use_linear_projection, upcast_attention, dual_cross_attention)
  change nothing here.

Anything else is refused with a one-line CheckpointError naming the option and its value (and
why: most of the rest are configurations UnCLIPPipeline cannot run, e.g. CrossAttn*Block2D /
UNetMidBlock2DCrossAttn, whose Transformer self-attention receives the pipeline's token mask).
Cross-only attention is the exception the other way: diffusers pads UnCLIP's token mask for
spatial keys that it does not have, so UnCLIPPipeline fails on it; ours masks the tokens (parity
is checked with every token kept).
"""
from __future__ import annotations

import math
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
    num_class_embeds=None, attention_head_dim=8, attn_norm_num_groups=None, downsample_padding=1,
    downsample_type="conv", upsample_type="conv")
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
    sample_size=None, attention_type="default", downsample_padding=1,
    projection_class_embeddings_input_dim=None, addition_embed_type_num_heads=64)
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


def _attention(table: NameTable, ours: tuple, theirs: str, c: UNetConfig,
               cross_only: bool = False, self_only: bool = False, norm: bool | None = None
               ) -> None:
    ctx = c.context_dim is not None and not self_only
    if c.attn_norm if norm is None else norm:
        _norm(table, (*ours, "group_norm"), f"{theirs}.group_norm")
    if c.context_norm is not None and ctx:
        _norm(table, (*ours, "norm_cross"), f"{theirs}.norm_cross")
    names = ("to_q",) + (() if cross_only and ctx else ("to_k", "to_v"))
    for name in names + (("add_k_proj", "add_v_proj") if ctx else ()):
        _linear(table, (*ours, name), f"{theirs}.{name}")
    _linear(table, (*ours, "to_out"), f"{theirs}.to_out.0")


def _resample(table: NameTable, ours: tuple, theirs: str, resblock: bool) -> None:
    if resblock:
        _resblock(table, ours, theirs, False)
    else:
        _conv(table, (*ours, "conv"), f"{theirs}.conv")


def unet_param_map(c: UNetConfig, prefix: tuple = ("unet",)) -> NameTable:
    """Every parameter of ``UNet(c)`` (under ``prefix``) -> its diffusers tensor name."""
    table: NameTable = {}
    widths = c.widths
    n = len(widths)
    _conv(table, (*prefix, "conv_in"), "conv_in")
    if c.time_proj in ("fourier", "learned"):
        table[(*prefix, "time_proj", "weight")] = ("time_proj.weight", "copy")
    _linear(table, (*prefix, "time_embed", "linear_1"), "time_embedding.linear_1")
    _linear(table, (*prefix, "time_embed", "linear_2"), "time_embedding.linear_2")

    skips, width = [widths[0]], widths[0]
    for lvl, out in enumerate(widths):
        for i in range(c.at("num_res_blocks", lvl)):
            _resblock(table, (*prefix, "down", lvl, "res", i), f"down_blocks.{lvl}.resnets.{i}",
                      width != out)
            if lvl in c.attention_levels:
                _attention(table, (*prefix, "down", lvl, "attn", i),
                           f"down_blocks.{lvl}.attentions.{i}", c, c.at("cross_only", lvl),
                           c.self_only(lvl))
            width = out
            skips.append(width)
        if lvl < n - 1:
            _resample(table, (*prefix, "down", lvl, "resample"),
                      f"down_blocks.{lvl}.downsamplers.0", c.at("resblock_updown", lvl))
            skips.append(out)

    for i in range(c.mid_blocks):
        _resblock(table, (*prefix, "mid", "res", i), f"mid_block.resnets.{i}", False)
    if c.mid_blocks and c.mid_attention:
        _attention(table, (*prefix, "mid", "attn"), "mid_block.attentions.0", c,
                   c.mid_cross_only, norm=c.mid_norm)

    for j, lvl in enumerate(reversed(range(n))):
        out = widths[lvl]
        for i in range(c.at("num_res_blocks", lvl) + 1):
            _resblock(table, (*prefix, "up", j, "res", i), f"up_blocks.{j}.resnets.{i}",
                      width + skips.pop() != out)
            if lvl in c.attn_levels(True):
                _attention(table, (*prefix, "up", j, "attn", i), f"up_blocks.{j}.attentions.{i}",
                           c, c.at("cross_only", lvl), c.self_only(lvl, True))
            width = out
        if lvl > 0:
            _resample(table, (*prefix, "up", j, "resample"), f"up_blocks.{j}.upsamplers.0",
                      c.at("resblock_updown", lvl, True))

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


def class_embedding_param_map(c: DecoderConfig) -> NameTable:
    """``cond_to_time`` and ``context_proj`` -> the UNet2DConditionModel's ``class_embedding``
    and ``encoder_hid_proj`` tensor names."""
    table: NameTable = {}
    if c.token_dim is not None:
        _linear(table, ("context_proj",), "encoder_hid_proj")
    if c.token_pool_heads:
        pool, theirs = ("token_pool",), "add_embedding"
        _norm(table, (*pool, "norm1"), f"{theirs}.norm1")
        table[(*pool, "positional_embedding")] = (f"{theirs}.pool.positional_embedding", "copy")
        for name in ("q_proj", "k_proj", "v_proj"):
            _linear(table, (*pool, name), f"{theirs}.pool.{name}")
        _linear(table, (*pool, "proj"), f"{theirs}.proj")
        _norm(table, (*pool, "norm2"), f"{theirs}.norm2")
    if c.cond_to_time == "linear":
        _linear(table, ("cond_to_time",), "class_embedding")
    elif c.cond_to_time == "mlp":
        _linear(table, ("cond_to_time", "linear_1"), "class_embedding.linear_1")
        _linear(table, ("cond_to_time", "linear_2"), "class_embedding.linear_2")
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
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} holds a JSON {type(raw).__name__}, expected the object "
                              f"of a {class_name} config.")
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


def _refuse(where: str, key: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"Unsupported {where}: {key}={value!r} ({why}).")


def _scale_shift(cfg: dict, where: str) -> bool:
    mode = cfg["resnet_time_scale_shift"]
    if mode not in ("default", "scale_shift"):
        raise CheckpointError(f"Unsupported {where}: resnet_time_scale_shift={mode!r} "
                              "(supported: 'default', 'scale_shift').")
    return mode == "scale_shift"


def _act(cfg: dict, where: str, key: str = "act_fn", optional: bool = False) -> str | None:
    """An activation as diffusers' get_activation reads it (any case; 'swish' is SiLU)."""
    name = cfg[key]
    if name is None and optional:
        return None
    act = {"swish": "silu"}.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if act not in ACTIVATIONS:
        raise CheckpointError(f"Unsupported {where}: {key}={name!r} (diffusers knows "
                              "'silu', 'swish', 'mish', 'gelu', 'relu').")
    return act


def _number(cfg: dict, where: str, key: str, positive: bool = True) -> float:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise _refuse(where, key, value, "a finite number" + (" above 0" if positive else ""))
    return float(value)


def _common(cfg: dict, where: str) -> dict:
    """The options UNet2DModel and UNet2DConditionModel read alike, checked."""
    dropout = _number(cfg, where, "dropout", positive=False)
    if not 0.0 <= dropout < 1.0:
        raise _refuse(where, "dropout", cfg["dropout"], "a probability in [0, 1)")
    for key in ("center_input_sample", "flip_sin_to_cos"):
        if not isinstance(cfg[key], bool):
            raise _refuse(where, key, cfg[key], "true or false")
    time_dim = cfg["time_embedding_dim"]
    return dict(
        dropout=dropout, center_input=cfg["center_input_sample"],
        flip_sin_to_cos=cfg["flip_sin_to_cos"],
        freq_shift=_number(cfg, where, "freq_shift", positive=False),
        time_embed_dim=None if time_dim is None else _int(time_dim, where, "time_embedding_dim"),
        norm_eps=_number(cfg, where, "norm_eps"), scale_shift=_scale_shift(cfg, where),
        act=_act(cfg, where))


def _int(value: Any, where: str, key: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _refuse(where, key, value, f"an int of at least {low}")
    return value


def _per_level(cfg: dict, where: str, key: str, n: int, kind=int, allow_none: bool = False,
               low: int = 1) -> list:
    """A diffusers option given once or once per block (a list of n) as a list of n values."""
    value = cfg[key]
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise _refuse(where, key, value, f"one value or one per block ({n})")
    for v in values:
        if v is None and allow_none:
            continue
        if kind is bool:
            if not isinstance(v, bool):
                raise _refuse(where, key, value, "true / false, or one per block")
        else:
            _int(v, where, key, low)
    return values


def _widths(cfg: dict, where: str, groups: int) -> tuple[list, int, tuple]:
    """block_out_channels as (widths, base, channel_mult or None)."""
    widths = cfg["block_out_channels"]
    if not isinstance(widths, (list, tuple)) or not widths:
        raise _refuse(where, "block_out_channels", widths, "a list of widths, one per block")
    for w in widths:
        _int(w, where, "block_out_channels")
        if w % groups:
            raise _refuse(where, "block_out_channels", widths,
                          f"every width a multiple of norm_num_groups={groups}")
    widths = list(widths)
    return widths, widths[0], (tuple(w // widths[0] for w in widths)
                               if all(w % widths[0] == 0 for w in widths) else None)


def _shape_fields(widths: list, base: int, mult: tuple | None) -> dict:
    if mult is not None:  # the usual layout keeps channels * channel_mult
        return dict(channels=base, channel_mult=mult)
    return dict(channels=base, channel_mult=(1,) * len(widths), block_widths=tuple(widths))


def _groups(cfg: dict, where: str) -> int:
    groups = cfg["norm_num_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise _refuse(where, "norm_num_groups", groups, "diffusers' resnets need a positive int")
    return groups


_SR_DOWN = {"ResnetDownsampleBlock2D": "resnet", "DownBlock2D": "conv",
            "AttnDownBlock2D": "attn"}
_SR_UP = {"ResnetUpsampleBlock2D": "resnet", "UpBlock2D": "conv", "AttnUpBlock2D": "attn"}


def _block_types(cfg: dict, where: str, n: int, down_ok: dict, up_ok: dict) -> tuple[list, list]:
    down, up = cfg["down_block_types"], cfg["up_block_types"]
    for key, types, ok in (("down_block_types", down, down_ok), ("up_block_types", up, up_ok)):
        if not isinstance(types, (list, tuple)) or len(types) != n:
            raise _refuse(where, key, types, f"one block type per entry of block_out_channels "
                          f"({n})")
        bad = [t for t in types if t not in ok]
        if bad:
            raise _refuse(where, key, list(types), f"{bad[0]!r} is not supported; supported: "
                          + ", ".join(sorted(ok)))
    return [down_ok[t] for t in down], [up_ok[t] for t in up]


def super_res_config_from_diffusers(cfg: dict, **overrides) -> SuperResConfig:
    where = "UNet2DModel config"
    groups = _groups(cfg, where)
    widths, base, mult = _widths(cfg, where, groups)
    n = len(widths)
    down, up = _block_types(cfg, where, n, _SR_DOWN, _SR_UP)
    time_proj = cfg["time_embedding_type"]
    if time_proj not in ("positional", "learned"):
        raise _refuse(where, "time_embedding_type", time_proj, "supported: 'positional', "
                      "'learned' ('fourier' takes log(t), which is -inf at UnCLIP's last step)")
    steps = 1000
    if time_proj == "learned":
        steps = _int(cfg.get("num_train_timesteps"), where, "num_train_timesteps")
    for key in ("class_embed_type", "num_class_embeds"):
        if cfg[key] is not None:
            raise _refuse(where, key, cfg[key], "UnCLIPPipeline calls its super-res UNet "
                          "without class_labels, which diffusers then refuses; supported: null")
    if _int(cfg["in_channels"], where, "in_channels") % 2:
        raise _refuse(where, "in_channels", cfg["in_channels"],
                      "must be even: the noisy image and the low-res image")
    levels = tuple(lvl for lvl in range(n) if down[lvl] == "attn")
    up_levels = tuple(sorted(n - 1 - j for j in range(n) if up[j] == "attn"))
    head = cfg["attention_head_dim"]
    if head is not None:
        _int(head, where, "attention_head_dim")
    kinds = {"downsample_type": cfg.get("downsample_type", "conv"),
             "upsample_type": cfg.get("upsample_type", "conv")}
    for key, value in kinds.items():
        if (levels or up_levels) and value not in ("conv", "resnet"):
            raise _refuse(where, key, value, "supported: 'conv', 'resnet'")
    # Per level: resample inside a residual block (Resnet*Block2D, Attn*Block2D with 'resnet').
    down_res = tuple(k == "resnet" or (k == "attn" and kinds["downsample_type"] == "resnet")
                     for k in down)
    up_res = tuple(k == "resnet" or (k == "attn" and kinds["upsample_type"] == "resnet")
                   for k in reversed(up))
    padding = cfg.get("downsample_padding", 1)
    if not all(down_res[:-1]) and padding not in (0, 1):
        raise _refuse(where, "downsample_padding", padding, "supported: 0, 1")
    padding = 0 if padding == 0 and not all(down_res[:-1]) else 1  # read by conv downsamplers
    attn_groups, mid_attn_norm = cfg["attn_norm_num_groups"], True
    if attn_groups is None:  # diffusers' UNetMidBlock2D: the resnets' groups, or no norm
        mid_attn_norm = cfg["resnet_time_scale_shift"] == "default"
        attn_groups = groups
    else:
        _int(attn_groups, where, "attn_norm_num_groups")
        if cfg["add_attention"] and cfg["mid_block_type"] is not None and \
                widths[-1] % attn_groups:
            raise _refuse(where, "attn_norm_num_groups", attn_groups,
                          f"the middle attention's width {widths[-1]} must split into that many "
                          "groups")
    scale = _number(cfg, where, "mid_block_scale_factor")
    mid = cfg["mid_block_type"] is not None
    fields = dict(
        image_channels=cfg["in_channels"] // 2, out_channels=_int(cfg["out_channels"], where,
                                                                  "out_channels"),
        **_shape_fields(widths, base, mult),
        num_res_blocks=_int(cfg["layers_per_block"], where, "layers_per_block"),
        groups=groups, **_common(cfg, where),
        mid_attention=mid and bool(cfg["add_attention"]), attention_levels=levels,
        up_attention_levels=up_levels if up_levels != levels else None,
        head_dim=head or widths[-1], conv_down_padding=padding,
        resblock_updown=down_res[0] if len(set(down_res)) == 1 else down_res,
        up_resblock_updown=None if up_res == down_res else up_res,
        mid_attn_norm=None if mid_attn_norm else False,
        mid_attn_groups=None if attn_groups == groups else attn_groups,
        time_proj=time_proj, num_timesteps=steps,
        mid_blocks=2 if mid else 0, mid_out_scale=scale, mid_attn_out_scale=scale)
    if head is None and (levels or up_levels):  # one head per level: its width
        fields["head_dim"] = tuple(widths)
    fields.update(overrides)
    try:
        return SuperResConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"Unsupported {where}: {e}") from None


# Block kinds: 'resnet' / 'attn' (cross-attention) resample in residual blocks and read
# resnet_skip_time_act / resnet_out_scale_factor; 'conv' / 'self' (self-attention) resample with
# convolutions and do not.
_DEC_DOWN = {"ResnetDownsampleBlock2D": "resnet", "SimpleCrossAttnDownBlock2D": "attn",
             "DownBlock2D": "conv", "AttnDownBlock2D": "self"}
_DEC_UP = {"ResnetUpsampleBlock2D": "resnet", "SimpleCrossAttnUpBlock2D": "attn",
           "UpBlock2D": "conv", "AttnUpBlock2D": "self"}
_DEC_MID = ("UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D", None)
_NO_UNCLIP = "UnCLIPPipeline cannot run it"


def decoder_config_from_diffusers(unet: dict, proj: dict, **overrides) -> DecoderConfig:
    where = "UNet2DConditionModel config"
    groups = _groups(unet, where)
    widths, base, mult = _widths(unet, where, groups)
    n = len(widths)
    down, up = _block_types(unet, where, n, _DEC_DOWN, _DEC_UP)
    up_kind = list(reversed(up))  # per level
    attn_down = tuple(lvl for lvl in range(n) if down[lvl] in ("attn", "self"))
    attn_up = tuple(lvl for lvl in range(n) if up_kind[lvl] in ("attn", "self"))
    self_down = tuple(lvl for lvl in range(n) if down[lvl] == "self")
    self_up = tuple(lvl for lvl in range(n) if up_kind[lvl] == "self")
    attn_any = {lvl for lvl in range(n) if "attn" in (down[lvl], up_kind[lvl])}  # cross
    mid_type = unet["mid_block_type"]
    if mid_type not in _DEC_MID:
        raise _refuse(where, "mid_block_type", mid_type,
                      "supported: " + ", ".join(repr(m) for m in _DEC_MID))
    mid_attn = mid_type == "UNetMidBlock2DSimpleCrossAttn"
    _require(unet, where, attention_type="default")
    addition = unet["addition_embed_type"]
    if addition not in (None, "text"):
        raise _refuse(where, "addition_embed_type", addition, f"{_NO_UNCLIP}: it needs "
                      "added_cond_kwargs the pipeline does not pass; supported: null, 'text'")
    pool_heads = None
    if addition == "text":
        pool_heads = _int(unet["addition_embed_type_num_heads"], where,
                          "addition_embed_type_num_heads")
        if unet["encoder_hid_dim"] is None and not isinstance(unet["cross_attention_dim"], int):
            raise _refuse(where, "cross_attention_dim", unet["cross_attention_dim"],
                          "addition_embed_type 'text' needs a single int")
        if unet["class_embeddings_concat"]:
            raise _refuse(where, "class_embeddings_concat", True, f"{_NO_UNCLIP} with "
                          "addition_embed_type 'text' (their widths differ)")
    hid, hid_type = unet["encoder_hid_dim"], unet["encoder_hid_dim_type"]
    if hid_type is None and hid is not None:
        hid_type = "text_proj"  # as diffusers reads it
    if hid_type not in (None, "text_proj"):
        raise _refuse(where, "encoder_hid_dim_type", hid_type, f"{_NO_UNCLIP}: it needs "
                      "added_cond_kwargs the pipeline does not pass; supported: null, 'text_proj'")
    if hid_type is not None:
        _int(hid, where, "encoder_hid_dim")
        if not isinstance(unet["cross_attention_dim"], int):
            raise _refuse(where, "cross_attention_dim", unet["cross_attention_dim"],
                          "diffusers' encoder_hid_proj needs a single int")
    time_proj = unet["time_embedding_type"]
    if time_proj not in ("positional", "fourier"):
        raise _refuse(where, "time_embedding_type", time_proj,
                      "supported: 'positional', 'fourier'")
    if unet["num_attention_heads"] is not None:
        raise _refuse(where, "num_attention_heads", unet["num_attention_heads"],
                      "diffusers refuses it too; attention_head_dim sets the head width")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        k = _int(unet[key], where, key)
        if k % 2 == 0:
            raise _refuse(where, key, k, "an even kernel changes the image size; use an odd one")

    proj_where = "UnCLIPTextProjModel config"
    clip = _int(proj["clip_embeddings_dim"], proj_where, "clip_embeddings_dim")
    for key in ("time_embed_dim", "cross_attention_dim"):
        if proj.get(key) is not None:
            _int(proj[key], proj_where, key)

    # How text_proj's additive embedding enters (class_labels).
    emb = _int(unet["time_embedding_dim"], where, "time_embedding_dim") \
        if unet["time_embedding_dim"] is not None else (2 if time_proj == "fourier" else 4) * base
    if time_proj == "fourier" and emb % 2:
        raise _refuse(where, "time_embedding_dim", emb, "Fourier features need an even width")
    kind, n_cls = unet["class_embed_type"], unet["num_class_embeds"]
    cond_dim = emb
    if kind is not None and not isinstance(kind, str):
        raise _refuse(where, "class_embed_type", kind, "a name or null")
    if kind is None and n_cls is not None:
        raise _refuse(where, "num_class_embeds", n_cls, f"{_NO_UNCLIP}: class_labels are "
                      "text_proj's embeddings, not class ids")
    if kind == "timestep":
        raise _refuse(where, "class_embed_type", kind, f"{_NO_UNCLIP}: class_labels are "
                      "text_proj's [B, D] embeddings, not timesteps")
    if kind in ("projection", "simple_projection"):
        cond_dim = unet.get("projection_class_embeddings_input_dim")
        if cond_dim is None:
            raise _refuse(where, "projection_class_embeddings_input_dim", None,
                          f"class_embed_type={kind!r} needs it")
        _int(cond_dim, where, "projection_class_embeddings_input_dim")
    cond_to_time = {"identity": "add", "projection": "mlp",
                    "simple_projection": "linear"}.get(kind, "none")
    concat = bool(unet["class_embeddings_concat"])
    if concat and cond_to_time == "none":
        raise _refuse(where, "class_embeddings_concat", True, f"{_NO_UNCLIP} without a "
                      f"class embedding (class_embed_type={kind!r})")
    if cond_to_time != "none" and proj.get("time_embed_dim") not in (None, cond_dim):
        raise CheckpointError(
            f"text_proj/config.json (time_embed_dim {proj.get('time_embed_dim')}) does not fit "
            f"decoder/ (class_embed_type {kind!r}: class_labels of width {cond_dim}).")
    if cond_to_time == "none":
        cond_dim = proj.get("time_embed_dim") or emb

    # Attention.
    layers = _per_level(unet, where, "layers_per_block", n)
    heads = _per_level(unet, where, "attention_head_dim", n, allow_none=True)
    ctx = _per_level(unet, where, "cross_attention_dim", n)
    only = unet["only_cross_attention"]
    cross_only = _per_level(unet, where, "only_cross_attention", n, kind=bool)
    mid_only = unet["mid_block_only_cross_attention"]
    if mid_only is None:
        mid_only = only if isinstance(only, bool) else False
    if not isinstance(mid_only, bool):
        raise _refuse(where, "mid_block_only_cross_attention", mid_only, "true / false / null")
    used = sorted({ctx[lvl] for lvl in attn_any} | ({ctx[-1]} if mid_attn else set()))
    if len(used) > 1:
        raise _refuse(where, "cross_attention_dim", unet["cross_attention_dim"],
                      f"{_NO_UNCLIP}: every attention block reads the same text_proj tokens, so "
                      "their widths must agree")
    token_dim = hid if hid_type is not None else None
    context_dim = (used[0] if used else ctx[-1]) if token_dim is not None else \
        proj.get("cross_attention_dim") or (used[0] if used else ctx[-1])
    want = token_dim or context_dim
    if pool_heads and want % pool_heads:
        raise _refuse(where, "addition_embed_type_num_heads", pool_heads,
                      f"the {want}-wide tokens must split into that many heads")
    if used and used[0] != context_dim or proj.get("cross_attention_dim") not in (None, want):
        raise CheckpointError(
            f"text_proj/config.json (cross_attention_dim {proj.get('cross_attention_dim')}) "
            f"does not fit decoder/ (" + (f"encoder_hid_dim {token_dim}" if token_dim else
                                          f"cross_attention_dim {used[0]}") + ").")
    if mid_attn and heads[-1] is None:
        raise _refuse(where, "attention_head_dim", unet["attention_head_dim"],
                      "diffusers cannot build the middle attention without a head width")
    norm = unet["cross_attention_norm"]
    if norm not in (None, "layer_norm", "group_norm"):
        raise _refuse(where, "cross_attention_norm", norm,
                      "supported: null, 'layer_norm', 'group_norm'")
    attn_widths = sorted({widths[lvl] for lvl in attn_any} |
                         ({widths[-1]} if mid_attn else set()))
    if norm == "layer_norm" and any(w != context_dim for w in attn_widths):
        raise _refuse(where, "cross_attention_norm", norm,
                      f"{_NO_UNCLIP}: diffusers' LayerNorm has the block width "
                      f"({attn_widths}) and the tokens cross_attention_dim={context_dim}")
    if not attn_widths:  # no block attends to the tokens: nothing to normalise
        norm = None
    if norm == "group_norm" and context_dim % 32:
        raise _refuse(where, "cross_attention_norm", norm, f"diffusers normalises the tokens in "
                      f"32 groups: cross_attention_dim={context_dim} must be a multiple of 32")

    # Residual blocks: Resnet*/SimpleCrossAttn* blocks read resnet_skip_time_act and
    # resnet_out_scale_factor; DownBlock2D / UpBlock2D / UNetMidBlock2D do not.
    skip_act = bool(unet["resnet_skip_time_act"])
    out_scale = _number(unet, where, "resnet_out_scale_factor")
    res_down = tuple(k in ("resnet", "attn") for k in down)
    res_up = tuple(k in ("resnet", "attn") for k in up_kind)
    padding = unet["downsample_padding"]
    if not all(res_down[:-1]) and padding not in (0, 1):
        raise _refuse(where, "downsample_padding", padding, "supported: 0, 1")
    padding = 0 if padding == 0 and not all(res_down[:-1]) else 1  # read by conv downsamplers
    size = unet["sample_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise CheckpointError(f"Unsupported {where}: sample_size={size!r} (UnCLIPPipeline "
                              "samples square images of sample_size: a positive int).")
    fields = dict(
        image_channels=_int(unet["in_channels"], where, "in_channels"),
        out_channels=_int(unet["out_channels"], where, "out_channels"),
        **_shape_fields(widths, base, mult),
        num_res_blocks=layers[0] if len(set(layers)) == 1 else tuple(layers),
        attention_levels=attn_down, mid_attention=mid_attn,
        up_attention_levels=attn_up if attn_up != attn_down else None,
        self_attn_levels=self_down, up_self_attn_levels=self_up if self_up != self_down else None,
        self_attn_eps=_number(unet, where, "norm_eps") if self_down + self_up else None,
        head_dim=tuple(h or w for h, w in zip(heads, widths)),
        up_head_dim=tuple(heads[n - 1 - lvl] or widths[lvl] for lvl in range(n)),
        mid_head_dim=heads[-1] if mid_attn else None,
        groups=groups, **_common(unet, where),
        res_time_act=tuple(not (skip_act and r) for r in res_down),
        up_res_time_act=tuple(not (skip_act and r) for r in res_up),
        mid_res_time_act=not (skip_act and mid_attn),
        out_scale=tuple(out_scale if r else 1.0 for r in res_down),
        up_out_scale=tuple(out_scale if r else 1.0 for r in res_up),
        resblock_updown=res_down, up_resblock_updown=res_up, conv_down_padding=padding,
        mid_blocks={None: 0, "UNetMidBlock2D": 1}.get(mid_type, 2),
        mid_out_scale=_number(unet, where, "mid_block_scale_factor"),
        cross_only=tuple(c and lvl in attn_any for lvl, c in enumerate(cross_only)),
        mid_cross_only=mid_only,
        context_norm={"layer_norm": "layer", "group_norm": "group"}.get(norm),
        time_post_act=_act(unet, where, "timestep_post_act", optional=True),
        emb_act=_act(unet, where, "time_embedding_act_fn", optional=True),
        emb_concat=concat, conv_in_kernel=unet["conv_in_kernel"], time_proj=time_proj,
        conv_out_kernel=unet["conv_out_kernel"], cond_to_time=cond_to_time,
        cond_time_dim=None if cond_dim == emb else cond_dim,
        token_pool_heads=pool_heads,
        clip_dim=clip, context_dim=context_dim, token_dim=token_dim, use_text_embed=True,
        text_encoder="clip",
        clip_tokens=_int(proj["clip_extra_context_tokens"], proj_where,
                         "clip_extra_context_tokens"), text_width=clip)
    if time_proj == "fourier":
        fields["time_embed_dim"] = emb
    fields.update(_simplify(fields, n))
    if size is not None:  # else our default
        fields["image_size"] = size
    fields.update(overrides)
    try:
        return DecoderConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"Unsupported {where}: {e}") from None


def _simplify(fields: dict, n: int) -> dict:
    """Per-level tuples whose entries agree as one value, and up_* twins equal to the down
    path as None, so that the usual (Karlo) layout keeps its plain config."""
    out = {}
    for name in ("head_dim", "resblock_updown", "res_time_act", "out_scale", "cross_only"):
        value = fields[name]
        twin = fields.get(f"up_{name}")
        if twin is not None and tuple(twin) == tuple(value):
            out[f"up_{name}"] = None
        if len(set(value)) == 1:
            out[name] = value[0]
            if twin is not None and len(set(twin)) == 1 and twin[0] == value[0]:
                out[f"up_{name}"] = None
    if fields["mid_head_dim"] == fields["head_dim"][n - 1]:
        out["mid_head_dim"] = None
    if fields["mid_res_time_act"] == (fields["res_time_act"][-1]):
        out["mid_res_time_act"] = None
    return out


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
    table.update({k: (f"decoder.{name}", kind)
                  for k, (name, kind) in class_embedding_param_map(config).items()})
    abstract = abstract_decoder(config)
    # time_cond_proj_dim's projection only reads timestep_cond, which UnCLIPPipeline never passes.
    unused = ("decoder.time_embedding.cond_proj.weight"
              if unet_cfg["time_cond_proj_dim"] is not None else None)
    return load_into(abstract, table, tensors, path=path, ignore=lambda name: name == unused,
                     what="unCLIP decoder built from decoder/config.json and text_proj/config.json",
                     hint="Check that the config.json files belong to these weights.",
                     param_dtype=config.unet_config().params_dtype)
