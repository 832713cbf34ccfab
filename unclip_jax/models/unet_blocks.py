"""ADM (Dhariwal & Nichol 2021) / GLIDE UNet building blocks in Flax NNX, and the UNet itself.

NHWC throughout. Parameters are float32 (``param_dtype``); activations run in ``dtype``
(bfloat16 on accelerators) while GroupNorm / LayerNorm statistics and the attention softmax stay
in float32.

Blocks
  ``timestep_embedding(t, dim)``   sinusoidal features of (possibly fractional) timesteps
  :class:`GroupNorm`               GroupNorm with float32 statistics
  :class:`TimeEmbedding`           Linear -> SiLU -> Linear on the sinusoidal features
  :class:`FourierFeatures`         Gaussian Fourier timestep features (``time_proj='fourier'``)
  :class:`ResBlock`                GroupNorm-SiLU-conv, timestep conditioning (scale-shift norm or
                                   additive), dropout, zero-initialised output conv, optional
                                   BigGAN-style up/down-sampling inside the block
  :class:`Downsample` / :class:`Upsample`  the convolutional alternatives (resblock_updown=False)
  :class:`AttentionBlock`          GroupNorm + multi-head self-attention with a fixed head width;
                                   with ``context_dim`` the projected encoder tokens are extra
                                   keys / values (GLIDE), with a key mask; zero-initialised output
  :class:`UNet`                    the ADM UNet assembled from a :class:`UNetConfig`

Layout: the UNet has the level structure of diffusers' ``UNet2DModel`` / ``UNet2DConditionModel``
with ``ResnetDownsampleBlock2D`` / ``SimpleCrossAttn*`` blocks (which is ADM's with
``resblock_updown=True``): per level ``num_res_blocks`` residual blocks (each followed by attention
at attention levels) and a downsampling residual block (except the last level); a middle block
res-attn-res; the up path mirrors it with ``num_res_blocks + 1`` blocks per level fed the skip
connections. ``UNetConfig``'s variant fields (per-level block counts, head widths, widths,
resampling kinds, output scales, attention variants, embedding activations) cover the other
layouts of those diffusers classes. ``unclip_jax.convert.diffusers_unet`` maps the parameters
one to one.

Dropout is explicit: ``deterministic=False`` plus an ``rng`` key at call time (no hidden RNG
state), so a jitted train step stays a pure function of its inputs. ``remat=True`` recomputes
each residual and attention block in the backward pass (``nnx.remat``) under ``remat_policy``,
a ``jax.checkpoint_policies`` name: ``nothing_saveable`` recomputes everything inside a block,
the ``dots`` policies keep the matrix products' (and convolutions') outputs. Attention goes
through ``jax.nn.dot_product_attention`` with ``attention_impl``: ``'xla'`` (any platform) or
``'cudnn'`` (cuDNN's fused kernel on NVIDIA GPUs, bf16 / fp16, head widths up to 128).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unclip_jax.models.group_norm import group_norm
from unclip_jax.models.layers import LayerNorm, logical
from unclip_jax.models.transformer import REMAT_POLICIES

Array = jax.Array
# Activations by diffusers' names (get_activation); SiLU is ADM's and Karlo's.
ATTENTION_IMPLS = ("xla", "cudnn")   # jax.nn.dot_product_attention's implementations
ACTIVATIONS = dict(silu=jax.nn.silu, mish=jax.nn.mish, relu=jax.nn.relu,
                   gelu=lambda x: jax.nn.gelu(x, approximate=False))


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------

def timestep_embedding(t: Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> Array:
    """Sinusoidal features [B, dim] (float32) of timesteps t [B].

    Frequencies exp(-log(max_period) * i / (dim/2 - freq_shift)), i < dim/2; [cos, sin] when
    ``flip_sin_to_cos`` (ADM, diffusers' UNets with flip_sin_to_cos=True), else [sin, cos].
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    first, second = (jnp.cos(args), jnp.sin(args)) if flip_sin_to_cos else (jnp.sin(args), jnp.cos(args))
    emb = jnp.concatenate([first, second], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _conv_init():
    # PyTorch's default (kaiming uniform, a=sqrt(5)) == variance_scaling(1/3, fan_in, uniform).
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(n_in: int, n_out: int, k: int, *, dtype, param_dtype, rngs: nnx.Rngs,
         zero: bool = False) -> nnx.Conv:
    """A k x k, stride-1, 'same'-padded convolution (HWIO kernel with logical axis names)."""
    init = nnx.initializers.zeros_init() if zero else _conv_init()
    return nnx.Conv(n_in, n_out, kernel_size=(k, k), padding="SAME", dtype=dtype,
                    param_dtype=param_dtype,
                    kernel_init=logical(init, None, None, "conv_in", "conv_out"),
                    bias_init=logical(nnx.initializers.zeros_init(), None), rngs=rngs)


def dense(n_in: int, n_out: int, axes: tuple, *, dtype, param_dtype, rngs: nnx.Rngs,
          zero: bool = False) -> nnx.Linear:
    init = nnx.initializers.zeros_init() if zero else _conv_init()
    return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=logical(init, *axes),
                      bias_init=logical(nnx.initializers.zeros_init(), None), rngs=rngs)


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC (or [B, L, C]) with float32 statistics; returns ``dtype``.

    The arithmetic (and its hand-written backward pass) is :func:`group_norm.group_norm`."""

    def __init__(self, channels: int, groups: int, eps: float, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels cannot be split into {groups} "
                             "groups; choose channel widths that are multiples of the group count.")
        self.groups, self.eps, self.dtype = groups, eps, dtype
        self.scale = nnx.Param(logical(nnx.initializers.ones_init(), None)(
            rngs.params(), (channels,), param_dtype))
        self.bias = nnx.Param(logical(nnx.initializers.zeros_init(), None)(
            rngs.params(), (channels,), param_dtype))

    def __call__(self, x: Array) -> Array:
        return group_norm(x, self.scale[...], self.bias[...], self.groups, self.eps, self.dtype)


class TimeEmbedding(nnx.Module):
    """Sinusoidal features -> Linear -> SiLU (or ``act``) -> Linear (-> ``post_act``)."""

    def __init__(self, n_in: int, n_out: int, *, act: str = "silu", post_act: str | None = None,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act, self.post_act = act, post_act
        self.linear_1 = dense(n_in, n_out, ("embed", "mlp"), **kw)
        self.linear_2 = dense(n_out, n_out, ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        y = self.linear_2(ACTIVATIONS[self.act](self.linear_1(x)))
        return y if self.post_act is None else ACTIVATIONS[self.post_act](y)


class FourierFeatures(nnx.Module):
    """Gaussian Fourier features of timesteps: [cos, sin](2 pi t w) (``flip_sin_to_cos``, else
    [sin, cos]) with ``weight`` w [dim / 2] drawn from N(0, 1) (diffusers'
    GaussianFourierProjection with log=False)."""

    def __init__(self, dim: int, *, flip_sin_to_cos: bool = True, param_dtype, rngs: nnx.Rngs):
        self.flip = flip_sin_to_cos
        self.weight = nnx.Param(logical(nnx.initializers.normal(1.0), None)(
            rngs.params(), (dim // 2,), param_dtype))

    def __call__(self, t: Array) -> Array:
        args = jnp.asarray(t, jnp.float32)[:, None] * self.weight[...].astype(jnp.float32)[None]
        args = args * 2 * math.pi
        first, second = (jnp.cos(args), jnp.sin(args)) if self.flip else (jnp.sin(args),
                                                                           jnp.cos(args))
        return jnp.concatenate([first, second], axis=-1)


class LearnedTimeFeatures(nnx.Module):
    """A learned table of timestep features: ``weight`` [num_timesteps, dim], row t for step t
    (diffusers' UNet2DModel time_embedding_type='learned'; t outside the table is clipped)."""

    def __init__(self, num_timesteps: int, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(logical(nnx.initializers.normal(1.0), None, "embed")(
            rngs.params(), (num_timesteps, dim), param_dtype))

    def __call__(self, t: Array) -> Array:
        index = jnp.clip(jnp.round(jnp.asarray(t)).astype(jnp.int32), 0,
                         self.weight.shape[0] - 1)
        return jnp.take(self.weight[...].astype(jnp.float32), index, axis=0)


def _nearest_up(x: Array) -> Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_down(x: Array) -> Array:
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Cannot halve a {h}x{w} feature map: the input size must be divisible "
                         "by 2 ** (number of levels - 1).")
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)


def dropout(x: Array, rate: float, deterministic: bool, rng: Array | None) -> Array:
    if deterministic or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("Dropout is active (deterministic=False) but no rng was given: pass "
                         "rng=jax.random.key(...) to the model call, or deterministic=True.")
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Residual block, resampling, attention
# --------------------------------------------------------------------------------------------

class ResBlock(nnx.Module):
    """ADM residual block with timestep conditioning.

    h = conv1(silu(norm1(x)))  (x resampled between the activation and conv1 when up / down)
    scale_shift: h = norm2(h) * (1 + scale) + shift, with [scale, shift] = proj(silu(emb))
    otherwise:   h = norm2(h + proj(silu(emb)))
    h = conv2(dropout(silu(h)));  out = skip(x) + h, skip a 1x1 conv when the width changes.
    conv2 starts at zero, so a fresh block is the identity on its skip path. ``act`` replaces
    every SiLU (diffusers' resnet_act_fn); ``time_act=False`` feeds emb to the projection as it
    is (diffusers' skip_time_act); ``out_scale`` divides the output, (skip(x) + h) / out_scale.
    """

    def __init__(self, n_in: int, n_out: int, emb_dim: int, *, groups: int = 32,
                 eps: float = 1e-5, scale_shift: bool = True, up: bool = False,
                 down: bool = False, dropout: float = 0.0, act: str = "silu",
                 time_act: bool = True, out_scale: float = 1.0, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act, self.time_act, self.out_scale = act, time_act, float(out_scale)
        self.up, self.down, self.scale_shift, self.rate = up, down, scale_shift, dropout
        self.norm1 = GroupNorm(n_in, groups, eps, **kw)
        self.conv1 = conv(n_in, n_out, 3, **kw)
        self.time_emb_proj = dense(emb_dim, (2 if scale_shift else 1) * n_out, ("embed", "mlp"), **kw)
        self.norm2 = GroupNorm(n_out, groups, eps, **kw)
        self.conv2 = conv(n_out, n_out, 3, zero=True, **kw)
        self.conv_shortcut = conv(n_in, n_out, 1, **kw) if n_in != n_out else None

    def __call__(self, x: Array, emb: Array, deterministic: bool = True,
                 rng: Array | None = None) -> Array:
        act = ACTIVATIONS[self.act]
        h = act(self.norm1(x))
        if self.up:
            x, h = _nearest_up(x), _nearest_up(h)
        elif self.down:
            x, h = _avg_down(x), _avg_down(h)
        h = self.conv1(h)
        e = self.time_emb_proj(act(emb) if self.time_act else emb)[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = dropout(act(h), self.rate, deterministic, rng)
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h if self.out_scale == 1.0 else (x + h) / self.out_scale


class Downsample(nnx.Module):
    """Stride-2 3x3 convolution (ADM's conv_resample downsampling); ``padding`` 0 pads the bottom
    and right edges by one instead of every edge."""

    def __init__(self, channels: int, *, padding: int = 1, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        pad = ((1, 1), (1, 1)) if padding else ((0, 1), (0, 1))
        self.conv = nnx.Conv(channels, channels, kernel_size=(3, 3), strides=(2, 2),
                             padding=pad, dtype=dtype, param_dtype=param_dtype,
                             kernel_init=logical(_conv_init(), None, None, "conv_in", "conv_out"),
                             bias_init=logical(nnx.initializers.zeros_init(), None),
                             rngs=rngs)

    def __call__(self, x: Array, emb: Array = None, deterministic: bool = True, rng=None) -> Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x followed by a 3x3 convolution."""

    def __init__(self, channels: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, emb: Array = None, deterministic: bool = True, rng=None) -> Array:
        return self.conv(_nearest_up(x))


class AttentionBlock(nnx.Module):
    """x + out(attention(norm(x))): heads of width ``head_dim`` over the H*W positions.

    With ``context_dim`` the context tokens [B, L, context_dim] are projected to keys / values
    (``add_k_proj`` / ``add_v_proj``) and put in front of the spatial keys / values (GLIDE);
    ``context_mask`` [B, L] (True = attend) masks them. The kernel is
    ``jax.nn.dot_product_attention`` (scale 1/sqrt(head_dim), float32 softmax).

    Variants: ``norm=False`` drops the GroupNorm; ``cross_only`` attends to the context tokens
    alone (no spatial keys / values, no ``to_k`` / ``to_v``); ``context_norm`` 'layer' or 'group'
    (``context_groups`` groups) normalises the context tokens first (``norm_cross``);
    ``out_scale`` divides the output, (x + y) / out_scale.
    """

    def __init__(self, channels: int, head_dim: int, context_dim: int | None = None, *,
                 groups: int = 32, eps: float = 1e-5, norm: bool = True,
                 cross_only: bool = False, context_norm: str | None = None,
                 context_groups: int = 32, out_scale: float = 1.0, impl: str = "xla",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if channels % head_dim:
            raise ValueError(f"Attention over {channels} channels cannot use heads of width "
                             f"{head_dim}; make the channel width a multiple of head_dim.")
        if context_dim is None and (cross_only or context_norm is not None):
            raise ValueError("cross_only / context_norm need context tokens (context_dim).")
        if context_norm not in (None, "layer", "group"):
            raise ValueError(f"context_norm must be None, 'layer' or 'group', got "
                             f"{context_norm!r}.")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}.")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.impl = impl
        self.heads, self.head_dim, self.out_scale = channels // head_dim, head_dim, float(out_scale)
        self.group_norm = GroupNorm(channels, groups, eps, **kw) if norm else None
        self.to_q = dense(channels, channels, ("embed", "heads"), **kw)
        if cross_only:
            self.to_k = self.to_v = None
        else:
            self.to_k = dense(channels, channels, ("embed", "heads"), **kw)
            self.to_v = dense(channels, channels, ("embed", "heads"), **kw)
        if context_norm == "layer":
            self.norm_cross = LayerNorm(context_dim, eps=1e-5, **kw)
        elif context_norm == "group":
            self.norm_cross = GroupNorm(context_dim, context_groups, 1e-5, **kw)
        else:
            self.norm_cross = None
        if context_dim is not None:
            self.add_k_proj = dense(context_dim, channels, ("embed", "heads"), **kw)
            self.add_v_proj = dense(context_dim, channels, ("embed", "heads"), **kw)
        else:
            self.add_k_proj = self.add_v_proj = None
        self.to_out = dense(channels, channels, ("heads", "embed"), zero=True, **kw)

    def __call__(self, x: Array, context: Array | None = None,
                 context_mask: Array | None = None) -> Array:
        b, hgt, wid, c = x.shape
        heads = lambda y: y.reshape(b, y.shape[1], self.heads, self.head_dim)
        h = x.reshape(b, hgt * wid, c)
        if self.group_norm is not None:
            h = self.group_norm(h)
        q = heads(self.to_q(h))
        k = v = None
        if self.to_k is not None:
            k, v = heads(self.to_k(h)), heads(self.to_v(h))
        mask = None
        if self.add_k_proj is not None:
            if context is None:
                raise ValueError("This attention block attends to context tokens: pass context "
                                 "[B, L, context_dim].")
            if self.norm_cross is not None:
                context = self.norm_cross(context)
            ck, cv = heads(self.add_k_proj(context)), heads(self.add_v_proj(context))
            k = ck if k is None else jnp.concatenate([ck, k], axis=1)
            v = cv if v is None else jnp.concatenate([cv, v], axis=1)
            if context_mask is not None:
                keep = jnp.asarray(context_mask, bool)
                if self.to_k is not None:
                    keep = jnp.concatenate([keep, jnp.ones((b, hgt * wid), bool)], axis=1)
                mask = keep[:, None, None, :]
        y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.impl)
        y = self.to_out(y.reshape(b, hgt * wid, c))
        out = x + y.reshape(b, hgt, wid, c)
        return out if self.out_scale == 1.0 else out / self.out_scale


# --------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Shape and numerics of an ADM UNet.

    ``attention_levels``: indices of the levels (0 = full resolution) whose residual blocks are
    followed by attention; ``mid_attention``: attention between the two middle residual blocks.
    ``context_dim``: width of context tokens the attention attends to (None: self-attention only).
    ``resblock_updown``: resample inside residual blocks (BigGAN / Karlo) or with convolutions.
    ``time_embed_dim`` None means 4 x ``channels``.

    Per-level fields (``PER_LEVEL``) take one value for every level or a tuple with one entry
    per level (index 0 = full resolution); those in ``UP_VARIANTS`` have an ``up_<name>`` twin
    for the up path (None: as going down). The variants below default to the ADM / Karlo layout:

    ``up_attention_levels``  the up path's attention levels (None: ``attention_levels``)
    ``self_attn_levels``   attention levels whose blocks attend to the positions only, without
                           the context tokens (``up_self_attn_levels`` going up, None: the same;
                           ``self_attn_eps`` their GroupNorm eps, None: ``attn_norm_eps``)
    ``block_widths``       explicit level widths (None: ``channels * channel_mult``)
    ``out_scale``          residual blocks return (skip + h) / out_scale (``mid_out_scale`` in
                           the middle; ``mid_attn_out_scale`` divides its attention's output)
    ``mid_blocks``         2: res-attn-res in the middle; 1: one residual block; 0: no middle
    ``mid_head_dim``       None: the head width of the last level
    ``mid_res_time_act``   None: ``res_time_act`` of the last level
    ``cross_only``         attention to the context tokens only (``mid_cross_only`` in the middle)
    ``context_norm``       'layer' / 'group' (``context_norm_groups``): normalise the context
                           tokens in every attention block
    ``attn_norm``          False: no GroupNorm before attention
    ``time_post_act``      activation after the timestep MLP (before ``emb_add``)
    ``emb_act``            activation of the embedding after ``emb_add`` is added
    ``emb_concat``         concatenate ``emb_add`` to the embedding instead of adding it (the
                           residual blocks then read 2 x emb_dim)
    ``conv_in_kernel`` / ``conv_out_kernel``  odd kernel sizes of the first and last conv
    ``conv_down_padding``  1 (every edge) or 0 (bottom / right only) for ``Downsample``
    ``time_proj``          'fourier': Gaussian Fourier features of width emb_dim
                           (``FourierFeatures``) instead of sinusoidal ones of width channels;
                           'learned': a table of ``num_timesteps`` rows (``LearnedTimeFeatures``)
    ``mid_attn_groups``    GroupNorm groups of the middle attention (None: ``groups``);
                           ``mid_attn_norm`` whether it has one (None: ``attn_norm``)
    """

    in_channels: int = 3
    out_channels: int = 6
    channels: int = 64
    channel_mult: tuple = (1, 2, 3, 4)
    num_res_blocks: int | tuple = 2
    attention_levels: tuple = ()
    up_attention_levels: tuple | None = None  # the up path's (None: attention_levels)
    self_attn_levels: tuple = ()      # attention levels that ignore the context tokens
    up_self_attn_levels: tuple | None = None
    self_attn_eps: float | None = None  # their GroupNorm eps (None: attn_norm_eps)
    mid_attention: bool = False
    head_dim: int | tuple = 64
    context_dim: int | None = None
    time_embed_dim: int | None = None
    groups: int = 32
    norm_eps: float = 1e-5
    attn_norm_eps: float = 1e-5
    scale_shift: bool = True
    resblock_updown: bool | tuple = True
    dropout: float = 0.0
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    act: str = "silu"                # inside the residual blocks
    outer_act: str = "silu"          # in the timestep MLP and before conv_out
    res_time_act: bool | tuple = True  # act(emb) before each block's projection (not skip_time_act)
    center_input: bool = False       # x -> 2x - 1 first (diffusers' center_input_sample)
    block_widths: tuple | None = None
    up_head_dim: tuple | None = None
    up_resblock_updown: tuple | None = None
    up_res_time_act: tuple | None = None
    out_scale: float | tuple = 1.0
    up_out_scale: tuple | None = None
    mid_blocks: int = 2
    mid_head_dim: int | None = None
    mid_out_scale: float = 1.0
    mid_attn_out_scale: float = 1.0
    mid_res_time_act: bool | None = None
    cross_only: bool | tuple = False
    mid_cross_only: bool = False
    context_norm: str | None = None
    context_norm_groups: int = 32
    attn_norm: bool = True
    time_post_act: str | None = None
    emb_act: str | None = None
    emb_concat: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    conv_down_padding: int = 1       # 0: the conv downsampler pads bottom / right only
    time_proj: str = "positional"    # timestep features: 'positional' | 'fourier' | 'learned'
    num_timesteps: int = 1000        # rows of the 'learned' table
    mid_attn_groups: int | None = None  # GroupNorm groups of the middle attention (None: groups)
    mid_attn_norm: bool | None = None   # its GroupNorm at all (None: attn_norm)
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: bool = False
    remat_policy: str = "nothing_saveable"   # a jax.checkpoint_policies name (with remat)
    attention_impl: str = "xla"              # 'xla' | 'cudnn' (jax.nn.dot_product_attention)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # JSON gives lists
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        problems = []
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy must be one of {REMAT_POLICIES}, got "
                            f"{self.remat_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl must be one of {ATTENTION_IMPLS}, got "
                            f"{self.attention_impl!r}")
        for name in ("act", "outer_act"):
            if getattr(self, name) not in ACTIVATIONS:
                problems.append(f"{name} must be one of {tuple(ACTIVATIONS)}, got "
                                f"{getattr(self, name)!r}")
        for name in ("time_post_act", "emb_act"):
            if getattr(self, name) not in (None, *ACTIVATIONS):
                problems.append(f"{name} must be None or one of {tuple(ACTIVATIONS)}, got "
                                f"{getattr(self, name)!r}")
        n = len(self.channel_mult)
        if n < 1:
            problems.append("channel_mult must name at least one level")
        if self.block_widths is not None and len(self.block_widths) != n:
            problems.append(f"block_widths {self.block_widths} must have one width per level "
                            f"({n})")
        for name in PER_LEVEL + tuple(f"up_{v}" for v in UP_VARIANTS):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                problems.append(f"{name} {value} must have one entry per level ({n})")
        if problems:
            raise ValueError("Invalid UNetConfig: " + "; ".join(sorted(set(problems))) + ".")
        widths = self.widths
        for name in ("attention_levels", "up_attention_levels", "self_attn_levels",
                     "up_self_attn_levels"):
            bad = [lvl for lvl in getattr(self, name) or () if not 0 <= lvl < n]
            if bad:
                problems.append(f"{name} {bad} are not levels of a {n}-level UNet")
        for w in widths:
            if w % self.groups:
                problems.append(f"width {w} is not a multiple of groups ({self.groups})")
        for lvl, up in [(lvl, up) for up in (False, True) for lvl in self.attn_levels(up)]:
            if 0 <= lvl < n:
                head = self.at("head_dim", lvl, up)
                if widths[lvl] % head:
                    problems.append(f"width {widths[lvl]} at level {lvl} is not a multiple of "
                                    f"head_dim ({head})")
        if self.mid_attention and widths[-1] % self.mid_heads:
            problems.append(f"width {widths[-1]} at level {n - 1} is not a multiple of "
                            f"head_dim ({self.mid_heads})")
        if self.mid_attention and self.mid_blocks != 2:
            problems.append("mid_attention needs mid_blocks=2 (res-attn-res)")
        if self.mid_blocks not in (0, 1, 2):
            problems.append(f"mid_blocks must be 0, 1 or 2, got {self.mid_blocks}")
        if self.context_norm not in (None, "layer", "group"):
            problems.append(f"context_norm must be None, 'layer' or 'group', got "
                            f"{self.context_norm!r}")
        elif self.context_norm is not None and self.context_dim is None:
            problems.append("context_norm needs context tokens (context_dim)")
        elif self.context_norm == "group" and self.context_dim % self.context_norm_groups:
            problems.append(f"context_dim {self.context_dim} is not a multiple of "
                            f"context_norm_groups ({self.context_norm_groups})")
        if self.time_proj not in ("positional", "fourier", "learned"):
            problems.append(f"time_proj must be 'positional', 'fourier' or 'learned', got "
                            f"{self.time_proj!r}")
        if self.time_proj == "learned" and self.num_timesteps < 1:
            problems.append(f"num_timesteps must be at least 1, got {self.num_timesteps}")
        if self.mid_attention and self.mid_attn_groups and widths[-1] % self.mid_attn_groups:
            problems.append(f"width {widths[-1]} is not a multiple of mid_attn_groups "
                            f"({self.mid_attn_groups})")
        elif self.time_proj == "fourier" and self.emb_dim % 2:
            problems.append(f"Fourier features need an even emb_dim, got {self.emb_dim}")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            k = getattr(self, name)
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                problems.append(f"{name} must be an odd positive int, got {k!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if any(self.at("num_res_blocks", lvl) < 1 for lvl in range(n)):
            problems.append("num_res_blocks must be at least 1")
        if problems:
            raise ValueError("Invalid UNetConfig: " + "; ".join(sorted(set(problems))) + ".")

    def attn_levels(self, up: bool = False) -> tuple:
        """The levels with attention going down (or up)."""
        if up and self.up_attention_levels is not None:
            return self.up_attention_levels
        return self.attention_levels

    def self_only(self, lvl: int, up: bool = False) -> bool:
        """Whether the attention at level ``lvl`` ignores the context tokens."""
        levels = self.up_self_attn_levels if up and self.up_self_attn_levels is not None \
            else self.self_attn_levels
        return lvl in levels or self.context_dim is None

    def at(self, name: str, lvl: int, up: bool = False):
        """The value of per-level field ``name`` at level ``lvl`` (of the up path if ``up``)."""
        value = getattr(self, f"up_{name}") if up and name in UP_VARIANTS else None
        if value is None:
            value = getattr(self, name)
        return value[lvl] if isinstance(value, tuple) else value

    @property
    def mid_norm(self) -> bool:
        """Whether the middle attention has a GroupNorm."""
        return self.attn_norm if self.mid_attn_norm is None else self.mid_attn_norm

    @property
    def mid_heads(self) -> int:
        """The head width of the middle attention."""
        return self.mid_head_dim or self.at("head_dim", len(self.channel_mult) - 1)

    @property
    def emb_dim(self) -> int:
        return self.time_embed_dim or 4 * (self.block_widths[0] if self.block_widths
                                           else self.channels)

    @property
    def widths(self) -> tuple:
        if self.block_widths is not None:
            return tuple(self.block_widths)
        return tuple(self.channels * m for m in self.channel_mult)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)


PER_LEVEL = ("num_res_blocks", "head_dim", "resblock_updown", "res_time_act", "out_scale",
             "cross_only")
UP_VARIANTS = ("head_dim", "resblock_updown", "res_time_act", "out_scale")


class Level(nnx.Module):
    """One resolution of the down or up path: residual blocks, optional attention after each,
    and an optional resampler at the end."""

    def __init__(self, res: list, attn: list | None, resample):
        self.res = nnx.List(res)
        self.attn = nnx.List(attn) if attn else None
        self.resample = resample


class MidBlock(nnx.Module):
    def __init__(self, res: list, attn: Any):
        self.res = nnx.List(res)
        self.attn = attn


def _call(module, remat: bool, policy: str, *args):
    """module(*args), rematerialised in the backward pass when ``remat`` (``policy``: a
    ``jax.checkpoint_policies`` name). Only arrays (and None) go through ``args``; Python flags
    must be bound into ``module`` calls by the caller."""
    if not remat:
        return module(*args)
    return nnx.remat(lambda m, *a: m(*a),
                     policy=getattr(jax.checkpoint_policies, policy))(module, *args)


class _Bound(nnx.Module):
    """A block with its static call flags bound, so that remat only sees arrays."""

    def __init__(self, block, deterministic: bool):
        self.block, self.deterministic = block, deterministic

    def __call__(self, x, emb, rng):
        return self.block(x, emb, self.deterministic, rng)


class UNet(nnx.Module):
    """The ADM UNet: ``unet(x [B, H, W, in], t [B], emb_add=None, context=None,
    context_mask=None, deterministic=True, rng=None) -> [B, H, W, out]``.

    ``emb_add`` [B, emb_dim] is added to the timestep embedding (class / CLIP conditioning);
    ``context`` [B, L, context_dim] and ``context_mask`` [B, L] feed the attention blocks.
    """

    def __init__(self, config: UNetConfig, rngs: nnx.Rngs):
        c = self.config = config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype, rngs=rngs)
        emb = c.emb_dim
        res_emb = 2 * emb if c.emb_concat else emb
        widths = c.widths
        n = len(widths)

        def res(n_in, n_out, lvl=None, going_up=False, **extra):
            if lvl is None:  # the middle block
                scale, time_act = c.mid_out_scale, c.mid_res_time_act
                if time_act is None:
                    time_act = c.at("res_time_act", n - 1)
            else:
                scale = c.at("out_scale", lvl, going_up)
                time_act = c.at("res_time_act", lvl, going_up)
            return ResBlock(n_in, n_out, res_emb, groups=c.groups, eps=c.norm_eps,
                            scale_shift=c.scale_shift, dropout=c.dropout, act=c.act,
                            time_act=bool(time_act), out_scale=scale, **extra, **kw)

        def attn(width, head_dim, cross_only, out_scale=1.0, self_only=False, groups=None,
                 norm=c.attn_norm):
            if self_only or c.context_dim is None:
                return AttentionBlock(width, head_dim, None, groups=groups or c.groups,
                                      eps=c.attn_norm_eps if c.self_attn_eps is None
                                      else c.self_attn_eps, norm=norm,
                                      out_scale=out_scale, impl=c.attention_impl, **kw)
            return AttentionBlock(width, head_dim, c.context_dim, groups=groups or c.groups,
                                  eps=c.attn_norm_eps, norm=norm,
                                  cross_only=bool(cross_only), context_norm=c.context_norm,
                                  context_groups=c.context_norm_groups, out_scale=out_scale,
                                  impl=c.attention_impl, **kw)

        self.conv_in = conv(c.in_channels, widths[0], c.conv_in_kernel, **kw)
        fourier = c.time_proj == "fourier"
        if fourier:
            self.time_proj = FourierFeatures(emb, flip_sin_to_cos=c.flip_sin_to_cos,
                                             param_dtype=c.params_dtype, rngs=rngs)
        elif c.time_proj == "learned":
            self.time_proj = LearnedTimeFeatures(c.num_timesteps, widths[0],
                                                 param_dtype=c.params_dtype, rngs=rngs)
        else:
            self.time_proj = None
        self.time_embed = TimeEmbedding(emb if fourier else widths[0], emb, act=c.outer_act,
                                        post_act=c.time_post_act, **kw)

        down, skips, width = [], [widths[0]], widths[0]
        for lvl, out in enumerate(widths):
            blocks = []
            for i in range(c.at("num_res_blocks", lvl)):
                blocks.append(res(width, out, lvl))
                width = out
                skips.append(width)
            attns = ([attn(out, c.at("head_dim", lvl), c.at("cross_only", lvl),
                           self_only=c.self_only(lvl)) for _ in blocks]
                     if lvl in c.attention_levels else None)
            resample = None
            if lvl < n - 1:
                resample = (res(out, out, lvl, down=True) if c.at("resblock_updown", lvl)
                            else Downsample(out, padding=c.conv_down_padding, **kw))
                skips.append(out)
            down.append(Level(blocks, attns, resample))
        self.down = nnx.List(down)

        self.mid = (MidBlock([res(width, width) for _ in range(c.mid_blocks)],
                             attn(width, c.mid_heads, c.mid_cross_only, c.mid_attn_out_scale,
                                  groups=c.mid_attn_groups, norm=c.mid_norm)
                             if c.mid_attention else None) if c.mid_blocks else None)

        up = []
        for lvl in reversed(range(n)):
            out, blocks = widths[lvl], []
            for i in range(c.at("num_res_blocks", lvl) + 1):
                blocks.append(res(width + skips.pop(), out, lvl, going_up=True))
                width = out
            attns = ([attn(out, c.at("head_dim", lvl, True), c.at("cross_only", lvl),
                           self_only=c.self_only(lvl, True))
                      for _ in blocks] if lvl in c.attn_levels(True) else None)
            resample = None
            if lvl > 0:
                resample = (res(out, out, lvl, going_up=True, up=True)
                            if c.at("resblock_updown", lvl, True) else Upsample(out, **kw))
            up.append(Level(blocks, attns, resample))
        self.up = nnx.List(up)

        self.norm_out = GroupNorm(widths[0], c.groups, c.norm_eps, **kw)
        self.conv_out = conv(widths[0], c.out_channels, c.conv_out_kernel, zero=True, **kw)

    def __call__(self, x: Array, t: Array, emb_add: Array | None = None,
                 context: Array | None = None, context_mask: Array | None = None,
                 deterministic: bool = True, rng: Array | None = None) -> Array:
        c = self.config
        if x.ndim != 4 or x.shape[-1] != c.in_channels:
            raise ValueError(f"The UNet expects NHWC input [B, H, W, {c.in_channels}], got shape "
                             f"{x.shape}.")
        factor = 2 ** (len(c.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"Input size {x.shape[1]}x{x.shape[2]} must be divisible by {factor} "
                             f"for a {len(c.channel_mult)}-level UNet.")
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        if self.time_proj is not None:
            features = self.time_proj(t)
        else:
            features = timestep_embedding(t, c.widths[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                          freq_shift=c.freq_shift)
        emb = self.time_embed(features.astype(c.compute_dtype))
        if c.emb_concat:
            if emb_add is None:
                raise ValueError("This UNet concatenates emb_add to the timestep embedding "
                                 "(emb_concat=True): pass emb_add [B, emb_dim].")
            emb = jnp.concatenate([emb, emb_add.astype(emb.dtype)], axis=-1)
        elif emb_add is not None:
            emb = emb + emb_add.astype(emb.dtype)
        if c.emb_act is not None:
            emb = ACTIVATIONS[c.emb_act](emb)
        counter = iter(range(10 ** 6))

        def key():
            return None if rng is None or deterministic else jax.random.fold_in(rng, next(counter))

        def run_res(block, h):
            return _call(_Bound(block, deterministic), c.remat, c.remat_policy, h, emb, key())

        def run_attn(block, h):
            return _call(block, c.remat, c.remat_policy, h, context, context_mask)

        if c.center_input:
            x = 2 * x - 1.0
        h = self.conv_in(x.astype(c.compute_dtype))
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.res):
                h = run_res(block, h)
                if level.attn is not None:
                    h = run_attn(level.attn[i], h)
                skips.append(h)
            if level.resample is not None:
                h = run_res(level.resample, h)
                skips.append(h)

        if self.mid is not None:
            h = run_res(self.mid.res[0], h)
            if self.mid.attn is not None:
                h = run_attn(self.mid.attn, h)
            for block in list(self.mid.res)[1:]:
                h = run_res(block, h)

        for level in self.up:
            for i, block in enumerate(level.res):
                h = run_res(block, jnp.concatenate([h, skips.pop()], axis=-1))
                if level.attn is not None:
                    h = run_attn(level.attn[i], h)
            if level.resample is not None:
                h = run_res(level.resample, h)

        h = self.conv_out(ACTIVATIONS[c.outer_act](self.norm_out(h)))
        return h.astype(jnp.float32)
