"""The unCLIP diffusion prior (Ramesh et al. 2022, section 2.2) as a Flax NNX module.

A decoder-only Transformer reads, in this order and under a causal mask,

    [encoded text tokens (L), CLIP text embedding z_t, timestep embedding, noised z_i,
     final query token ("prd", optional)]

and the output at the last position, after a final LayerNorm and a linear map, predicts the
clean (normalised) image embedding: x0 prediction, trained with MSE. Padding text tokens are
hidden from every query. The layout is diffusers' ``PriorTransformer`` (Karlo's released prior),
so :func:`unclip_jax.convert.diffusers.load_prior` fills it one tensor to one parameter:

* each token is projected to the model width ``heads * head_dim``: the text tokens by
  ``encoder_hidden_states_proj`` (optional), z_t by ``embedding_proj`` after an optional
  LayerNorm (``embedding_proj_norm``), x_t by ``proj_in``; the timestep by a sinusoidal
  embedding (cos first, as diffusers' ``flip_sin_to_cos``) through a two-layer MLP;
* a learned position table covers the whole sequence; an optional LayerNorm (``norm_in``)
  follows it;
* blocks are pre-LN: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` with a GELU MLP of 4x
  width; every projection has a bias;
* ``clip_mean`` / ``clip_std`` hold per-dimension statistics of z_i (Karlo's normalisation).
  They are buffers (:class:`Buffer`), not trained parameters.
* ``out_dim`` (diffusers' ``clip_embed_dim``) sets the width of the final linear map and of
  the statistics; a prior whose out_dim differs from D runs, but cannot be sampled.

Embedding normalisation before diffusion (``PriorConfig.embed_norm``):
  'scale'        z * embed_scale (the paper: 17.2)
  'mean_std'     (z - clip_mean) / clip_std (Karlo)
  'l2_sqrt_dim'  z / |z| * sqrt(D) (DALLE2-pytorch)
:meth:`DiffusionPrior.normalise` / :meth:`DiffusionPrior.denormalise` apply and undo it; the
Transformer itself always works in the normalised space.

Classifier-free guidance needs an "unconditional" input. With ``learned_null=True`` the module
owns a learned null text embedding and null token states, swapped in per row by ``drop_text``
(DALLE2-pytorch's way). Without it (Karlo, and any diffusers checkpoint) the unconditional input
is data: the CLIP encoding of the empty caption, as diffusers' pipelines do; see
:func:`drop_text_conditioning`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from unclip_jax.models import layers, transformer
from unclip_jax.models.layers import abstract_init
from unclip_jax.models.presets import dtype_problems, from_preset

Array = jax.Array
EMBED_NORMS = ("scale", "mean_std", "l2_sqrt_dim")
TIME_ACTIVATIONS = ("silu", "gelu", "mish", "relu")


class Buffer(nnx.Variable):
    """A non-trained array of a module (e.g. embedding statistics): kept out of ``nnx.Param``, so
    optimizers and weight decay never see it, while checkpoints and importers still do."""


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Shape and numerics of a diffusion prior. The defaults are Karlo's prior (ViT-L/14)."""

    embed_dim: int = 768             # D: the CLIP image embedding z_i (diffusers embedding_dim)
    text_embed_dim: int | None = None  # z_t's dimension; None = embed_dim (embedding_proj_dim)
    text_width: int | None = None    # width of the encoded text tokens; None = embed_dim
    out_dim: int | None = None       # width of the prediction; None = embed_dim (clip_embed_dim)
    context_length: int = 77         # L: number of text tokens (diffusers num_embeddings)
    num_heads: int = 32
    head_dim: int = 64
    num_layers: int = 20
    time_embed_dim: int | None = None  # hidden width of the timestep MLP; None = model width
    time_embed_act: str = "silu"     # 'silu' | 'gelu' | 'mish' | 'relu'
    norm_in: bool = False            # LayerNorm after the position table (norm_in_type='layer')
    text_embed_norm: bool = False    # LayerNorm on z_t before its projection
    text_proj: bool = True           # project the text tokens (encoder_hid_proj_type='linear');
                                     # False feeds them as they are (width must be the model's)
    prd_token: bool = True           # append a learned final query token (added_emb_type='prd')
    dropout: float = 0.0             # after attention and inside the MLP, as diffusers
    embed_norm: str = "scale"        # 'scale' | 'mean_std' | 'l2_sqrt_dim' (see module doc)
    embed_scale: float = 17.2        # for embed_norm='scale'
    learned_null: bool = False       # own a learned null text conditioning for guidance
    layer_norm_eps: float = 1e-5
    dtype: Any = "float32"           # compute dtype
    param_dtype: Any = "float32"
    remat: bool = False              # rematerialise each block in the backward pass
    scan_layers: bool = True         # run the blocks in one lax.scan (False: a Python loop)

    def __post_init__(self):
        problems = []
        for name in ("embed_dim", "context_length", "num_heads", "head_dim", "num_layers"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.time_embed_act not in TIME_ACTIVATIONS:
            problems.append(f"time_embed_act must be one of {TIME_ACTIVATIONS}, got "
                            f"{self.time_embed_act!r}")
        if self.embed_norm not in EMBED_NORMS:
            problems.append(f"embed_norm must be one of {EMBED_NORMS}, got {self.embed_norm!r}")
        if not self.text_proj and self.token_width != self.width:
            problems.append(f"text_proj=False feeds the text tokens unprojected, so text_width "
                            f"({self.token_width}) must equal num_heads * head_dim ({self.width})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        problems += dtype_problems(self)
        if problems:
            raise ValueError("Invalid PriorConfig: " + "; ".join(problems) + ".")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def cond_dim(self) -> int:
        return self.text_embed_dim or self.embed_dim

    @property
    def token_width(self) -> int:
        return self.text_width or self.embed_dim

    @property
    def output_dim(self) -> int:
        return self.out_dim or self.embed_dim

    @property
    def time_hidden(self) -> int:
        return self.time_embed_dim or self.width

    @property
    def seq_len(self) -> int:
        """L text tokens + z_t + timestep + x_t (+ the prd query token)."""
        return self.context_length + 3 + int(self.prd_token)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def block_config(self) -> transformer.BlockConfig:
        return transformer.BlockConfig(
            width=self.width, heads=self.num_heads, mlp_dim=4 * self.width,
            depth=self.num_layers, layout="prior", activation="gelu", eps=self.layer_norm_eps,
            dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
            remat=self.remat, scan=self.scan_layers)


PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the synthetic task: seconds on a CPU.
    "tiny": dict(embed_dim=32, text_width=32, context_length=8, num_heads=2, head_dim=16,
                 num_layers=2, embed_norm="l2_sqrt_dim"),
    # Karlo v1.0-alpha's prior (diffusers PriorTransformer defaults), ViT-L/14 embeddings.
    "karlo": dict(embed_dim=768, context_length=77, num_heads=32, head_dim=64, num_layers=20,
                  embed_norm="mean_std"),
    # The paper (Table 3): ViT-H/16 embeddings (1024), a 2048-wide, 24-layer Transformer,
    # 256 text tokens, embeddings scaled by 17.2.
    "paper": dict(embed_dim=1024, text_width=1024, context_length=256, num_heads=32,
                  head_dim=64, num_layers=24, embed_norm="scale", embed_scale=17.2),
}


def get_preset(name: str, **overrides: Any) -> PriorConfig:
    """The :class:`PriorConfig` of a named preset with some fields replaced."""
    return from_preset(PriorConfig, PRESETS, name, **overrides)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

def _dense(n_in: int, n_out: int, axes: tuple, cfg: PriorConfig, rngs: nnx.Rngs,
           std: float | None = None) -> nnx.Linear:
    return layers.dense(n_in, n_out, axes, std=n_in ** -0.5 if std is None else std,
                        dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)


def _param(init, shape: tuple, axes: tuple, cfg: PriorConfig, rngs: nnx.Rngs) -> nnx.Param:
    return layers.param(init, shape, axes, cfg.params_dtype, rngs)


def LayerNorm(width: int, cfg: PriorConfig, rngs: nnx.Rngs) -> layers.LayerNorm:
    return layers.LayerNorm(width, eps=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                            param_dtype=cfg.params_dtype, rngs=rngs)


_ACTIVATIONS = dict(silu=jax.nn.silu, gelu=lambda h: jax.nn.gelu(h, approximate=False),
                    mish=jax.nn.mish, relu=jax.nn.relu)


class TimeEmbedding(nnx.Module):
    """Sinusoidal embedding of the timestep (cos half first) -> Linear -> act -> Linear."""

    def __init__(self, cfg: PriorConfig, rngs: nnx.Rngs):
        self.width, self.act = cfg.width, cfg.time_embed_act
        self.linear_1 = _dense(cfg.width, cfg.time_hidden, ("embed", "mlp"), cfg, rngs)
        self.linear_2 = _dense(cfg.time_hidden, cfg.width, ("mlp", "embed"), cfg, rngs)

    def __call__(self, t: Array) -> Array:
        half = self.width // 2
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
        angles = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
        if self.width % 2:
            emb = jnp.pad(emb, ((0, 0), (0, 1)))
        h = self.linear_1(emb)
        return self.linear_2(_ACTIVATIONS[self.act](h))


# --------------------------------------------------------------------------------------------
# The prior
# --------------------------------------------------------------------------------------------

class TextConditioning(NamedTuple):
    """What the prior is conditioned on: z_t [B, Dt], token states [B, L, W], mask [B, L] bool."""
    text_embed: Array
    text_hidden: Array
    text_mask: Array


class DiffusionPrior(nnx.Module):
    """The diffusion prior: ``prior(x_t, t, text_embed, text_hidden, text_mask) -> x0 [B, D]``."""

    def __init__(self, config: PriorConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        w = cfg.width
        self.time_embedding = TimeEmbedding(cfg, rngs)
        self.proj_in = _dense(cfg.embed_dim, w, (None, "embed"), cfg, rngs)
        self.embedding_proj_norm = LayerNorm(cfg.cond_dim, cfg, rngs) if cfg.text_embed_norm else None
        self.embedding_proj = _dense(cfg.cond_dim, w, (None, "embed"), cfg, rngs)
        self.encoder_hidden_states_proj = (
            _dense(cfg.token_width, w, (None, "embed"), cfg, rngs) if cfg.text_proj else None)
        self.positional_embedding = _param(nnx.initializers.normal(0.01), (1, cfg.seq_len, w),
                                           (None, None, "embed"), cfg, rngs)
        self.prd_embedding = (_param(nnx.initializers.normal(0.02), (1, 1, w),
                                     (None, None, "embed"), cfg, rngs) if cfg.prd_token else None)
        self.norm_in = LayerNorm(w, cfg, rngs) if cfg.norm_in else None
        self.blocks = transformer.Stack(cfg.block_config(), rngs)
        self.norm_out = LayerNorm(w, cfg, rngs)
        self.proj_out = _dense(w, cfg.output_dim, ("embed", None), cfg, rngs)
        self.clip_mean = Buffer(jnp.zeros((1, cfg.output_dim), cfg.params_dtype))
        self.clip_std = Buffer(jnp.ones((1, cfg.output_dim), cfg.params_dtype))
        if cfg.learned_null:
            self.null_text_embed = _param(nnx.initializers.normal(0.02), (cfg.cond_dim,),
                                          (None,), cfg, rngs)
            self.null_text_hidden = _param(nnx.initializers.normal(0.02),
                                           (cfg.context_length, cfg.token_width),
                                           (None, None), cfg, rngs)

    # -- embedding normalisation ---------------------------------------------------------------

    def set_embedding_stats(self, mean: Array, std: Array) -> None:
        """Store per-dimension z_i statistics (used by embed_norm='mean_std')."""
        d = self.config.output_dim
        mean, std = jnp.asarray(mean).reshape(-1), jnp.asarray(std).reshape(-1)
        if mean.shape != (d,) or std.shape != (d,):
            raise ValueError(f"mean and std must have {d} entries, got {mean.shape} and {std.shape}.")
        self.clip_mean[...] = mean[None].astype(self.clip_mean[...].dtype)
        self.clip_std[...] = std[None].astype(self.clip_std[...].dtype)

    def normalise(self, z: Array) -> Array:
        """A CLIP image embedding [B, D] -> the space the diffusion runs in (float32)."""
        cfg, z = self.config, jnp.asarray(z, jnp.float32)
        if cfg.embed_norm == "scale":
            return z * cfg.embed_scale
        if cfg.embed_norm == "mean_std":
            self._check_stats_fit()
            return (z - self.clip_mean[...]) / self.clip_std[...]
        norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
        return z / jnp.maximum(norm, 1e-12) * math.sqrt(cfg.embed_dim)

    def denormalise(self, x: Array) -> Array:
        """The inverse of :meth:`normalise` (for 'l2_sqrt_dim': unit-norm embeddings)."""
        cfg, x = self.config, jnp.asarray(x, jnp.float32)
        if cfg.embed_norm == "scale":
            return x / cfg.embed_scale
        if cfg.embed_norm == "mean_std":
            self._check_stats_fit()
            return x * self.clip_std[...] + self.clip_mean[...]
        return x / math.sqrt(cfg.embed_dim)

    def _check_stats_fit(self) -> None:
        cfg = self.config
        if cfg.output_dim != cfg.embed_dim:
            raise ValueError(f"This prior predicts {cfg.output_dim} values per row (out_dim, "
                             f"diffusers' clip_embed_dim) for embeddings of {cfg.embed_dim}; its "
                             "clip_mean / clip_std cannot normalise those embeddings, and it "
                             "cannot sample them.")

    # -- null conditioning ---------------------------------------------------------------------

    def null_conditioning(self, batch: int) -> TextConditioning:
        """The learned null text conditioning for ``batch`` rows (mask all true)."""
        if not self.config.learned_null:
            raise ValueError("This prior has no learned null conditioning (learned_null=False); "
                             "pass the unconditional text conditioning explicitly (e.g. the CLIP "
                             "encoding of the empty caption).")
        cfg = self.config
        return TextConditioning(
            jnp.broadcast_to(self.null_text_embed[...], (batch, cfg.cond_dim)),
            jnp.broadcast_to(self.null_text_hidden[...],
                             (batch, cfg.context_length, cfg.token_width)),
            jnp.ones((batch, cfg.context_length), bool))

    # -- forward -------------------------------------------------------------------------------

    def __call__(self, x_t: Array, t: Array, text_embed: Array, text_hidden: Array,
                 text_mask: Array | None = None, *, drop_text: Array | None = None,
                 deterministic: bool = True, dropout_rng: Array | None = None) -> Array:
        """Predict the clean normalised z_i.

        x_t [B, D] noised normalised embedding; t [B] int (or a scalar) training timesteps;
        text_embed [B, Dt] (z_t); text_hidden [B, L, W] encoded text tokens; text_mask [B, L]
        bool (True = a real token; None = all real). drop_text [B] bool replaces a row's text
        conditioning by the learned null (needs learned_null=True). Dropout runs only when
        ``deterministic`` is False, drawing from the explicit ``dropout_rng``.
        Returns [B, out_dim] (normally [B, D]) in float32: diffusers'
        ``predicted_image_embedding``.
        """
        cfg = self.config
        x_t = jnp.asarray(x_t)
        if x_t.ndim != 2 or x_t.shape[1] != cfg.embed_dim:
            raise ValueError(f"x_t must be [batch, {cfg.embed_dim}], got shape {x_t.shape}.")
        b = x_t.shape[0]
        text_embed, text_hidden = jnp.asarray(text_embed), jnp.asarray(text_hidden)
        if text_embed.shape != (b, cfg.cond_dim):
            raise ValueError(f"text_embed must be [{b}, {cfg.cond_dim}] (one z_t per x_t row), "
                             f"got shape {text_embed.shape}.")
        want = (b, cfg.context_length, cfg.token_width)
        if text_hidden.shape != want:
            raise ValueError(f"text_hidden must be {list(want)} [batch, context_length, width]; "
                             f"got shape {text_hidden.shape}. Pad or truncate the encoded text to "
                             f"context_length={cfg.context_length} tokens and mark padding in "
                             "text_mask.")
        if text_mask is None:
            text_mask = jnp.ones(want[:2], bool)
        text_mask = jnp.asarray(text_mask).astype(bool)
        if text_mask.shape != want[:2]:
            raise ValueError(f"text_mask must be [{b}, {cfg.context_length}] bool, got shape "
                             f"{text_mask.shape}.")
        if drop_text is not None:
            null = self.null_conditioning(b)
            text_embed, text_hidden, text_mask = drop_text_conditioning(
                TextConditioning(text_embed, text_hidden, text_mask), null, drop_text)
        t = jnp.broadcast_to(jnp.asarray(t), (b,))

        dt = cfg.compute_dtype
        time = self.time_embedding(t)
        if self.embedding_proj_norm is not None:
            text_embed = self.embedding_proj_norm(text_embed)
        cond = self.embedding_proj(text_embed.astype(dt))
        tokens = text_hidden.astype(dt)
        if self.encoder_hidden_states_proj is not None:
            tokens = self.encoder_hidden_states_proj(tokens)
        x = self.proj_in(x_t.astype(dt))
        parts = [tokens, cond[:, None], time[:, None].astype(dt), x[:, None]]
        if self.prd_embedding is not None:
            parts.append(jnp.broadcast_to(self.prd_embedding[...].astype(dt), (b, 1, cfg.width)))
        h = jnp.concatenate(parts, axis=1) + self.positional_embedding[...].astype(dt)

        n = cfg.seq_len
        keys = jnp.concatenate([text_mask, jnp.ones((b, n - cfg.context_length), bool)], axis=1)
        causal = jnp.tril(jnp.ones((n, n), bool))
        mask = causal[None, None] & keys[:, None, None, :]  # [B, 1, N, N]

        if self.norm_in is not None:
            h = self.norm_in(h)
        rngs = None
        if not deterministic and cfg.dropout > 0:
            if dropout_rng is None:
                raise ValueError("deterministic=False with dropout > 0 needs dropout_rng (a "
                                 "jax.random key).")
            rngs = jax.random.split(dropout_rng, cfg.num_layers)
        h = self.blocks(h, mask, rngs=rngs, last_outside=True)  # only h[:, -1] is read
        h = self.norm_out(h[:, -1])
        return self.proj_out(h).astype(jnp.float32)


def drop_text_conditioning(cond: TextConditioning, null: TextConditioning,
                           drop: Array) -> TextConditioning:
    """Rows where ``drop`` [B] is true take the null conditioning (broadcast from [1, ...] or
    unbatched arrays); the others keep theirs."""
    drop = jnp.asarray(drop).astype(bool)
    out = []
    for c, z in zip(cond, null):
        z = jnp.asarray(z)
        if z.ndim == c.ndim - 1:
            z = z[None]
        z = jnp.broadcast_to(z, c.shape).astype(c.dtype)
        out.append(jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)), z, c))
    return TextConditioning(*out)


def abstract_prior(config: PriorConfig) -> DiffusionPrior:
    """The prior with shape-only parameters (``nnx.eval_shape``): nothing is allocated."""
    return abstract_init(lambda: DiffusionPrior(config, rngs=nnx.Rngs(0)))


def count_params(config: PriorConfig) -> int:
    """Trainable parameters of a prior with this config, computed without allocating it."""
    return layers.count_params(abstract_prior(config))
