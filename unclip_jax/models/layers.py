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

from typing import Callable

from flax import nnx


def logical(init: Callable, *axes: str | None) -> Callable:
    """Wrap an initializer so that the parameter it creates carries logical axis names."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)
