"""The unCLIP decoder: a GLIDE / ADM UNet conditioned on the CLIP image embedding z_i.

Conditioning, the unCLIP way (paper section 2.1; Karlo's ``UnCLIPTextProjModel``):

* z_i (and the CLIP text embedding z_t, when ``use_text_embed``) are projected and added to the
  timestep embedding;
* z_i is projected into ``clip_tokens`` (4) extra context tokens, put in front of the text
  encoder's outputs, which are projected to the context width and layer-normed; every attention
  layer attends to these tokens as extra keys / values (GLIDE);
* the text encoder is CLIP's text Transformer run outside the model (``text_encoder='clip'``, its
  hidden states are passed in, as Karlo does), a trainable GLIDE-style Transformer inside the model
  (``'transformer'``, fed token ids; its pooled end-of-text state is also projected into the
  timestep embedding, as in GLIDE), or nothing (``'none'``: z_i alone);
* classifier-free guidance: ``drop_image`` rows use a learned null embedding instead of z_i,
  ``drop_text`` rows have z_t zeroed and every text token masked out (the 4 image tokens stay).
  ``drop_tokens`` rows lose the caption's tokens alone (masked out of the context; a
  ``'transformer'`` encoder's pooled state zeroed) and keep z_t: the "without caption tokens"
  ablation, never used in training. Training drops z_i 10% and the caption 50% of the time (see
  ``unclip_jax.train.decoder_stage``); sampling runs cond and uncond rows in one doubled batch.

    decoder(x_t [B, H, W, 3], t [B], image_embed [B, D], text_embed [B, D],
            text_hidden [B, L, W], text_mask [B, L] bool) -> [B, H, W, 6]

Output channels: epsilon, then the learned variance-range values (``learned_range``).
The 4 extra tokens come out of one Linear of width 4 * context_dim laid out channel-major (the
token index varies fastest), the layout of Karlo's checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unclip_jax.diffusion import guided_model_fn
from unclip_jax.models.layers import LayerNorm, abstract_init, logical
from unclip_jax.models.transformer import TextConfig, TextTransformer
from unclip_jax.models.unet_blocks import TimeEmbedding, UNet, UNetConfig, dense

Array = jax.Array
TEXT_ENCODERS = ("clip", "transformer", "none")
COND_TO_TIME = ("add", "linear", "mlp", "none")
# DecoderConfig fields handed to UNetConfig as they are.
UNET_VARIANTS = ("time_proj", "self_attn_levels", "up_self_attn_levels", "self_attn_eps",
                 "block_widths", "up_head_dim", "up_resblock_updown", "up_res_time_act",
                 "out_scale", "up_out_scale", "mid_blocks", "mid_head_dim", "mid_out_scale",
                 "mid_res_time_act", "cross_only", "mid_cross_only", "context_norm",
                 "context_norm_groups", "time_post_act", "emb_act", "emb_concat",
                 "conv_in_kernel", "conv_out_kernel", "conv_down_padding")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and numerics of the decoder. Defaults: a small model; see configs/decoder.py for
    the paper's and Karlo's sizes."""

    image_size: int = 64
    image_channels: int = 3
    out_channels: int = 6
    channels: int = 64
    channel_mult: tuple = (1, 2, 3, 4)
    num_res_blocks: int | tuple = 2  # or one per level
    attention_levels: tuple = (1, 2, 3)
    up_attention_levels: tuple | None = None  # the up path's (None: attention_levels)
    time_proj: str = "positional"    # or 'fourier' (unet_blocks.FourierFeatures)
    self_attn_levels: tuple = ()     # attention levels without the context tokens
    up_self_attn_levels: tuple | None = None
    self_attn_eps: float | None = None
    mid_attention: bool = True
    head_dim: int | tuple = 64      # or one per level
    groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    time_embed_dim: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    resblock_updown: bool | tuple = True  # or one per level
    scale_shift: bool = True         # timestep scale-shift norm (ADM, Karlo); False: additive
    act: str = "silu"                # UNet activation (unet_blocks.ACTIVATIONS), everywhere
    res_time_act: bool | tuple = True  # False: diffusers' resnet_skip_time_act (or per level)
    center_input: bool = False       # x_t -> 2 x_t - 1 first (diffusers' center_input_sample)
    # UNet variants (see unet_blocks.UNetConfig; the defaults are the ADM / Karlo layout).
    block_widths: tuple | None = None
    up_head_dim: tuple | None = None
    up_resblock_updown: tuple | None = None
    up_res_time_act: tuple | None = None
    out_scale: float | tuple = 1.0
    up_out_scale: tuple | None = None
    mid_blocks: int = 2
    mid_head_dim: int | None = None
    mid_out_scale: float = 1.0
    mid_res_time_act: bool | None = None
    cross_only: bool | tuple = False
    mid_cross_only: bool = False
    context_norm: str | None = None
    context_norm_groups: int = 32
    time_post_act: str | None = None
    emb_act: str | None = None
    emb_concat: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    conv_down_padding: int = 1
    # How the projected z_i / z_t reach the timestep embedding: 'add' (added as they are),
    # 'linear' or 'mlp' (Linear-SiLU-Linear) from ``cond_time_dim`` first, 'none' (they do not).
    cond_to_time: str = "add"
    cond_time_dim: int | None = None  # width of the projected z_i / z_t (None: emb_dim)
    # Conditioning.
    clip_dim: int = 768              # width of z_i and z_t
    context_dim: int = 512           # width of the context tokens inside attention
    token_dim: int | None = None     # tokens built this wide, then one Linear to context_dim
    token_pool_heads: int | None = None  # also add the tokens, attention-pooled, to the time emb
    clip_tokens: int = 4             # extra tokens projected from z_i
    use_text_embed: bool = True      # project z_t into the timestep embedding (Karlo)
    text_encoder: str = "clip"       # 'clip' | 'transformer' | 'none'
    text_width: int | None = None    # width of text_hidden for 'clip' (None: clip_dim)
    text_layer_norm_eps: float = 1e-5
    # The GLIDE-style Transformer ('transformer').
    xf_width: int = 512
    xf_layers: int = 4
    xf_heads: int = 8
    xf_ctx: int = 77
    xf_vocab: int = 49408
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: bool = False
    remat_policy: str = "nothing_saveable"   # the UNet's blocks with remat: a checkpoint policy
    attention_impl: str = "xla"              # the UNet's attention: 'xla' | 'cudnn'
    scan_layers: bool = True         # the text Transformer's blocks in one lax.scan

    def __post_init__(self):
        for f in dataclasses.fields(self):  # JSON gives lists
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        if self.cond_to_time not in COND_TO_TIME:
            raise ValueError(f"cond_to_time must be one of {COND_TO_TIME}, got "
                             f"{self.cond_to_time!r}.")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, got "
                             f"{self.text_encoder!r}.")
        if self.token_pool_heads and (self.token_dim or self.context_dim) % self.token_pool_heads:
            raise ValueError(f"token_pool_heads ({self.token_pool_heads}) must divide the tokens' "
                             f"width ({self.token_dim or self.context_dim}).")
        if self.clip_tokens < 1:
            raise ValueError("clip_tokens must be at least 1 (the paper and Karlo use 4).")
        self.unet_config()  # validates the UNet's shape

    def unet_config(self) -> UNetConfig:
        return UNetConfig(
            in_channels=self.image_channels, out_channels=self.out_channels,
            channels=self.channels, channel_mult=self.channel_mult,
            num_res_blocks=self.num_res_blocks, attention_levels=self.attention_levels,
            up_attention_levels=self.up_attention_levels,
            mid_attention=self.mid_attention, head_dim=self.head_dim,
            context_dim=self.context_dim, time_embed_dim=self.time_embed_dim,
            groups=self.groups, norm_eps=self.norm_eps, scale_shift=self.scale_shift,
            act=self.act, outer_act=self.act, res_time_act=self.res_time_act,
            center_input=self.center_input,
            resblock_updown=self.resblock_updown, dropout=self.dropout,
            flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift, dtype=self.dtype,
            param_dtype=self.param_dtype, remat=self.remat, remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
            **{name: getattr(self, name) for name in UNET_VARIANTS})

    def xf_config(self) -> TextConfig:
        return TextConfig(vocab_size=self.xf_vocab, context_length=self.xf_ctx,
                          width=self.xf_width, layers=self.xf_layers, heads=self.xf_heads,
                          mlp_dim=4 * self.xf_width, eos_token_id=min(49407, self.xf_vocab - 1),
                          dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                          scan=self.scan_layers)

    @property
    def hidden_width(self) -> int:
        if self.text_encoder == "transformer":
            return self.xf_width
        return self.text_width or self.clip_dim

    @property
    def emb_dim(self) -> int:
        return self.time_embed_dim or 4 * (self.block_widths[0] if self.block_widths
                                           else self.channels)

    @property
    def cond_dim(self) -> int:
        """Width of the projected z_i / z_t (``emb_add`` before ``cond_to_time``)."""
        return self.cond_time_dim or self.emb_dim

    @property
    def learned_variance(self) -> bool:
        return self.out_channels == 2 * self.image_channels


