"""The shared update step: gradients flow, EMA follows, the rng is folded with the step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unclip_jax.train.step import init_train_state, make_train_step, split_model


def test_regression_learns_and_ema_follows():
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    graphdef, params, rest = split_model(model)
    w_true = jnp.array([[1.0], [-2.0], [0.5]])

    def loss_fn(m, batch, rng):
        noise = 0.0 * jax.random.normal(rng, ())
        loss = jnp.mean((m(batch["x"]) - batch["y"]) ** 2) + noise
        return loss, {"mse": loss}

    tx = optax.adam(0.05)
    step = jax.jit(make_train_step(graphdef, rest, loss_fn, tx, ema_decay=0.9))
    state = init_train_state(params, tx, ema=True)
    x = jax.random.normal(jax.random.key(1), (64, 3))
    batch = {"x": x, "y": x @ w_true}
    first = None
    for _ in range(300):
        state, metrics = step(state, batch, jax.random.key(0))
        first = first if first is not None else float(metrics["loss"])
    assert int(state.step) == 300
    assert float(metrics["loss"]) < 1e-3 * first
    assert {"loss", "mse", "grad_norm", "param_norm"} <= set(metrics)
    learned = nnx.merge(graphdef, state.params, rest).kernel[...]
    np.testing.assert_allclose(learned, w_true, atol=1e-2)
    ema = nnx.merge(graphdef, state.ema, rest).kernel[...]
    np.testing.assert_allclose(ema, w_true, atol=5e-2)


def test_rng_is_folded_with_the_step():
    model = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    graphdef, params, rest = split_model(model)
    seen = []

    def loss_fn(m, batch, rng):
        return jnp.sum(m.kernel[...]) * 0.0, {"draw": jax.random.normal(rng, ())}

    tx = optax.sgd(0.1)
    step = jax.jit(make_train_step(graphdef, rest, loss_fn, tx))
    state = init_train_state(params, tx)
    for _ in range(3):
        state, metrics = step(state, None, jax.random.key(7))
        seen.append(float(metrics["draw"]))
    assert len(set(seen)) == 3
    assert state.ema is None


def test_build_train_step_returns_what_every_stage_returns():
    from unclip_jax.train.step import build_train_step
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    tx = optax.sgd(0.1)
    step, state, graphdef, rest = build_train_step(
        model, lambda m, b, r: (jnp.sum(m(b) ** 2), {}), tx, ema_decay=0.5)
    state, _ = jax.jit(step)(state, jnp.ones((3, 2)), jax.random.key(0))
    assert int(state.step) == 1 and state.ema is not None
    assert nnx.merge(graphdef, state.params, rest).kernel.shape == (2, 1)
