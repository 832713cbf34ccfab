"""Shared model helpers: abstract construction, parameter counting, LayerNorm, dropout."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src.interpreters import partial_eval as pe

from unclip_jax.clip.model import CLIP, get_preset
from unclip_jax.models import layers


def test_abstract_init_matches_the_concrete_model_and_restores_jax():
    original = pe.DynamicJaxprTracer._origin_msg
    cfg = get_preset("tiny")
    abstract = layers.abstract_init(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    assert pe.DynamicJaxprTracer._origin_msg is original
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert layers.count_params(abstract) == layers.count_params(CLIP(cfg, rngs=nnx.Rngs(0)))
    spec = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
    assert tuple(spec["text_projection"]["kernel"].get_value()) == ("embed", None)


def test_layer_norm_float32_statistics_and_dtype():
    ln = layers.LayerNorm(8, eps=1e-5, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                          rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 8)) * 100 + 1000
    y = ln(x)
    assert y.dtype == jnp.bfloat16 and ln.scale[...].dtype == jnp.float32
    ref = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.05)


def test_dropout_needs_a_key_and_keeps_the_mean():
    x = jnp.ones((1000,))
    assert layers.dropout(x, 0.5, None) is x
    y = layers.dropout(x, 0.5, jax.random.key(0))
    assert set(np.unique(np.asarray(y))) == {0.0, 2.0}
    assert abs(float(y.mean()) - 1.0) < 0.1
