"""The one pre-LN Transformer block of the project, and a stack of them with stacked parameters.

Every Transformer here (CLIP's two towers, the decoder's GLIDE-style text encoder, the diffusion
prior, the AR prior) is ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``. :class:`Block` is that
block; ``BlockConfig.layout`` picks the parameter names, init scales, fused or separate q/k/v and
where MLP dropout sits, so that each model keeps the names of the checkpoints it loads:

  'clip'   ln_1, attn.{q_proj,k_proj,v_proj,out_proj}, ln_2, mlp.{fc1,fc2}     (Hugging Face CLIP)
  'prior'  norm1, attn.{to_q,to_k,to_v,to_out}, norm2, mlp.{fc1,fc2}           (diffusers prior)
  'ar'     ln_1, qkv (fused), out, ln_2, fc1, fc2                               (the AR prior)

:class:`Stack` holds ``depth`` blocks as ONE block whose parameters have a leading layer axis
(logical name 'layers', which no sharding rule maps), under the attribute :data:`STACK`: the prior's ``blocks.0.attn.to_q.kernel``
... ``blocks.19.attn.to_q.kernel`` are the rows of ``blocks.stack.attn.to_q.kernel`` [20, w, w].
With ``scan=True`` the layers run in one ``lax.scan`` (compile time independent of depth), else in
a Python loop over the rows (the same ops, unrolled); ``remat`` checkpoints each layer.

Per-layer names stay the interchange format (pipeline folders, torch checkpoints):
:func:`unstack_layer_names` / :func:`stack_layer_names` convert flat '.'-joined dicts, and
:func:`layer_paths` lists the per-layer paths of one stacked variable.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unclip_jax.models import layers

Array = jax.Array
STACK = "stack"              # the attribute of Stack that holds the stacked block
LAYER_AXIS = "layers"        # the logical name of the stacked layer axis (no mesh rule: replicated)
ACTIVATIONS = ("quick_gelu", "gelu")
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")

# Per layout: the path of each sub-layer, fused qkv or not, and where the MLP's dropout sits.
_NAMES = {
    "clip": dict(norm1=("ln_1",), q=("attn", "q_proj"), k=("attn", "k_proj"),
                 v=("attn", "v_proj"), out=("attn", "out_proj"), norm2=("ln_2",),
                 fc1=("mlp", "fc1"), fc2=("mlp", "fc2")),
    "prior": dict(norm1=("norm1",), q=("attn", "to_q"), k=("attn", "to_k"), v=("attn", "to_v"),
                  out=("attn", "to_out"), norm2=("norm2",), fc1=("mlp", "fc1"),
                  fc2=("mlp", "fc2")),
    "ar": dict(norm1=("ln_1",), qkv=("qkv",), out=("out",), norm2=("ln_2",), fc1=("fc1",),
               fc2=("fc2",)),
}
LAYOUTS = tuple(_NAMES)
_MLP_DROPOUT = {"clip": "hidden", "prior": "hidden", "ar": "output"}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Shape and numerics of a stack of blocks (see the module docstring for ``layout``)."""
    width: int
    heads: int
    mlp_dim: int
    depth: int                       # blocks in the stack; also scales the output-layer init
    layout: str = "clip"
    activation: str = "gelu"         # 'gelu' (exact erf) | 'quick_gelu'
    eps: float = 1e-5
    dropout: float = 0.0
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: bool = False              # rematerialise each block in the backward pass
    remat_policy: str = "nothing_saveable"   # a jax.checkpoint_policies name
    scan: bool = True                # lax.scan over the layers (False: a Python loop)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got "
                             f"{self.remat_policy!r}.")
        if self.heads <= 0 or self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a positive multiple of heads "
                             f"({self.heads}).")

    def init_stds(self) -> dict[str, float]:
        """The normal init std of each projection (the scales each model was written with)."""
        w, m, d = self.width, self.mlp_dim, 2 * self.depth
        if self.layout == "clip":
            return dict(qkv=w ** -0.5 * d ** -0.5, out=w ** -0.5, fc1=(2 * w) ** -0.5,
                        fc2=w ** -0.5 * d ** -0.5)
        if self.layout == "prior":
            return dict(qkv=w ** -0.5, out=w ** -0.5 * d ** -0.5, fc1=w ** -0.5,
                        fc2=m ** -0.5 * d ** -0.5)
        return dict(qkv=0.02, out=0.02 / math.sqrt(d), fc1=0.02, fc2=0.02 / math.sqrt(d))


