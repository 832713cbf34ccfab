"""The autoregressive prior of unCLIP (Ramesh et al. 2022, section 2.1) as a Flax NNX module.

A caption becomes a CLIP image embedding z_i as a sequence of discrete tokens: z_i is rotated
into its principal components, the leading ``num_components`` kept, ordered by decreasing
eigenvalue and each quantised into ``num_buckets`` buckets (:mod:`unclip_jax.models.pca_quantizer`,
whose fitted state lives inside this module as non-trainable buffers). A decoder-only causal
Transformer reads the sequence

    [ caption (L positions) | z_t | dot | z_i token 0 | ... | z_i token K-1 ]

* caption: the CLIP text encoder's last hidden states ``text_hidden`` [B, L, W], projected to the
  model width; padding (``text_mask`` false) is hidden from every query (a position always sees
  itself, so no attention row is empty);
* z_t: the CLIP text embedding [B, D], projected;
* dot: a token for the quantised z_i . z_t (equiprobable buckets of its training distribution).
  It lets sampling ask for a *high* text/image agreement: the paper samples it from the top half
  of the distribution (percentiles 50, 70, 85, 95 compared; 50 best);
* z_i tokens, embedded with one shared table plus learned positions.

The output at the dot position predicts z_i token 0, the output at z_i token j predicts token
j + 1; training is cross-entropy on the K z_i tokens (``train.ar_prior_stage``). For classifier-
free guidance the text conditioning (caption and z_t) is replaced by learned null embeddings
for a fraction of the rows (``drop_text``); the dot token is kept.

Sampling (:func:`sample`) runs inside ``lax.scan``: with ``use_cache=True`` the prefix is run once
and each new token costs one position against a key/value cache; ``use_cache=False`` reruns the
whole sequence for every token (the reference the cache is tested against). Guidance combines
the log-probabilities of the conditional and unconditional rows (``lu + s (lc - lu)``), then
temperature and nucleus (top-p) filtering apply. ``best_of > 1`` draws several z_i per
caption and keeps the one with the largest dot product with z_t.

Sequence length: with the paper's 319 components a 63-token caption prefix gives exactly the
384-position context of Table 3 (63 + 1 + 1 + 319); the paper's separate 256-token text encoder
is replaced here by CLIP's hidden states, as the issue specifies.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unclip_jax.models import layers, transformer
from unclip_jax.models.layers import abstract_init
from unclip_jax.models.pca_quantizer import PCAQuantizer
from unclip_jax.models.presets import dtype_problems, from_preset
from unclip_jax.models.prior_sampling import rank_candidates

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ARPriorConfig:
    """Shape and numerics of an AR prior. Defaults: the paper's latent decoder (Table 3)."""
    embed_dim: int = 1024         # CLIP embedding width D (z_i, z_t)
    text_width: int = 1024        # width W of the text hidden states
    text_context: int = 63        # caption positions L
    num_components: int = 319     # K principal components kept
    num_buckets: int = 1024       # buckets per component
    num_dot_buckets: int = 1024   # buckets of z_i . z_t
    width: int = 1664
    depth: int = 24
    heads: int = 26
    mlp_ratio: int = 4
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: bool = False
    scan_layers: bool = True      # run the blocks in one lax.scan (False: a Python loop)

    def __post_init__(self):
        problems = []
        if self.heads <= 0 or self.width % self.heads:
            problems.append(f"width ({self.width}) must be a positive multiple of heads "
                            f"({self.heads})")
        if not 0 < self.num_components <= self.embed_dim:
            problems.append(f"num_components ({self.num_components}) must be in "
                            f"1..embed_dim ({self.embed_dim})")
        if self.text_context < 1:
            problems.append(f"text_context must be at least 1, got {self.text_context}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        problems += dtype_problems(self)
        if problems:
            raise ValueError("Invalid ARPriorConfig: " + "; ".join(problems) + ".")

    @property
    def prefix_len(self) -> int:
        """Caption positions, z_t and the dot token."""
        return self.text_context + 2

    @property
    def seq_len(self) -> int:
        """The whole sequence: prefix and all K z_i tokens (the model reads all but the last)."""
        return self.prefix_len + self.num_components

    def block_config(self) -> transformer.BlockConfig:
        return transformer.BlockConfig(
            width=self.width, heads=self.heads, mlp_dim=self.mlp_ratio * self.width,
            depth=self.depth, layout="ar", activation="gelu", eps=self.layer_norm_eps,
            dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
            remat=self.remat, scan=self.scan_layers)


PRESETS: dict[str, dict[str, Any]] = {
    # Table 3's latent decoder (384 positions, 1664 wide, 24 deep, 26 heads of 64) over a
    # 1024-dim CLIP with 319 of 1024 components kept; ~807M parameters.
    "paper": dict(embed_dim=1024, text_width=1024, text_context=63, num_components=319,
                  num_buckets=1024, num_dot_buckets=1024, width=1664, depth=24, heads=26),
    # For tests and `runlocal`: the synthetic embedding task (unclip_jax.data.synthetic_embeddings
    # defaults: 32-dim embeddings, 32-wide text states, 8 caption tokens). Trains in seconds.
    "tiny": dict(embed_dim=32, text_width=32, text_context=8, num_components=16,
                 num_buckets=32, num_dot_buckets=16, width=64, depth=2, heads=2),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> ARPriorConfig:
    """The :class:`ARPriorConfig` of a named preset with some fields replaced."""
    return from_preset(ARPriorConfig, PRESETS, name, **overrides)


def _dense(n_in: int, n_out: int, axes: tuple, std: float, cfg: ARPriorConfig,
           rngs: nnx.Rngs) -> nnx.Linear:
    return layers.dense(n_in, n_out, axes, std=std, dtype=jnp.dtype(cfg.dtype),
                        param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def _param(init, shape: tuple, axes: tuple, cfg: ARPriorConfig, rngs: nnx.Rngs) -> nnx.Param:
    return layers.param(init, shape, axes, jnp.dtype(cfg.param_dtype), rngs)


def LayerNorm(width: int, cfg: ARPriorConfig, rngs: nnx.Rngs) -> layers.LayerNorm:
    return layers.LayerNorm(width, eps=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                            param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def _attention_mask(key_valid: Array, q_start: Array | int, q_len: int) -> Array:
    """[B, 1, q_len, S]: causal, padding keys hidden, a query always sees itself."""
    s = key_valid.shape[1]
    qi = q_start + jnp.arange(q_len)[:, None]
    ki = jnp.arange(s)[None, :]
    m = (ki <= qi)[None] & (key_valid[:, None, :] | (ki == qi)[None])
    return m[:, None]


class ARPrior(nnx.Module):
    """The AR prior: ``model(tokens, dot_tokens, text_embed, text_hidden, text_mask)`` gives the
    logits [B, K, num_buckets] of every z_i token (teacher forcing); see the module docstring."""

    def __init__(self, config: ARPriorConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        w = cfg.width
        self.quantizer = PCAQuantizer(cfg.embed_dim, cfg.num_components, cfg.num_buckets,
                                      cfg.num_dot_buckets)
        self.text_proj = _dense(cfg.text_width, w, (None, "embed"), cfg.text_width ** -0.5,
                                cfg, rngs)
        self.text_embed_proj = _dense(cfg.embed_dim, w, (None, "embed"), cfg.embed_dim ** -0.5,
                                      cfg, rngs)
        self.null_text = _param(nnx.initializers.normal(0.02), (cfg.text_context, w), (None, "embed"), cfg, rngs)
        self.null_text_embed = _param(nnx.initializers.normal(0.02), (w,), ("embed",), cfg, rngs)
        self.dot_embedding = _param(nnx.initializers.normal(0.02), (cfg.num_dot_buckets, w), ("vocab", "embed"),
                                    cfg, rngs)
        self.token_embedding = _param(nnx.initializers.normal(0.02), (cfg.num_buckets, w), ("vocab", "embed"),
                                      cfg, rngs)
        self.position_embedding = _param(nnx.initializers.normal(0.01), (cfg.seq_len, w), (None, "embed"),
                                         cfg, rngs)
        self.blocks = transformer.Stack(cfg.block_config(), rngs)
        self.final_ln = LayerNorm(w, cfg, rngs)
        self.head = _dense(w, cfg.num_buckets, ("embed", "vocab"), 0.02, cfg, rngs)

    # -- pieces -------------------------------------------------------------------------------

    def _check_inputs(self, text_embed, text_hidden, text_mask):
        cfg = self.config
        b = text_embed.shape[0]
        if text_embed.shape != (b, cfg.embed_dim):
            raise ValueError(f"text_embed must be [batch, {cfg.embed_dim}], got "
                             f"{text_embed.shape}.")
        if (text_hidden.ndim != 3 or text_hidden.shape[0] != b
                or text_hidden.shape[2] != cfg.text_width
                or text_hidden.shape[1] > cfg.text_context):
            raise ValueError(f"text_hidden must be [batch={b}, length<={cfg.text_context}, "
                             f"{cfg.text_width}], got {text_hidden.shape}; tokenize with a "
                             f"context of at most text_context={cfg.text_context}.")
        if text_mask.shape != text_hidden.shape[:2]:
            raise ValueError(f"text_mask must be [batch, length] = {text_hidden.shape[:2]}, got "
                             f"{text_mask.shape}.")

    def embed_prefix(self, text_embed: Array, text_hidden: Array, text_mask: Array,
                     dot_tokens: Array, drop_text: Array | None = None) -> tuple[Array, Array]:
        """(prefix [B, L+2, width], key_valid [B, L+2]) for captions, z_t and dot tokens."""
        cfg = self.config
        self._check_inputs(text_embed, text_hidden, text_mask)
        dt = jnp.dtype(cfg.dtype)
        pad = cfg.text_context - text_hidden.shape[1]
        text_hidden = jnp.pad(jnp.asarray(text_hidden), ((0, 0), (0, pad), (0, 0)))
        text_mask = jnp.pad(jnp.asarray(text_mask, bool), ((0, 0), (0, pad)))
        h = self.text_proj(text_hidden.astype(dt))
        te = self.text_embed_proj(jnp.asarray(text_embed).astype(dt))
        if drop_text is not None:
            drop = jnp.asarray(drop_text, bool)
            h = jnp.where(drop[:, None, None], self.null_text[...].astype(dt)[None], h)
            te = jnp.where(drop[:, None], self.null_text_embed[...].astype(dt)[None], te)
            text_mask = text_mask | drop[:, None]
        d = jnp.take(self.dot_embedding[...], jnp.asarray(dot_tokens, jnp.int32), axis=0)
        x = jnp.concatenate([h, te[:, None], d[:, None].astype(dt)], axis=1)
        x = (x + self.position_embedding[...][:cfg.prefix_len]).astype(dt)
        valid = jnp.concatenate([text_mask, jnp.ones((x.shape[0], 2), bool)], axis=1)
        return x, valid

    def embed_tokens(self, tokens: Array, start: Array | int = 0) -> Array:
        """z_i tokens [B, T] that sit at z_i positions start..start+T-1 -> [B, T, width]."""
        cfg = self.config
        e = jnp.take(self.token_embedding[...], jnp.asarray(tokens, jnp.int32), axis=0)
        pos = jax.lax.dynamic_slice_in_dim(self.position_embedding[...],
                                           cfg.prefix_len + start, tokens.shape[1])
        return (e + pos).astype(jnp.dtype(self.config.dtype))

    def logits(self, x: Array) -> Array:
        return self.head(self.final_ln(x)).astype(jnp.float32)

    # -- full-sequence forward (training, and the no-cache sampler) -----------------------------

    def __call__(self, tokens: Array, dot_tokens: Array, text_embed: Array, text_hidden: Array,
                 text_mask: Array, drop_text: Array | None = None, *,
                 deterministic: bool = True, rng: Array | None = None) -> Array:
        """tokens [B, K] int -> logits [B, K, num_buckets] float32 (token j from what precedes it).

        ``drop_text`` [B] bool swaps in the null caption; ``rng`` drives dropout when
        ``deterministic`` is false and ``config.dropout`` > 0.
        """
        cfg = self.config
        if tokens.ndim != 2 or tokens.shape[1] != cfg.num_components:
            raise ValueError(f"tokens must be [batch, {cfg.num_components}], got "
                             f"{tokens.shape}; encode z_i with model.quantizer.encode.")
        if not deterministic and cfg.dropout > 0 and rng is None:
            raise ValueError("Dropout is on (deterministic=False, dropout > 0): pass rng.")
        prefix, valid = self.embed_prefix(text_embed, text_hidden, text_mask, dot_tokens,
                                          drop_text)
        x = jnp.concatenate([prefix, self.embed_tokens(tokens[:, :-1])], axis=1)
        valid = jnp.concatenate([valid, jnp.ones(tokens[:, :-1].shape, bool)], axis=1)
        x = self._blocks(x, valid, None if deterministic else rng)
        return self.logits(x[:, cfg.prefix_len - 1:])

    def _blocks(self, x: Array, valid: Array, rng: Array | None) -> Array:
        mask = _attention_mask(valid, 0, x.shape[1])
        rngs = None
        if rng is not None:
            rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(self.config.depth))
        return self.blocks(x, mask, rngs=rngs)

    # -- cached forward (sampling) --------------------------------------------------------------

    def init_cache(self, batch: int) -> tuple[Array, Array]:
        """Zero keys and values, each [depth, batch, seq_len, heads, head_dim]."""
        return self.blocks.init_cache(batch, self.config.seq_len)

    def step(self, x: Array, pos: Array | int, key_valid: Array, cache: tuple[Array, Array]
             ) -> tuple[Array, tuple[Array, Array]]:
        """Run x [B, T, width] at positions pos..pos+T-1 against the cache -> (logits of the last
        position [B, num_buckets], updated cache). ``key_valid`` [B, seq_len]."""
        mask = _attention_mask(key_valid, pos, x.shape[1])
        x, cache = self.blocks(x, mask, cache=cache, pos=pos)
        return self.logits(x[:, -1]), cache


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

def filter_logits(logits: Array, temperature: float = 1.0, top_p: float = 1.0) -> Array:
    """Temperature, then nucleus filtering: tokens outside the smallest set whose probability
    reaches ``top_p`` get -inf (the most likely token is always kept)."""
    logits = logits / temperature
    if top_p >= 1.0:
        return logits
    srt = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(srt, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def _choose(logits: Array, rng: Array, guidance_scale: float, batch: int, temperature: float,
            top_p: float) -> Array:
    """Guided logits of the doubled batch -> sampled tokens [batch]."""
    if guidance_scale != 1.0:
        lc = jax.nn.log_softmax(logits[:batch], axis=-1)
        lu = jax.nn.log_softmax(logits[batch:], axis=-1)
        logits = lu + guidance_scale * (lc - lu)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, temperature, top_p)).astype(jnp.int32)


def sample_tokens(model: ARPrior, text_embed: Array, text_hidden: Array, text_mask: Array,
                  rng: Array, *, guidance_scale: float = 1.0, temperature: float = 1.0,
                  top_p: float = 1.0, dot_percentile: float | None = 50.0,
                  use_cache: bool = True) -> tuple[Array, Array]:
    """Sample z_i tokens for each caption -> (tokens [B, K] int32, dot_tokens [B] int32).

    ``dot_percentile`` fixes the dot token at that percentile of the training z_i . z_t
    distribution; ``None`` draws it uniformly from the top half (both as in the paper).
    ``guidance_scale`` 1 is the conditional model alone, 0 the unconditional one.
    """
    cfg = model.config
    b = text_embed.shape[0]
    n_dot = cfg.num_dot_buckets
    rng_dot, rng = jax.random.split(rng)
    if dot_percentile is None:
        dot = jax.random.randint(rng_dot, (b,), n_dot // 2, n_dot, jnp.int32)
    else:
        dot = jnp.full((b,), model.quantizer.percentile_dot_token(dot_percentile), jnp.int32)

    guided = guidance_scale != 1.0
    if guided:  # rows [:b] conditional, [b:] with the null caption
        rows = lambda a: jnp.concatenate([a, a], axis=0)
        args = (rows(text_embed), rows(text_hidden), rows(text_mask), rows(dot),
                jnp.arange(2 * b) >= b)
    else:
        args = (text_embed, text_hidden, text_mask, dot, None)
    rows_n = args[0].shape[0]
    k = cfg.num_components
    choose = lambda logits, j: _choose(logits, jax.random.fold_in(rng, j), guidance_scale, b,
                                       temperature, top_p)
    both = (lambda t: jnp.concatenate([t, t], axis=0)) if guided else (lambda t: t)

    if use_cache:
        prefix, valid = model.embed_prefix(args[0], args[1], args[2], args[3], args[4])
        valid = jnp.concatenate([valid, jnp.ones((rows_n, k), bool)], axis=1)
        logits, cache = model.step(prefix, 0, valid, model.init_cache(rows_n))

        def body(carry, j):
            logits, cache, tokens = carry
            tok = choose(logits, j)
            tokens = tokens.at[:, j].set(tok)
            x = model.embed_tokens(both(tok)[:, None], j)
            logits, cache = model.step(x, cfg.prefix_len + j, valid, cache)
            return (logits, cache, tokens), None

        init = (logits, cache, jnp.zeros((b, k), jnp.int32))
        (_, _, tokens), _ = jax.lax.scan(body, init, jnp.arange(k))
    else:
        def body(tokens, j):
            te, th, tm, dt, drop = args
            logits = model(both(tokens), dt, te, th, tm, drop)[:, j]
            return tokens.at[:, j].set(choose(logits, j)), None

        tokens, _ = jax.lax.scan(body, jnp.zeros((b, k), jnp.int32), jnp.arange(k))
    return tokens, dot


def sample(model: ARPrior, text_embed: Array, text_hidden: Array, text_mask: Array,
           rng: Array, *, best_of: int = 1, guidance_scale: float = 1.0,
           temperature: float = 1.0, top_p: float = 1.0, dot_percentile: float | None = 50.0,
           use_cache: bool = True) -> dict[str, Array]:
    """Sample z_i for each caption; with ``best_of`` > 1, keep the candidate whose z_i has the
    largest dot product with z_t. Returns ``image_embed`` [B, D] (decoded, float32),
    ``tokens`` [B, K], ``dot_tokens`` [B] and ``candidate_dots`` [B, best_of]."""
    if best_of < 1:
        raise ValueError(f"best_of must be at least 1, got {best_of}.")
    b = text_embed.shape[0]
    c = best_of
    rep = lambda a: jnp.repeat(jnp.asarray(a), c, axis=0)  # rows b*c + i: caption b, candidate i
    tokens, dot = sample_tokens(model, rep(text_embed), rep(text_hidden), rep(text_mask), rng,
                                guidance_scale=guidance_scale, temperature=temperature,
                                top_p=top_p, dot_percentile=dot_percentile, use_cache=use_cache)
    z = model.quantizer.decode(tokens).reshape(b, c, -1)
    best, dots = rank_candidates(z, text_embed)
    pick = lambda a: jnp.take_along_axis(a.reshape(b, c, *a.shape[1:]),
                                         best.reshape(b, 1, *([1] * (a.ndim - 1))), axis=1)[:, 0]
    return {"image_embed": pick(z.reshape(b * c, -1)), "tokens": pick(tokens),
            "dot_tokens": pick(dot), "candidate_dots": dots}


def abstract_model(config: ARPriorConfig) -> ARPrior:
    """The model with shape-only state (``nnx.eval_shape``): nothing is allocated."""
    return abstract_init(lambda: ARPrior(config, rngs=nnx.Rngs(0)))


def count_params(config: ARPriorConfig) -> int:
    """Trainable parameters of a model with this config (the quantizer buffers excluded)."""
    return layers.count_params(abstract_model(config))
