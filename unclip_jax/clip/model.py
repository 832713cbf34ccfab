"""CLIP (Radford et al. 2021) as Flax NNX modules: a ViT image encoder and a causal text Transformer.

The layout follows OpenAI CLIP and its Hugging Face port (``transformers`` ``CLIPModel``) so that
released checkpoints load one to one (see :mod:`unclip_jax.convert.hf_clip`):

* both towers are stacks of pre-LayerNorm Transformer blocks
  (``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``);
* the text tower adds a learned position table to the token embeddings, runs the blocks with a
  causal mask, applies a final LayerNorm and pools the hidden state at the end-of-text token;
* the image tower cuts the image into patches with a strided convolution (no bias), prepends a
  class token, adds a learned position table, applies a LayerNorm *before* the blocks
  (``pre_layrnorm`` in Hugging Face) and a LayerNorm to the class token after them;
* each tower ends in a bias-free linear projection into the shared embedding space;
* ``logit_scale`` is the log of the learned inverse temperature of the contrastive loss.

Images are NHWC and already normalised (see :mod:`unclip_jax.clip.preprocess`). Parameters are
stored in ``config.param_dtype``; matmuls run in ``config.dtype``; softmax and LayerNorm statistics
are always float32. Parameters carry logical axis names only; nothing here knows about meshes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unclip_jax.models import layers, transformer
from unclip_jax.models.layers import abstract_init, logical
from unclip_jax.models.layers import count_params as count_module_params
from unclip_jax.models.presets import dtype_problems, from_preset

Array = jax.Array
ACTIVATIONS = ("quick_gelu", "gelu")


# --------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Shape and numerics of a CLIP model. The defaults are OpenAI ViT-B/32.

    ``text_mlp_dim`` / ``vision_mlp_dim`` of ``None`` mean 4x the tower's width; read the
    resolved sizes from :attr:`text_mlp` / :attr:`vision_mlp`.
    """

    embed_dim: int = 512                 # the shared projection dimension
    # Text tower.
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int | None = None
    # Image tower.
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int | None = None
    # Shared.
    activation: str = "quick_gelu"       # 'quick_gelu' (OpenAI) or 'gelu' (exact erf; open_clip)
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407            # 2 selects Hugging Face's legacy argmax(token_ids) pooling
    logit_scale_init: float = math.log(1 / 0.07)
    dtype: Any = "float32"               # compute dtype
    param_dtype: Any = "float32"
    remat: bool = False                  # rematerialise each Transformer block in the backward pass
    scan_layers: bool = True             # run the blocks in one lax.scan (False: a Python loop)

    def __post_init__(self):
        problems = []
        for tower in ("text", "vision"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if heads <= 0 or width % heads:
                problems.append(f"{tower}_width ({width}) must be a positive multiple of "
                                f"{tower}_heads ({heads})")
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            problems.append(f"image_size ({self.image_size}) must be a multiple of patch_size "
                            f"({self.patch_size})")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            problems.append(f"eos_token_id ({self.eos_token_id}) must be a token id below "
                            f"vocab_size ({self.vocab_size})")
        problems += dtype_problems(self)
        if problems:
            raise ValueError("Invalid CLIPConfig: " + "; ".join(problems) + ".")

    @property
    def text_mlp(self) -> int:
        return self.text_mlp_dim or 4 * self.text_width

    @property
    def vision_mlp(self) -> int:
        return self.vision_mlp_dim or 4 * self.vision_width

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def text_config(self) -> transformer.TextConfig:
        return transformer.TextConfig(
            vocab_size=self.vocab_size, context_length=self.context_length,
            width=self.text_width, layers=self.text_layers, heads=self.text_heads,
            mlp_dim=self.text_mlp, eos_token_id=self.eos_token_id, activation=self.activation,
            eps=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
            remat=self.remat, scan=self.scan_layers)

    def vision_block_config(self) -> transformer.BlockConfig:
        return transformer.BlockConfig(
            width=self.vision_width, heads=self.vision_heads, mlp_dim=self.vision_mlp,
            depth=self.vision_layers, layout="clip", activation=self.activation,
            eps=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
            remat=self.remat, scan=self.scan_layers)


_OPENAI = dict(activation="quick_gelu", vocab_size=49408, context_length=77)

PRESETS: dict[str, dict[str, Any]] = {
    # For tests and demos: runs in seconds on a CPU.
    "tiny": dict(_OPENAI, embed_dim=64, text_width=64, text_layers=2, text_heads=2,
                 image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2),
    # The offline Shapes demo: 64x64 images, trained from scratch.
    "small": dict(_OPENAI, embed_dim=256, text_width=256, text_layers=4, text_heads=4,
                  image_size=64, patch_size=8, vision_width=256, vision_layers=6, vision_heads=4),
    # OpenAI CLIP.
    "ViT-B/32": dict(_OPENAI, embed_dim=512, text_width=512, text_layers=12, text_heads=8,
                     image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                     vision_heads=12),
    "ViT-B/16": dict(_OPENAI, embed_dim=512, text_width=512, text_layers=12, text_heads=8,
                     image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                     vision_heads=12),
    "ViT-L/14": dict(_OPENAI, embed_dim=768, text_width=768, text_layers=12, text_heads=12,
                     image_size=224, patch_size=14, vision_width=1024, vision_layers=24,
                     vision_heads=16),
    "ViT-L/14-336": dict(_OPENAI, embed_dim=768, text_width=768, text_layers=12, text_heads=12,
                         image_size=336, patch_size=14, vision_width=1024, vision_layers=24,
                         vision_heads=16),
    # open_clip, trained on LAION-2B (laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
    "ViT-H/14": dict(_OPENAI, activation="gelu", embed_dim=1024, text_width=1024,
                     text_layers=24, text_heads=16, image_size=224, patch_size=14,
                     vision_width=1280, vision_layers=32, vision_heads=16),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> CLIPConfig:
    """The :class:`CLIPConfig` of a named preset, with any fields replaced by ``overrides``."""
    return from_preset(CLIPConfig, PRESETS, name, **overrides)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

def _dense(n_in: int, n_out: int, axes: tuple, std: float, cfg: CLIPConfig, rngs: nnx.Rngs,
           bias: bool = True) -> nnx.Linear:
    return layers.dense(n_in, n_out, axes, std=std, dtype=cfg.compute_dtype,
                        param_dtype=cfg.params_dtype, rngs=rngs, bias=bias)


def _param(init, shape: tuple, axes: tuple, cfg: CLIPConfig, rngs: nnx.Rngs) -> nnx.Param:
    return layers.param(init, shape, axes, cfg.params_dtype, rngs)


def LayerNorm(width: int, cfg: CLIPConfig, rngs: nnx.Rngs) -> layers.LayerNorm:
    return layers.LayerNorm(width, eps=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                            param_dtype=cfg.params_dtype, rngs=rngs)


class TextTransformer(transformer.TextTransformer):
    """CLIP's text tower: the shared causal text Transformer built from a :class:`CLIPConfig`.
    Token ids [B, L] -> (pooled state [B, W] at the end-of-text token, hidden [B, L, W])."""

    def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs):
        super().__init__(cfg.text_config(), rngs)


class VisionTransformer(nnx.Module):
    """Normalised images [B, H, W, 3] -> post-LayerNorm class-token state [B, W]."""

    def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        w, p = cfg.vision_width, cfg.patch_size
        self.patch_embed = nnx.Conv(
            3, w, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False,
            dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            kernel_init=logical(nnx.initializers.normal(0.02), None, None, "conv_in", "conv_out"), rngs=rngs)
        self.class_embedding = _param(nnx.initializers.normal(w ** -0.5), (w,), ("embed",), cfg, rngs)
        self.position_embedding = _param(nnx.initializers.normal(0.02), (cfg.num_patches + 1, w),
                                         (None, "embed"), cfg, rngs)
        self.pre_ln = LayerNorm(w, cfg, rngs)
        self.encoder = transformer.Encoder(cfg.vision_block_config(), rngs)
        self.post_ln = LayerNorm(w, cfg, rngs)

    def __call__(self, pixels: Array) -> Array:
        cfg = self.cfg
        s = cfg.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"pixels must be NHWC [batch, {s}, {s}, 3] (normalised, see "
                             f"unclip_jax.clip.preprocess), got shape {pixels.shape}.")
        x = self.patch_embed(pixels.astype(cfg.compute_dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.vision_width)  # patches in row-major order, as torch's flatten
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, cfg.vision_width))
        x = jnp.concatenate([cls, x], axis=1)
        x = (x + self.position_embedding[...]).astype(cfg.compute_dtype)
        x = self.pre_ln(x)
        x = self.encoder(x, last_outside=True)  # only the class token is read
        return self.post_ln(x[:, 0])


