"""The diffusion upsamplers (64 -> 256, 256 -> 1024): ADM UNets with convolutions only.

The low-resolution image, already resized to the target size (bicubic) and degraded in
training, is concatenated to the noisy image on the channel axis; nothing else conditions the
model (no text, no CLIP embedding, no guidance). With no attention the network is fully
convolutional, so it is trained on random crops a quarter of the target size and run at full
size (GroupNorm statistics over a larger image are the only difference).

    sr = SuperRes(SuperResConfig(...), rngs=nnx.Rngs(0))
    out = sr(x_t [B, H, W, 3], t [B], low_res [B, H, W, 3])   # [B, H, W, out_channels]

``out_channels`` 6 means epsilon + learned variance range (the paper's 700M / 300M models are
trained with a plain loss; Karlo's released upsampler predicts epsilon only, 3 channels).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unclip_jax.models.layers import abstract_init, count_params  # noqa: F401 (re-exported)
from unclip_jax.models.unet_blocks import UNet, UNetConfig

__all__ = ["SuperRes", "SuperResConfig", "abstract_super_res", "count_params", "resize_low_res"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SuperResConfig:
    """An upsampler UNet. ``image_channels`` is the channel count of x_t and of the low-res image
    (the UNet sees twice that)."""

    image_channels: int = 3
    out_channels: int = 3
    channels: int = 64
    channel_mult: tuple = (1, 2, 3, 4)
    num_res_blocks: int = 2
    groups: int = 32
    norm_eps: float = 1e-5
    scale_shift: bool = True
    resblock_updown: bool | tuple = True  # or one per level
    dropout: float = 0.0
    time_embed_dim: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    act: str = "silu"                # inside the residual blocks (diffusers UNet2DModel act_fn)
    center_input: bool = False       # [x_t, low_res] -> 2 [x_t, low_res] - 1 first
    mid_attention: bool = False      # self-attention in the middle block (Karlo: none)
    head_dim: int = 64               # its head width
    # Variants (see unet_blocks.UNetConfig; the defaults are the ADM / Karlo layout).
    attention_levels: tuple = ()     # levels whose residual blocks are followed by self-attention
    up_attention_levels: tuple | None = None  # the up path's (None: attention_levels)
    block_widths: tuple | None = None
    attn_norm: bool = True           # False: no GroupNorm before the attention
    mid_attn_norm: bool | None = None  # the middle attention's (None: attn_norm)
    mid_attn_groups: int | None = None  # its groups (None: groups)
    time_proj: str = "positional"    # or 'learned' (a table of num_timesteps rows)
    num_timesteps: int = 1000
    mid_blocks: int = 2              # 0: no middle block
    mid_out_scale: float = 1.0
    mid_attn_out_scale: float = 1.0
    up_resblock_updown: tuple | None = None
    conv_down_padding: int = 1
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: bool = False
    remat_policy: str = "nothing_saveable"   # with remat: a jax.checkpoint_policies name
    attention_impl: str = "xla"              # 'xla' | 'cudnn'

    def __post_init__(self):
        for f in dataclasses.fields(self):  # JSON gives lists
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        self.unet_config()  # validates the UNet's shape

    def unet_config(self) -> UNetConfig:
        return UNetConfig(
            in_channels=2 * self.image_channels, out_channels=self.out_channels,
            channels=self.channels, channel_mult=tuple(self.channel_mult),
            num_res_blocks=self.num_res_blocks, attention_levels=self.attention_levels,
            up_attention_levels=self.up_attention_levels,
            block_widths=self.block_widths, attn_norm=self.attn_norm,
            mid_attn_norm=self.mid_attn_norm, mid_attn_groups=self.mid_attn_groups,
            time_proj=self.time_proj, num_timesteps=self.num_timesteps,
            mid_blocks=self.mid_blocks, mid_out_scale=self.mid_out_scale,
            mid_attn_out_scale=self.mid_attn_out_scale,
            up_resblock_updown=self.up_resblock_updown, conv_down_padding=self.conv_down_padding,
            mid_attention=self.mid_attention, head_dim=self.head_dim, attn_norm_eps=self.norm_eps,
            context_dim=None, time_embed_dim=self.time_embed_dim, groups=self.groups,
            norm_eps=self.norm_eps, scale_shift=self.scale_shift, act=self.act,
            center_input=self.center_input,
            resblock_updown=self.resblock_updown, dropout=self.dropout,
            flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift, dtype=self.dtype,
            param_dtype=self.param_dtype, remat=self.remat, remat_policy=self.remat_policy,
            attention_impl=self.attention_impl)

    @property
    def learned_variance(self) -> bool:
        return self.out_channels == 2 * self.image_channels


class SuperRes(nnx.Module):
    """``sr(x_t, t, low_res, deterministic=True, rng=None)``: see the module docstring."""

    def __init__(self, config: SuperResConfig, rngs: nnx.Rngs):
        self.config = config
        self.unet = UNet(config.unet_config(), rngs)

    def __call__(self, x_t: Array, t: Array, low_res: Array, deterministic: bool = True,
                 rng: Array | None = None) -> Array:
        if x_t.shape != low_res.shape:
            raise ValueError(
                f"low_res must already be at the target size: x_t has shape {x_t.shape}, low_res "
                f"{low_res.shape}. Resize it first, e.g. with unclip_jax.models.upsampler.resize_low_res.")
        x = jnp.concatenate([x_t, low_res.astype(x_t.dtype)], axis=-1)
        return self.unet(x, t, deterministic=deterministic, rng=rng)


def resize_low_res(low_res: Array, size: int | tuple[int, int], clip: bool = False) -> Array:
    """Bicubic upsampling of the low-resolution image to the upsampler's size (jit-able).

    ``low_res``: [H, W, C] or [B, H, W, C], any float range; ``size``: int or (h, w). The kernel
    is torch's ``interpolate(mode='bicubic', antialias=True)`` (Keys a = -0.5, half-pixel
    centres, weights renormalised at the borders), which is what diffusers' UnCLIPPipeline
    applies to the decoder's output before its super-res UNet, so imported weights see the
    input they were trained on; ``jax.image.resize``'s 'bicubic' is that kernel. Training and
    sampling both use this function. ``clip`` clamps to [-1, 1] (bicubic overshoots a little at
    edges; diffusers does not clamp).
    """
    if getattr(low_res, "ndim", None) not in (3, 4):
        raise ValueError(f"resize_low_res: expected [H, W, C] or [B, H, W, C], got shape "
                         f"{getattr(low_res, 'shape', None)}.")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    low_res = jnp.asarray(low_res, jnp.float32)
    out = jax.image.resize(low_res, low_res.shape[:-3] + (h, w, low_res.shape[-1]), "bicubic")
    return jnp.clip(out, -1.0, 1.0) if clip else out


def abstract_super_res(config: SuperResConfig) -> SuperRes:
    """The model's structure with ShapeDtypeStruct leaves (no memory): for counts and loading."""
    return abstract_init(lambda: SuperRes(config, nnx.Rngs(0)))
