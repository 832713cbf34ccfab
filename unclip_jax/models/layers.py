"""Shared helpers for Flax NNX modules.

Parameters carry *logical* axis names (never mesh axes); the trainer maps them to
mesh axes with the rules in its config. The vocabulary used across the project:

  'embed'   the residual-stream width of a Transformer / channel width of a dense layer input
  'mlp'     the hidden width of a feed-forward block
  'heads'   the concatenated attention-head width (num_heads * head_dim)
  'vocab'   a token-embedding table's rows
  'conv_in', 'conv_out'  input / output channels of a convolution kernel
  None      replicated (biases, norms, positional tables' position axis)

Annotations are metadata only (``eager_sharding=False``): a model can be built
anywhere, with or without a mesh, and ``nnx.get_partition_spec`` reads them back.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

T = TypeVar("T")


def logical(init: Callable, *axes: str | None) -> Callable:
    """Wrap an initializer so that the parameter it creates carries logical axis names."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


@contextlib.contextmanager
def plain_tracer_errors():
    """Skip the provenance search JAX runs to word a tracer's AttributeError.

    Flax's ``Variable.set_value`` probes ``getattr(value, 'sharding', None)`` on every RNG-counter
    update; on a tracer that raises an AttributeError whose message JAX builds by walking the
    whole trace, which makes ``nnx.eval_shape`` quadratic in the number of parameters (ViT-L/14:
    11 s instead of 0.7 s; a 3.5B-class UNet: minutes). The message is discarded by ``getattr``
    anyway. Falls back to doing nothing if JAX's internals move. Use it around any traced model
    construction (``abstract_init`` does; so should a jitted, sharded initialisation).
    """
    try:
        from jax._src.interpreters import partial_eval as pe
        tracer = pe.DynamicJaxprTracer
        original = tracer._origin_msg
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without this internal
        yield
        return
    tracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        tracer._origin_msg = original


def abstract_init(build: Callable[[], T]) -> T:
    """``nnx.eval_shape(build)``: the module with shape-only parameters, nothing allocated,
    without flax's quadratic tracing cost (see ``plain_tracer_errors``)."""
    with plain_tracer_errors():
        return nnx.eval_shape(build)


def count_params(module: nnx.Module) -> int:
    """Number of parameter elements of a module (concrete or abstract)."""
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def param(init: Callable, shape: tuple, axes: tuple, param_dtype, rngs: nnx.Rngs) -> nnx.Param:
    """A parameter drawn from ``init`` with logical ``axes``."""
    return nnx.Param(logical(init, *axes)(rngs.params(), shape, param_dtype))


def dense(n_in: int, n_out: int, axes: tuple, *, std: float, dtype, param_dtype,
          rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
    """A Linear layer: normal(std) kernel with logical ``axes``, zero (replicated) bias."""
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=logical(nnx.initializers.normal(stddev=std), *axes),
                      bias_init=logical(nnx.initializers.zeros_init(), None), rngs=rngs)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with float32 statistics; returns ``dtype``.

    Parameters ``scale`` and ``bias`` (torch's ``weight`` and ``bias``), replicated.
    """

    def __init__(self, width: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = param(nnx.initializers.ones_init(), (width,), (None,), param_dtype, rngs)
        self.bias = param(nnx.initializers.zeros_init(), (width,), (None,), param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout driven by an explicit key; the identity when ``rng`` is None."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
