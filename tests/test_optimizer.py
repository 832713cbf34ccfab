"""The shared optimizer: Table 3's numbers, decay on kernels only, schedules, config reading."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from unclip_jax.models import layers
from unclip_jax.train.optimizer import (TABLE3, OptimizerConfig, decay_mask, from_config_dict,
                                        learning_rate_schedule, make_optimizer)


def test_table3():
    assert (TABLE3["ar_prior"].b2, TABLE3["ar_prior"].eps, TABLE3["ar_prior"].weight_decay) == (
        0.91, 1e-10, 4e-2)
    assert TABLE3["diffusion_prior"].learning_rate == 1.1e-4
    assert TABLE3["upsampler_1024"].learning_rate == 1.0e-4


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(3, 4, rngs=rngs)
        self.norm = layers.LayerNorm(4, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                                     rngs=rngs)
        self.table = nnx.Param(jnp.ones((5, 4)))


def test_weight_decay_touches_kernels_only():
    params = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
    mask = {jax.tree_util.keystr(p): bool(v) for p, v in
            jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert [k for k, v in mask.items() if v] == ["['proj']['kernel'].value"], mask
    tx = make_optimizer(OptimizerConfig(0.1, weight_decay=0.5))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["proj"]["kernel"][...], params["proj"]["kernel"][...] * 0.95,
                               rtol=1e-6)
    np.testing.assert_array_equal(new["table"][...], params["table"][...])


def test_schedules_and_clipping():
    warm = learning_rate_schedule(OptimizerConfig(1.0, warmup_steps=10))
    assert float(warm(5)) == pytest.approx(0.5) and float(warm(100)) == pytest.approx(1.0)
    cos = learning_rate_schedule(OptimizerConfig(1.0, lr_schedule="cosine", total_steps=100))
    assert float(cos(0)) == pytest.approx(1.0) and float(cos(100)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="total_steps"):
        OptimizerConfig(1.0, lr_schedule="cosine")
    with pytest.raises(ValueError, match="lr_schedule"):
        OptimizerConfig(1.0, lr_schedule="linear")
    tx = make_optimizer(OptimizerConfig(1.0, grad_clip_norm=1e-3))
    params = {"kernel": jnp.zeros((2, 2))}
    updates, _ = tx.update({"kernel": jnp.full((2, 2), 1e3)}, tx.init(params), params)
    assert np.isfinite(np.asarray(updates["kernel"])).all()


def test_from_config_dict():
    o = ml_collections.ConfigDict(dict(name="adamw", learning_rate=3e-4, b2=0.95,
                                       grad_clip_norm=0.0, lr_schedule="cosine", warmup_steps=5))
    cfg = from_config_dict(o, total_steps=50)
    assert (cfg.learning_rate, cfg.b2, cfg.total_steps, cfg.grad_clip_norm) == (3e-4, 0.95, 50, None)