class _Group(nnx.Module):
    """A named holder of sub-layers (``attn``, ``mlp``), so parameter paths match checkpoints."""


class Block(nnx.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x)); see :class:`BlockConfig`."""

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        w, std = cfg.width, cfg.init_stds()
        names = _NAMES[cfg.layout]

        def dense(n_in, n_out, axes, s):
            return layers.dense(n_in, n_out, axes, std=s, dtype=dt, param_dtype=pdt, rngs=rngs)

        def norm():
            return layers.LayerNorm(w, eps=cfg.eps, dtype=dt, param_dtype=pdt, rngs=rngs)

        # Creation order = the old modules' order, so seeded inits are unchanged.
        self._put(names["norm1"], norm())
        if "qkv" in names:
            self._put(names["qkv"], dense(w, 3 * w, ("embed", "heads"), std["qkv"]))
        else:
            for role in ("q", "k", "v"):
                self._put(names[role], dense(w, w, ("embed", "heads"), std["qkv"]))
        self._put(names["out"], dense(w, w, ("heads", "embed"), std["out"]))
        self._put(names["norm2"], norm())
        self._put(names["fc1"], dense(w, cfg.mlp_dim, ("embed", "mlp"), std["fc1"]))
        self._put(names["fc2"], dense(cfg.mlp_dim, w, ("mlp", "embed"), std["fc2"]))

    def _put(self, path: tuple, module: nnx.Module) -> None:
        owner = self
        for name in path[:-1]:
            if not hasattr(owner, name):
                setattr(owner, name, _Group())
            owner = getattr(owner, name)
        setattr(owner, path[-1], module)

    def _get(self, role: str) -> nnx.Module:
        owner = self
        for name in _NAMES[self.cfg.layout][role]:
            owner = getattr(owner, name)
        return owner

    def __call__(self, x: Array, mask: Array | None = None, *, causal: bool = False,
                 rng: Array | None = None, cache: tuple[Array, Array] | None = None,
                 pos: Array | int = 0) -> tuple[Array, tuple[Array, Array] | None]:
        """x [B, T, w]; mask [B, 1, T, S] bool or None. With a cache (k, v) [B, S, heads,
        head_dim], x sits at positions pos..pos+T-1 and the cache comes back updated.
        Returns (x, cache)."""
        cfg = self.cfg
        b, t, w = x.shape
        h = cfg.heads
        y = self._get("norm1")(x)
        if cfg.layout == "ar":
            q, k, v = jnp.split(self._get("qkv")(y).reshape(b, t, 3 * h, w // h), 3, axis=2)
        else:
            split = lambda z: z.reshape(b, t, h, w // h)  # noqa: E731
            q, k, v = (split(self._get(r)(y)) for r in ("q", "k", "v"))
        if cache is not None:
            ck, cv = cache
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, pos, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, pos, 0, 0))
            k, v, cache = ck, cv, (ck, cv)
        # Logits and softmax are float32 inside dot_product_attention for 16-bit inputs.
        y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
        r1 = r2 = None
        if rng is not None:
            r1, r2 = jax.random.split(rng)
        x = x + layers.dropout(self._get("out")(y.reshape(b, t, w)), cfg.dropout, r1)
        hid = self._get("fc1")(self._get("norm2")(x))
        if cfg.activation == "quick_gelu":
            hid = hid * jax.nn.sigmoid(1.702 * hid)
        else:
            hid = jax.nn.gelu(hid, approximate=False)
        if _MLP_DROPOUT[cfg.layout] == "hidden":
            out = self._get("fc2")(layers.dropout(hid, cfg.dropout, r2))
        else:
            out = layers.dropout(self._get("fc2")(hid), cfg.dropout, r2)
        return x + out, cache


def _stack_variables(states: list) -> Any:
    """One state whose arrays stack ``states``' along a new leading axis (logical 'layers')."""
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    for _, var in stacked.flat_state():
        names = var.get_metadata().get("out_sharding")
        if names is not None:
            var.set_metadata(out_sharding=(LAYER_AXIS, *names))
    return stacked