class TokenPool(nnx.Module):
    """The context tokens pooled into one time-embedding vector (DeepFloyd IF's attention pooling,
    diffusers' TextTimeEmbedding): LayerNorm, a query from the tokens' mean plus a learned
    position, multi-head attention over [query, tokens] (no output projection), Linear to
    ``n_out``, LayerNorm. Every token takes part, masked or not."""

    def __init__(self, width: int, n_out: int, heads: int, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"TokenPool: {width} channels cannot be split into {heads} heads.")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = heads
        self.norm1 = LayerNorm(width, eps=1e-5, **kw)
        self.positional_embedding = nnx.Param(logical(nnx.initializers.normal(
            width ** -0.5), None, "embed")(rngs.params(), (1, width), jnp.dtype(param_dtype)))
        self.q_proj = dense(width, width, ("embed", "heads"), **kw)
        self.k_proj = dense(width, width, ("embed", "heads"), **kw)
        self.v_proj = dense(width, width, ("embed", "heads"), **kw)
        self.proj = dense(width, n_out, ("embed", "mlp"), **kw)
        self.norm2 = LayerNorm(n_out, eps=1e-5, **kw)

    def __call__(self, tokens: Array) -> Array:
        x = self.norm1(tokens)
        b, n, w = x.shape
        query = x.mean(axis=1, keepdims=True) + self.positional_embedding[...].astype(x.dtype)
        keys = jnp.concatenate([query, x], axis=1)
        split = lambda y: y.reshape(b, y.shape[1], self.heads, w // self.heads)  # noqa: E731
        pooled = jax.nn.dot_product_attention(split(self.q_proj(query)), split(self.k_proj(keys)),
                                              split(self.v_proj(keys)))
        return self.norm2(self.proj(pooled.reshape(b, w)))


class Decoder(nnx.Module):
    """See the module docstring for the call."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        c = self.config = config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        kw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
        emb = c.cond_dim
        self.null_image_embed = nnx.Param(logical(nnx.initializers.zeros_init(), "embed")(
            rngs.params(), (c.clip_dim,), pdt))
        self.image_to_time = dense(c.clip_dim, emb, ("embed", "mlp"), **kw)
        self.text_to_time = dense(c.clip_dim, emb, ("embed", "mlp"), **kw) if c.use_text_embed else None
        if c.cond_to_time == "linear":
            self.cond_to_time = dense(emb, c.emb_dim, ("embed", "mlp"), **kw)
        elif c.cond_to_time == "mlp":
            self.cond_to_time = TimeEmbedding(emb, c.emb_dim, **kw)
        else:
            self.cond_to_time = None
        tok = c.token_dim or c.context_dim
        self.image_to_tokens = dense(c.clip_dim, c.clip_tokens * tok, ("embed", "mlp"), **kw)
        if c.text_encoder == "none":
            self.text_transformer = self.text_to_context = self.text_norm = None
            self.xf_to_time = None
        else:
            self.text_transformer = (TextTransformer(c.xf_config(), rngs)
                                     if c.text_encoder == "transformer" else None)
            # GLIDE also adds the Transformer's pooled (end-of-text) state to the time embedding.
            self.xf_to_time = (dense(c.xf_width, emb, ("embed", "mlp"), **kw)
                               if c.text_encoder == "transformer" else None)
            self.text_to_context = dense(c.hidden_width, tok, ("embed", "mlp"), **kw)
            self.text_norm = LayerNorm(tok, eps=c.text_layer_norm_eps, **kw)
        self.context_proj = (dense(tok, c.context_dim, ("embed", "mlp"), **kw)
                             if c.token_dim is not None else None)
        self.token_pool = (TokenPool(tok, c.emb_dim, c.token_pool_heads, **kw)
                           if c.token_pool_heads else None)
        self.unet = UNet(c.unet_config(), rngs)

    # ---------------------------------------------------------------------------------------
    def conditioning(self, image_embed: Array, text_embed: Array | None = None,
                     text_hidden: Array | None = None, text_mask: Array | None = None, *,
                     text_tokens: Array | None = None, drop_image: Array | None = None,
                     drop_text: Array | None = None,
                     drop_tokens: Array | None = None) -> tuple[Array, Array, Array]:
        """(emb_add [B, E], context [B, 4 + L, token_dim or context_dim], context_mask
        [B, 4 + L] bool): before ``cond_to_time``, ``token_pool`` and ``context_proj``."""
        c = self.config
        if image_embed.ndim != 2 or image_embed.shape[-1] != c.clip_dim:
            raise ValueError(f"image_embed must be [B, {c.clip_dim}], got {image_embed.shape}.")
        b = image_embed.shape[0]
        image_embed = image_embed.astype(jnp.float32)
        if drop_image is not None:
            null = self.null_image_embed[...].astype(jnp.float32)[None]
            image_embed = jnp.where(jnp.asarray(drop_image, bool)[:, None], null, image_embed)
        emb_add = self.image_to_time(image_embed)
        if self.text_to_time is not None:
            if text_embed is None:
                raise ValueError("This decoder adds the CLIP text embedding to the timestep "
                                 "embedding (use_text_embed=True): pass text_embed [B, D].")
            if text_embed.shape != image_embed.shape:
                raise ValueError(f"text_embed must be [B, {c.clip_dim}] like image_embed, got "
                                 f"{text_embed.shape}.")
            text_embed = text_embed.astype(jnp.float32)
            if drop_text is not None:
                text_embed = jnp.where(jnp.asarray(drop_text, bool)[:, None], 0.0, text_embed)
            emb_add = emb_add + self.text_to_time(text_embed)

        tokens = self.image_to_tokens(image_embed)
        tokens = tokens.reshape(b, c.token_dim or c.context_dim, c.clip_tokens).swapaxes(1, 2)
        context, keep = tokens, jnp.ones((b, c.clip_tokens), bool)

        if c.text_encoder != "none":
            no_tokens = None        # rows whose caption tokens are dropped (either flag)
            for flag in (drop_text, drop_tokens):
                if flag is not None:
                    flag = jnp.asarray(flag, bool)
                    no_tokens = flag if no_tokens is None else no_tokens | flag
            if c.text_encoder == "transformer":
                if text_tokens is None:
                    raise ValueError("text_encoder='transformer' reads token ids: pass "
                                     "text_tokens [B, L] (and text_mask), not text_hidden.")
                pooled, text_hidden = self.text_transformer(text_tokens, text_mask)
                pooled = self.xf_to_time(pooled)
                if no_tokens is not None:
                    pooled = jnp.where(no_tokens[:, None], 0.0, pooled)
                emb_add = emb_add + pooled.astype(emb_add.dtype)
            elif text_hidden is None:
                raise ValueError("text_encoder='clip' needs the CLIP text Transformer's hidden "
                                 f"states: pass text_hidden [B, L, {c.hidden_width}] and "
                                 "text_mask [B, L].")
            if text_hidden.ndim != 3 or text_hidden.shape[0] != b or \
                    text_hidden.shape[-1] != c.hidden_width:
                raise ValueError(f"text_hidden must be [B={b}, L, {c.hidden_width}], got "
                                 f"{text_hidden.shape}.")
            hidden = self.text_norm(self.text_to_context(text_hidden))
            mask = (jnp.ones(hidden.shape[:2], bool) if text_mask is None
                    else jnp.asarray(text_mask, bool))
            if mask.shape != hidden.shape[:2]:
                raise ValueError(f"text_mask must be [B, L] = {hidden.shape[:2]}, got {mask.shape}.")
            if no_tokens is not None:
                mask = mask & ~no_tokens[:, None]
            context = jnp.concatenate([context, hidden.astype(context.dtype)], axis=1)
            keep = jnp.concatenate([keep, mask], axis=1)
        return emb_add, context, keep

    def __call__(self, x_t: Array, t: Array, image_embed: Array, text_embed: Array | None = None,
                 text_hidden: Array | None = None, text_mask: Array | None = None, *,
                 text_tokens: Array | None = None, drop_image: Array | None = None,
                 drop_text: Array | None = None, drop_tokens: Array | None = None,
                 deterministic: bool = True, rng: Array | None = None) -> Array:
        emb_add, context, keep = self.conditioning(
            image_embed, text_embed, text_hidden, text_mask, text_tokens=text_tokens,
            drop_image=drop_image, drop_text=drop_text, drop_tokens=drop_tokens)
        if self.config.cond_to_time == "none":
            emb_add = None
        elif self.cond_to_time is not None:
            emb_add = self.cond_to_time(emb_add)
        if self.token_pool is not None:
            pooled = self.token_pool(context).astype(jnp.float32)
            emb_add = pooled if emb_add is None else emb_add + pooled
        if self.context_proj is not None:
            context = self.context_proj(context)
        return self.unet(x_t, t, emb_add=emb_add, context=context, context_mask=keep,
                         deterministic=deterministic, rng=rng)


def guided_decoder_fn(decoder: Decoder, image_embed: Array, text_embed: Array | None = None,
                      text_hidden: Array | None = None, text_mask: Array | None = None, *,
                      text_tokens: Array | None = None, guidance_scale: float = 1.0,
                      uncond: dict | None = None, caption_tokens: bool = True):
    """A ``model_fn(x, t)`` for the samplers of ``unclip_jax.diffusion``, with classifier-free
    guidance when ``guidance_scale != 1``.

    The unconditional rows use the learned null z_i and drop the caption (z_t zeroed, text
    masked out), as in training. ``uncond`` may instead give the unconditional text inputs
    explicitly (dict with text_embed / text_hidden / text_mask, e.g. CLIP's outputs for the
    empty caption, as Karlo's pipeline does); z_i is still the null embedding there.
    ``caption_tokens=False`` drops the caption's tokens from every row (``drop_tokens``), z_t
    kept: the "without caption tokens" ablation.
    """
    cond = dict(text_embed=text_embed, text_hidden=text_hidden, text_mask=text_mask,
                text_tokens=text_tokens)
    b = image_embed.shape[0]
    no_tokens = None if caption_tokens else jnp.ones((b,), bool)

    if guidance_scale == 1.0:
        return lambda x, t: decoder(x, t, image_embed, **cond, drop_tokens=no_tokens)

    cat = lambda a, u: None if a is None else jnp.concatenate([a, a if u is None else u], axis=0)
    u = uncond or {}
    both = {k: cat(v, u.get(k)) for k, v in cond.items()}
    drop_image = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
    drop_text = None if uncond else drop_image

    def doubled(x2, t2):
        return decoder(x2, t2, cat(image_embed, None), **both, drop_image=drop_image,
                       drop_text=drop_text, drop_tokens=cat(no_tokens, None))

    return guided_model_fn(doubled, guidance_scale,
                           learned_variance=decoder.config.learned_variance)


def abstract_decoder(config: DecoderConfig) -> Decoder:
    """The decoder's structure with ShapeDtypeStruct leaves (no memory allocated)."""
    return abstract_init(lambda: Decoder(config, nnx.Rngs(0)))
