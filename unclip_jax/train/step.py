"""The update step every stage shares: a pure function of explicit state.

A *stage* is a loss function ``loss_fn(model, batch, rng) -> (loss, metrics)``: it builds
nothing, owns nothing, and sees the model as an ``nnx.Module`` (merged inside the step). This
module turns it into

    train_step(state: TrainState, batch, rng) -> (TrainState, metrics)

with gradients, an optax update, an optional EMA of the parameters and the norms every stage
logs. ``train_step`` is *not* jitted here: the trainer jits it with its shardings and donates
``state``; tests and notebooks can simply ``jax.jit`` it. The rng is folded with the step, so a
resumed run draws the same noise as an uninterrupted one.

Gradient accumulation: ``accum_steps`` > 1 splits the batch into that many microbatches, scanned
with ``lax.scan`` (microbatch i draws its rng as ``fold_in(step_rng, i)``; gradients, loss and
metrics averaged), so the peak activation memory is one microbatch's. ``accum_steps`` = 1 is the
plain step on the whole batch.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
    step: jax.Array           # int32 scalar
    params: nnx.State         # nnx.Param leaves
    opt_state: optax.OptState
    ema: nnx.State | None     # EMA of params, or None


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest): rest holds non-parameter state (e.g. buffers), kept constant."""
    return nnx.split(model, nnx.Param, ...)


def init_train_state(params: nnx.State, tx: optax.GradientTransformation,
                     ema: bool = False) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema else None)


def global_norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, loss_fn: LossFn,
                    tx: optax.GradientTransformation, ema_decay: float | None = None,
                    accum_steps: int = 1):
    """The pure update step of ``loss_fn`` (see the module docstring)."""

    def objective(params, batch, rng):
        return loss_fn(nnx.merge(graphdef, params, rest), batch, rng)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def accumulated(params, batch, rng):
        micro = jax.tree.map(lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps)
                                                 + x.shape[1:]), batch)

        def body(carry, xs):
            i, mb = xs
            (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (grads, loss, metrics)), None

        shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             (shapes[1], shapes[0][0], shapes[0][1]))
        (grads, loss, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
        scale = 1.0 / accum_steps
        grads, loss, metrics = jax.tree.map(lambda x: x * scale, (grads, loss, metrics))
        return (loss, metrics), grads

    def train_step(state: TrainState, batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if accum_steps > 1:
            (loss, metrics), grads = accumulated(state.params, batch, rng)
        else:
            (loss, metrics), grads = grad_fn(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None and ema_decay is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        metrics = dict(metrics, loss=loss, grad_norm=global_norm(grads),
                       param_norm=global_norm(params))
        return TrainState(state.step + 1, params, opt_state, ema), metrics

    return train_step


def build_train_step(model: nnx.Module, loss_fn: LossFn, tx: optax.GradientTransformation,
                     ema_decay: float | None = None):
    """(train_step, initial TrainState, graphdef, rest) for ``model``: what every stage returns.

    ``nnx.merge(graphdef, state.params, rest)`` (or ``state.ema``) gives the trained model back.
    """
    graphdef, params, rest = split_model(model)
    train_step = make_train_step(graphdef, rest, loss_fn, tx, ema_decay)
    return train_step, init_train_state(params, tx, ema=ema_decay is not None), graphdef, rest