class CLIP(nnx.Module):
    """CLIP text and image encoders with projections into a shared embedding space."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.text = TextTransformer(config, rngs)
        self.vision = VisionTransformer(config, rngs)
        self.text_projection = _dense(config.text_width, config.embed_dim, ("embed", None),
                                      config.text_width ** -0.5, config, rngs, bias=False)
        self.visual_projection = _dense(config.vision_width, config.embed_dim, ("embed", None),
                                        config.vision_width ** -0.5, config, rngs, bias=False)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, config.params_dtype))

    def encode_text(self, token_ids: Array, attention_mask: Array | None = None
                    ) -> tuple[Array, Array]:
        """token_ids [B, L] int -> (text_embeds [B, D], last_hidden [B, L, W]).

        ``text_embeds`` is projected but not L2-normalised (Hugging Face ``get_text_features``);
        ``last_hidden`` is after the final LayerNorm (``last_hidden_state``). ``attention_mask``
        [B, L] (1 = token, 0 = padding) optionally hides padding keys; with the causal mask and
        right padding it does not change the pooled output.
        """
        pooled, hidden = self.text(token_ids, attention_mask)
        return self.text_projection(pooled), hidden

    def encode_image(self, pixels: Array) -> Array:
        """pixels [B, H, W, 3] float, normalised -> image_embeds [B, D] (not L2-normalised)."""
        return self.visual_projection(self.vision(pixels))

    def __call__(self, token_ids: Array, pixels: Array,
                 attention_mask: Array | None = None) -> dict[str, Array]:
        """Both encoders, for contrastive training: text_embeds, image_embeds, logit_scale."""
        text_embeds, _ = self.encode_text(token_ids, attention_mask)
        return {"text_embeds": text_embeds,
                "image_embeds": self.encode_image(pixels),
                "logit_scale": self.logit_scale[...]}


def abstract_model(config: CLIPConfig) -> CLIP:
    """The model with shape-only parameters (``nnx.eval_shape``): nothing is allocated."""
    return abstract_init(lambda: CLIP(config, rngs=nnx.Rngs(0)))


def count_params(config: CLIPConfig) -> int:
    """Number of parameters of a model with this config, computed without allocating it."""
    return count_module_params(abstract_model(config))