class Stack(nnx.Module):
    """``cfg.depth`` blocks with stacked parameters (attribute :data:`STACK`)."""

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        # Built one by one from the same key stream as a list of blocks would be, then stacked.
        blocks = [Block(cfg, rngs) for _ in range(cfg.depth)]
        graphdef, _ = nnx.split(blocks[0])
        setattr(self, STACK, nnx.merge(graphdef, _stack_variables(
            [nnx.state(b) for b in blocks])))

    def __call__(self, x: Array, mask: Array | None = None, *, causal: bool = False,
                 rngs: Array | None = None, cache: tuple[Array, Array] | None = None,
                 pos: Array | int = 0, last_outside: bool = False):
        """x [B, T, w] through every block. ``rngs``: per-layer dropout keys [depth, ...] or
        None. ``cache``: (k, v) each [depth, B, S, heads, head_dim] (see :meth:`init_cache`).
        ``last_outside`` runs the last block after the scan, not in it, so that XLA computes
        only the positions the caller reads from it (the diffusion prior reads one), as it
        does for an unrolled stack. Returns x, or (x, updated cache) when a cache is given."""
        cfg = self.cfg
        graphdef, params = nnx.split(getattr(self, STACK))

        def body(h, per_layer):
            p, r, c = per_layer
            return nnx.merge(graphdef, p)(h, mask, causal=causal, rng=r, cache=c, pos=pos)

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=not cfg.scan,
                                  policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
        xs = (params, rngs, cache)
        if cfg.scan and last_outside and cfg.depth > 1 and cache is None:
            x, _ = jax.lax.scan(body, x, jax.tree.map(lambda a: a[:-1], xs))
            x, new_cache = body(x, jax.tree.map(lambda a: a[-1], xs))
        elif cfg.scan:
            x, new_cache = jax.lax.scan(body, x, xs)
        else:
            outs = []
            for i in range(cfg.depth):
                x, c = body(x, jax.tree.map(lambda a: a[i], xs))
                outs.append(c)
            new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x if cache is None else (x, new_cache)

    def init_cache(self, batch: int, length: int) -> tuple[Array, Array]:
        """Zero keys and values (k, v), each [depth, batch, length, heads, head_dim]."""
        cfg = self.cfg
        shape = (cfg.depth, batch, length, cfg.heads, cfg.width // cfg.heads)
        z = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return z, z


# --------------------------------------------------------------------------------------------
# Per-layer names <-> stacked variables
# --------------------------------------------------------------------------------------------

def layer_paths(path: tuple, depth: int) -> list[tuple]:
    """The per-layer paths of a variable: ``(..., STACK, ...)`` -> ``(..., i, ...)`` for each
    layer; a path without :data:`STACK` is its own only path."""
    if STACK not in path:
        return [path]
    j = path.index(STACK)
    return [(*path[:j], i, *path[j + 1:]) for i in range(depth)]


def _rows(key: str | tuple, depth: int) -> list:
    """:func:`layer_paths` for a '.'-joined name or a path tuple (the key type is kept)."""
    if isinstance(key, tuple):
        return layer_paths(key, depth)
    return [".".join(str(p) for p in q) for q in layer_paths(tuple(key.split(".")), depth)]


def is_stacked(key: str | tuple) -> bool:
    return STACK in (key.split(".") if isinstance(key, str) else key)


def unstack_layer_names(flat: dict[Any, Any]) -> dict[Any, Any]:
    """Name -> array, with every stacked array split into its per-layer names
    (``blocks.stack.x`` [L, ...] -> ``blocks.0.x`` ... ``blocks.{L-1}.x``). Names are
    '.'-joined strings or path tuples."""
    out = {}
    for name, a in flat.items():
        if not is_stacked(name):
            out[name] = a
            continue
        for i, n in enumerate(_rows(name, a.shape[0])):
            out[n] = a[i]
    return out


def unstack_layer_shapes(shapes: dict[Any, tuple]) -> dict[Any, tuple]:
    """:func:`unstack_layer_names` for shapes: name -> shape."""
    out = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        if is_stacked(name):
            out.update({n: shape[1:] for n in _rows(name, shape[0])})
        else:
            out[name] = shape
    return out


def stack_layer_names(flat: dict[str, Any], expected_shapes: dict[str, tuple]) -> dict[str, Any]:
    """The inverse of :func:`unstack_layer_names`: for each stacked name of ``expected_shapes``
    whose per-layer arrays are all in ``flat``, those arrays stacked under the stacked name.
    Other entries pass through unchanged (so a caller still sees what is missing or extra)."""
    out = dict(flat)
    for name, shape in expected_shapes.items():
        if not is_stacked(name):
            continue
        per_layer = _rows(name, tuple(shape)[0])
        if all(n in out for n in per_layer):
            out[name] = np.stack([np.asarray(out.pop(n)) for n in per_layer])
    return out


# --------------------------------------------------------------------------------------------
# The causal text Transformer (CLIP's text tower, the decoder's GLIDE-style text encoder)
# --------------------------------------------------------------------------------------------

class Encoder(nnx.Module):
    """A :class:`Stack` under ``layers`` (CLIP's ``encoder.layers.N`` names)."""

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs):
        self.layers = Stack(cfg, rngs)

    def __call__(self, x: Array, mask: Array | None = None, causal: bool = False,
                 last_outside: bool = False) -> Array:
        return self.layers(x, mask, causal=causal, last_outside=last_outside)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Shape and numerics of a causal text Transformer (CLIPConfig.text_config() gives CLIP's)."""
    vocab_size: int
    context_length: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    eos_token_id: int                # 2 selects Hugging Face's legacy argmax(token_ids) pooling
    activation: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: bool = False
    scan: bool = True

    def block_config(self) -> BlockConfig:
        return BlockConfig(width=self.width, heads=self.heads, mlp_dim=self.mlp_dim,
                           depth=self.layers, layout="clip", activation=self.activation,
                           eps=self.eps, dtype=self.dtype, param_dtype=self.param_dtype,
                           remat=self.remat, scan=self.scan)


class TextTransformer(nnx.Module):
    """Token ids [B, L] -> (pooled state [B, W] at the end-of-text token, hidden [B, L, W]).

    A learned position table on the token embeddings, the blocks under a causal mask, a final
    LayerNorm; the pooled state is the hidden state at the (first) end-of-text token.
    """

    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        w, pdt = cfg.width, jnp.dtype(cfg.param_dtype)
        self.token_embedding = layers.param(nnx.initializers.normal(0.02), (cfg.vocab_size, w),
                                            ("vocab", "embed"), pdt, rngs)
        self.position_embedding = layers.param(nnx.initializers.normal(0.01),
                                               (cfg.context_length, w), (None, "embed"), pdt,
                                               rngs)
        self.encoder = Encoder(cfg.block_config(), rngs)
        self.final_ln = layers.LayerNorm(w, eps=cfg.eps, dtype=jnp.dtype(cfg.dtype),
                                         param_dtype=pdt, rngs=rngs)

    def __call__(self, token_ids: Array, attention_mask: Array | None = None
                 ) -> tuple[Array, Array]:
        cfg = self.cfg
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be [batch, length], got shape {token_ids.shape}.")
        b, length = token_ids.shape
        if length > cfg.context_length:
            raise ValueError(f"token_ids has {length} positions but the model's context_length is "
                             f"{cfg.context_length}; tokenize with a context length of at most "
                             f"{cfg.context_length}.")
        token_ids = token_ids.astype(jnp.int32)
        x = jnp.take(self.token_embedding[...], token_ids, axis=0)
        x = (x + self.position_embedding[...][:length]).astype(jnp.dtype(cfg.dtype))

        mask = None
        if attention_mask is not None:  # [B, L], 1 = real token; masks keys only
            keep = jnp.asarray(attention_mask).astype(bool)
            mask = jnp.broadcast_to(keep[:, None, None, :], (b, 1, length, length))
        x = self.encoder(x, mask, causal=True)
        hidden = self.final_ln(x)

        if cfg.eos_token_id == 2:
            # Hugging Face's legacy rule for configs with the old eos_token_id: the end-of-text
            # token has the highest id in the CLIP vocabulary.
            eos_pos = jnp.argmax(token_ids, axis=-1)
        else:
            # The first end-of-text token (padding may repeat it). A row without one pools at 0.
            eos_pos = jnp.argmax(token_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(hidden, eos_pos[:, None, None], axis=1)[:, 0]
        return pooled, hidden
