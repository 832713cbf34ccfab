"""ADM (Dhariwal & Nichol 2021) / GLIDE UNet building blocks in Flax NNX, and the UNet itself.

NHWC throughout. Parameters are float32 (``param_dtype``); activations run in ``dtype``
(bfloat16 on accelerators) while GroupNorm / LayerNorm statistics and the attention softmax stay
in float32.

Blocks
  ``timestep_embedding(t, dim)``   sinusoidal features of (possibly fractional) timesteps
  :class:`GroupNorm`               GroupNorm with float32 statistics
  :class:`TimeEmbedding`           Linear -> SiLU -> Linear on the sinusoidal features
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
connections. ``unclip_jax.convert.diffusers_unet`` maps the parameters one to one.

Dropout is explicit: ``deterministic=False`` plus an ``rng`` key at call time (no hidden RNG
state), so a jitted train step stays a pure function of its inputs. ``remat=True`` recomputes
each residual and attention block in the backward pass (``nnx.remat``). Attention goes through
``jax.nn.dot_product_attention``, which picks a fused kernel where the platform has one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unclip_jax.models.layers import logical

Array = jax.Array
# Activations by diffusers' names (get_activation); SiLU is ADM's and Karlo's.
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
    """GroupNorm over NHWC (or [B, L, C]) with float32 statistics; returns ``dtype``."""

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
        shape = x.shape
        c = shape[-1]
        xf = x.astype(jnp.float32).reshape(shape[0], -1, self.groups, c // self.groups)
        mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class TimeEmbedding(nnx.Module):
    """Sinusoidal features -> Linear -> SiLU (or ``act``) -> Linear."""

    def __init__(self, n_in: int, n_out: int, *, act: str = "silu", dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act
        self.linear_1 = dense(n_in, n_out, ("embed", "mlp"), **kw)
        self.linear_2 = dense(n_out, n_out, ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(ACTIVATIONS[self.act](self.linear_1(x)))


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
    is (diffusers' skip_time_act).
    """

    def __init__(self, n_in: int, n_out: int, emb_dim: int, *, groups: int = 32,
                 eps: float = 1e-5, scale_shift: bool = True, up: bool = False,
                 down: bool = False, dropout: float = 0.0, act: str = "silu",
                 time_act: bool = True, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act, self.time_act = act, time_act
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
        return x + h


class Downsample(nnx.Module):
    """Stride-2 3x3 convolution (ADM's conv_resample downsampling)."""

    def __init__(self, channels: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, kernel_size=(3, 3), strides=(2, 2),
                             padding=((1, 1), (1, 1)), dtype=dtype, param_dtype=param_dtype,
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
    """

    def __init__(self, channels: int, head_dim: int, context_dim: int | None = None, *,
                 groups: int = 32, eps: float = 1e-5, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if channels % head_dim:
            raise ValueError(f"Attention over {channels} channels cannot use heads of width "
                             f"{head_dim}; make the channel width a multiple of head_dim.")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.head_dim = channels // head_dim, head_dim
        self.group_norm = GroupNorm(channels, groups, eps, **kw)
        self.to_q = dense(channels, channels, ("embed", "heads"), **kw)
        self.to_k = dense(channels, channels, ("embed", "heads"), **kw)
        self.to_v = dense(channels, channels, ("embed", "heads"), **kw)
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
        h = self.group_norm(x.reshape(b, hgt * wid, c))
        q, k, v = heads(self.to_q(h)), heads(self.to_k(h)), heads(self.to_v(h))
        mask = None
        if self.add_k_proj is not None:
            if context is None:
                raise ValueError("This attention block attends to context tokens: pass context "
                                 "[B, L, context_dim].")
            k = jnp.concatenate([heads(self.add_k_proj(context)), k], axis=1)
            v = jnp.concatenate([heads(self.add_v_proj(context)), v], axis=1)
            if context_mask is not None:
                keep = jnp.concatenate([jnp.asarray(context_mask, bool),
                                        jnp.ones((b, hgt * wid), bool)], axis=1)
                mask = keep[:, None, None, :]
        y = jax.nn.dot_product_attention(q, k, v, mask=mask)
        y = self.to_out(y.reshape(b, hgt * wid, c))
        return x + y.reshape(b, hgt, wid, c)


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
    """

    in_channels: int = 3
    out_channels: int = 6
    channels: int = 64
    channel_mult: tuple = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = ()
    mid_attention: bool = False
    head_dim: int = 64
    context_dim: int | None = None
    time_embed_dim: int | None = None
    groups: int = 32
    norm_eps: float = 1e-5
    attn_norm_eps: float = 1e-5
    scale_shift: bool = True
    resblock_updown: bool = True
    dropout: float = 0.0
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    act: str = "silu"                # inside the residual blocks
    outer_act: str = "silu"          # in the timestep MLP and before conv_out
    res_time_act: bool = True        # act(emb) before each block's projection (not skip_time_act)
    center_input: bool = False       # x -> 2x - 1 first (diffusers' center_input_sample)
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: bool = False

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        problems = []
        for name in ("act", "outer_act"):
            if getattr(self, name) not in ACTIVATIONS:
                problems.append(f"{name} must be one of {tuple(ACTIVATIONS)}, got "
                                f"{getattr(self, name)!r}")
        n = len(self.channel_mult)
        if n < 1:
            problems.append("channel_mult must name at least one level")
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < n]
        if bad:
            problems.append(f"attention_levels {bad} are not levels of a {n}-level UNet")
        for m in self.channel_mult:
            if (self.channels * m) % self.groups:
                problems.append(f"width {self.channels * m} is not a multiple of groups "
                                f"({self.groups})")
        if (self.attention_levels or self.mid_attention):
            levels = {lvl for lvl in self.attention_levels if 0 <= lvl < n}
            for lvl in levels | ({n - 1} if self.mid_attention and n else set()):
                if (self.channels * self.channel_mult[lvl]) % self.head_dim:
                    problems.append(f"width {self.channels * self.channel_mult[lvl]} at level "
                                    f"{lvl} is not a multiple of head_dim ({self.head_dim})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_res_blocks < 1:
            problems.append("num_res_blocks must be at least 1")
        if problems:
            raise ValueError("Invalid UNetConfig: " + "; ".join(sorted(set(problems))) + ".")

    @property
    def emb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.channels

    @property
    def widths(self) -> tuple:
        return tuple(self.channels * m for m in self.channel_mult)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)


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


def _call(module, remat: bool, *args):
    """module(*args), rematerialised in the backward pass when ``remat``. Only arrays (and None)
    go through ``args``; Python flags must be bound into ``module`` calls by the caller."""
    if not remat:
        return module(*args)
    return nnx.remat(lambda m, *a: m(*a))(module, *args)


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
        widths = c.widths
        n = len(widths)

        def res(n_in, n_out, **extra):
            return ResBlock(n_in, n_out, emb, groups=c.groups, eps=c.norm_eps,
                            scale_shift=c.scale_shift, dropout=c.dropout, act=c.act,
                            time_act=c.res_time_act, **extra, **kw)

        def attn(width):
            return AttentionBlock(width, c.head_dim, c.context_dim, groups=c.groups,
                                  eps=c.attn_norm_eps, **kw)

        self.conv_in = conv(c.in_channels, widths[0], 3, **kw)
        self.time_embed = TimeEmbedding(widths[0], emb, act=c.outer_act, **kw)

        down, skips, width = [], [widths[0]], widths[0]
        for lvl, out in enumerate(widths):
            blocks = []
            for i in range(c.num_res_blocks):
                blocks.append(res(width, out))
                width = out
                skips.append(width)
            attns = [attn(out) for _ in blocks] if lvl in c.attention_levels else None
            resample = None
            if lvl < n - 1:
                resample = res(out, out, down=True) if c.resblock_updown else Downsample(out, **kw)
                skips.append(out)
            down.append(Level(blocks, attns, resample))
        self.down = nnx.List(down)

        self.mid = MidBlock([res(width, width), res(width, width)],
                            attn(width) if c.mid_attention else None)

        up = []
        for lvl in reversed(range(n)):
            out, blocks = widths[lvl], []
            for i in range(c.num_res_blocks + 1):
                blocks.append(res(width + skips.pop(), out))
                width = out
            attns = [attn(out) for _ in blocks] if lvl in c.attention_levels else None
            resample = None
            if lvl > 0:
                resample = res(out, out, up=True) if c.resblock_updown else Upsample(out, **kw)
            up.append(Level(blocks, attns, resample))
        self.up = nnx.List(up)

        self.norm_out = GroupNorm(widths[0], c.groups, c.norm_eps, **kw)
        self.conv_out = conv(widths[0], c.out_channels, 3, zero=True, **kw)

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
        emb = self.time_embed(timestep_embedding(t, c.widths[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                                 freq_shift=c.freq_shift).astype(c.compute_dtype))
        if emb_add is not None:
            emb = emb + emb_add.astype(emb.dtype)
        counter = iter(range(10 ** 6))

        def key():
            return None if rng is None or deterministic else jax.random.fold_in(rng, next(counter))

        def run_res(block, h):
            return _call(_Bound(block, deterministic), c.remat, h, emb, key())

        def run_attn(block, h):
            return _call(block, c.remat, h, context, context_mask)

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

        h = run_res(self.mid.res[0], h)
        if self.mid.attn is not None:
            h = run_attn(self.mid.attn, h)
        h = run_res(self.mid.res[1], h)

        for level in self.up:
            for i, block in enumerate(level.res):
                h = run_res(block, jnp.concatenate([h, skips.pop()], axis=-1))
                if level.attn is not None:
                    h = run_attn(level.attn[i], h)
            if level.resample is not None:
                h = run_res(level.resample, h)

        h = self.conv_out(ACTIVATIONS[c.outer_act](self.norm_out(h)))
        return h.astype(jnp.float32)
