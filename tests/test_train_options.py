"""The trainer's step options: gradient accumulation, rematerialisation and bfloat16 compute."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unclip_jax.data.synthetic_embeddings import make_prior_task, sample_prior_batch
from unclip_jax.models.diffusion_prior import DiffusionPrior, get_preset
from unclip_jax.train import diffusion_prior_stage as dps
from unclip_jax.train import step as step_lib


class Toy(nnx.Module):
    def __init__(self):
        self.linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))


def toy_loss(model, batch, rng):  # deterministic: a mean over rows
    err = model.linear(batch["x"]) - batch["y"]
    return jnp.mean(jnp.square(err)), {"err": jnp.mean(jnp.abs(err))}


def test_accumulated_gradients_equal_the_full_batch_step():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}
    graphdef, params, rest = step_lib.split_model(Toy())
    tx = optax.adamw(1e-2)
    state = step_lib.init_train_state(params, tx, ema=True)
    out = {}
    for accum in (1, 2, 4):
        step = jax.jit(step_lib.make_train_step(graphdef, rest, toy_loss, tx, 0.9, accum_steps=accum))
        new, metrics = step(state, batch, jax.random.key(0))
        out[accum] = (jax.tree.leaves(new.params), float(metrics["loss"]),
                      float(metrics["grad_norm"]))
    for accum in (2, 4):
        assert out[accum][1] == pytest.approx(out[1][1], rel=1e-5)
        assert out[accum][2] == pytest.approx(out[1][2], rel=1e-5)
        for a, b in zip(out[accum][0], out[1][0]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _prior_grads(**overrides):
    cfg = get_preset("tiny", learned_null=True, **overrides)
    model = DiffusionPrior(cfg, rngs=nnx.Rngs(0))
    task = make_prior_task(dim=32, text_width=32, context_length=8)
    batch = sample_prior_batch(task, np.random.default_rng(1), 16)
    batch.pop("concept")
    loss_fn = dps.make_loss_fn()
    graphdef, params, rest = step_lib.split_model(model)

    def objective(p):
        return loss_fn(nnx.merge(graphdef, p, rest), batch, jax.random.key(3))[0]

    loss, grads = jax.jit(jax.value_and_grad(objective))(params)
    return float(loss), grads, params


def test_remat_changes_nothing_but_memory():
    loss, grads, _ = _prior_grads()
    loss_r, grads_r, _ = _prior_grads(remat=True)
    assert loss_r == pytest.approx(loss, rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters_and_close_gradients():
    loss, grads, _ = _prior_grads()
    loss_b, grads_b, params_b = _prior_grads(dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_b))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads_b))
    assert loss_b == pytest.approx(loss, rel=0.05)
    flat, flat_b = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)])
                    for t in (grads, grads_b))
    cos = float(jnp.dot(flat, flat_b) / (jnp.linalg.norm(flat) * jnp.linalg.norm(flat_b)))
    assert cos > 0.98 and float(jnp.max(jnp.abs(flat_b - flat))) > 0  # close, and really bf16
