"""The AR prior's training stage: it learns a known caption -> z_i map; Table 3's optimizer."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unclip_jax.data.synthetic_embeddings import make_prior_task, sample_prior_batch
from unclip_jax.models.ar_prior import get_preset, sample
from unclip_jax.train.ar_prior_stage import (
    build_model,
    build_train_step,
    fit_prior_quantizer,
    make_loss_fn,
)
from unclip_jax.train.optimizer import TABLE3, make_optimizer
from unclip_jax.train.step import split_model

TASK = make_prior_task()  # 16 concepts, 32-dim embeddings, 8-token captions


def batch_of(rng, n, **kw):
    b = sample_prior_batch(TASK, rng, n, **kw)
    return {k: v for k, v in b.items() if k != "concept"}, b["concept"]


def fitted_model(dropout=0.0):
    model = build_model(get_preset("tiny", dropout=dropout))
    rng = np.random.default_rng(0)
    fit = fit_prior_quantizer(model, [batch_of(rng, 512)[0] for _ in range(4)])
    assert fit.num_components == 16 and fit.count == 2048
    return model


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_prior_learns_the_synthetic_task_and_beats_the_unconditional_baseline():
    model = fitted_model()
    step, state, graphdef, rest = build_train_step(model, make_optimizer(dataclasses.replace(TABLE3["ar_prior"], learning_rate=3e-3)), ema_decay=None)
    step = jax.jit(step, donate_argnums=0)
    rng = np.random.default_rng(1)
    losses = []
    for _ in range(400):
        state, metrics = step(state, batch_of(rng, 64)[0], jax.random.key(0))
        losses.append(float(metrics["ce"]))
    assert losses[0] == pytest.approx(np.log(32), abs=0.15)  # uniform over 32 buckets at init
    assert np.mean(losses[-20:]) < losses[0] - 0.5, (losses[0], np.mean(losses[-20:]))

    trained = nnx.merge(graphdef, state.params, rest)
    test, concepts = batch_of(np.random.default_rng(123), 128)
    target = TASK.image_dirs[concepts]
    unrelated = TASK.image_dirs[(concepts + 1 + np.arange(128) % 15) % 16]  # another concept

    @nnx.jit(static_argnames=("scale", "k"))
    def draw(m, rng, scale, k):
        return sample(m, test["text_embed"], test["text_hidden"], test["text_mask"], rng,
                      guidance_scale=scale, best_of=k)

    cond = draw(trained, jax.random.key(5), 1.0, 1)
    uncond = draw(trained, jax.random.key(5), 0.0, 1)
    best = draw(trained, jax.random.key(6), 1.0, 4)
    cos_cond = cosine(cond["image_embed"], target).mean()
    cos_uncond = cosine(uncond["image_embed"], target).mean()
    cos_unrelated = cosine(cond["image_embed"], unrelated).mean()
    print(f"loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}; cosine with target: "
          f"conditional {cos_cond:.3f}, unconditional {cos_uncond:.3f}, unrelated concept "
          f"{cos_unrelated:.3f}")
    # The best the PCA/bucket code can do on this task is ~0.93 (round trip of the true z_i).
    assert cos_cond > 0.75, cos_cond
    assert cos_uncond < 0.3 and cos_cond > cos_uncond + 0.5, (cos_cond, cos_uncond)
    assert abs(cos_unrelated) < 0.2, cos_unrelated
    assert cosine(cond["image_embed"], test["image_embed"]).mean() > 0.6
    # The dot token was fixed at the 50th percentile of the training distribution.
    assert np.all(np.asarray(cond["dot_tokens"]) == 8)
    # Best of 4 by z_i . z_t: it keeps the top candidate and raises the dot over one draw.
    dots = np.asarray(best["candidate_dots"])
    kept = np.sum(np.asarray(best["image_embed"]) * test["text_embed"], -1)
    np.testing.assert_allclose(kept, dots.max(1), rtol=1e-5, atol=1e-6)
    one = np.sum(np.asarray(cond["image_embed"]) * test["text_embed"], -1).mean()
    print(f"z_i . z_t: one draw {one:.3f}, best of 4 {kept.mean():.3f}; best-of-4 cosine "
          f"{cosine(best['image_embed'], target).mean():.3f}")
    assert kept.mean() > one + 0.03, (kept.mean(), one)
    assert cosine(best["image_embed"], target).mean() > 0.7


def test_loss_drops_text_and_leaves_the_fit_alone():
    model = fitted_model(dropout=0.1)
    batch, _ = batch_of(np.random.default_rng(2), 256)
    loss, metrics = nnx.jit(make_loss_fn(0.5))(model, batch, jax.random.key(0))
    assert float(loss) == pytest.approx(np.log(32), abs=0.15)
    assert 0.4 < float(metrics["text_dropped"]) < 0.6
    loss0, metrics0 = nnx.jit(make_loss_fn(0.0))(model, batch, jax.random.key(0))
    assert float(metrics0["text_dropped"]) == 0.0
    assert 0.0 <= float(metrics0["accuracy"]) <= 1.0

    _, state, _, _ = build_train_step(model, make_optimizer(dataclasses.replace(TABLE3["ar_prior"], learning_rate=1e-3)))
    assert state.ema is not None  # EMA on by default (0.999, Table 3)
    with pytest.raises(ValueError, match="missing"):
        make_loss_fn()(model, {"image_embed": batch["image_embed"]}, jax.random.key(0))
    with pytest.raises(ValueError, match="not been fitted"):
        build_train_step(build_model(get_preset("tiny")))


def test_optimizer_is_table3_adamw():
    lr, b1, b2, eps, wd = 1.6e-4, 0.9, 0.91, 1e-10, 4e-2
    tx = make_optimizer(TABLE3["ar_prior"])
    params = {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([1.0, -1.0])}
    grads = [{"kernel": jnp.full((2, 2), g), "bias": jnp.full((2,), g)} for g in (1e-9, -3e-9)]
    state = tx.init(params)
    p = params
    m = {k: np.zeros(v.shape) for k, v in params.items()}
    v = {k: np.zeros(x.shape) for k, x in params.items()}
    ref = {k: np.asarray(x, np.float64) for k, x in params.items()}
    for t, g in enumerate(grads, start=1):
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        for k in ref:
            m[k] = b1 * m[k] + (1 - b1) * np.asarray(g[k])
            v[k] = b2 * v[k] + (1 - b2) * np.asarray(g[k]) ** 2
            step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
            ref[k] = ref[k] - lr * (step + (wd * ref[k] if k == "kernel" else 0.0))
    for k in ref:  # tiny gradients: eps = 1e-10 and beta2 = 0.91 both matter here
        np.testing.assert_allclose(p[k], ref[k], rtol=1e-6)

    # On the model: matrices decay, biases and LayerNorm parameters do not.
    model = build_model(get_preset("tiny"))
    graphdef, params, rest = split_model(model)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    new = nnx.merge(graphdef, optax.apply_updates(params, updates), rest)
    np.testing.assert_allclose(new.head.kernel[...], model.head.kernel[...] * (1 - lr * wd),
                               rtol=1e-6)
    np.testing.assert_array_equal(new.final_ln.scale[...], model.final_ln.scale[...])
    np.testing.assert_array_equal(new.head.bias[...], model.head.bias[...])
