"""The diffusion-prior training stage: the loss, the optimizer, and learning a known mapping."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unclip_jax.config import load_config
from unclip_jax.data.synthetic_embeddings import make_prior_task, sample_prior_batch
from unclip_jax.evaluate.prior_metrics import evaluate_prior
from unclip_jax.models.diffusion_prior import DiffusionPrior, TextConditioning, get_preset
from unclip_jax.models.prior_sampling import prior_settings, sample_prior_jit
from unclip_jax.train import diffusion_prior_stage as stage
from unclip_jax.train.optimizer import TABLE3, OptimizerConfig, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("image_embed", "text_embed", "text_hidden", "text_mask")


def _batch(task, rng, n, **kw):
    b = sample_prior_batch(task, rng, n, **kw)
    return {k: b[k] for k in KEYS}


@pytest.fixture(scope="module")
def trained():
    """The runlocal config trained on the synthetic task (caption concept -> z_i direction)."""
    c = load_config(os.path.join(REPO, "configs", "diffusion_prior.py") + ":runlocal")
    cfg = stage.model_config(c)
    task = make_prior_task(num_concepts=c.data.num_concepts, dim=c.data.dim,
                           text_width=c.data.text_width, context_length=c.data.context_length,
                           seed=0)
    model = DiffusionPrior(cfg, rngs=nnx.Rngs(c.seed))
    stage_cfg, opt_cfg = stage.from_config(c)
    train_step, state, graphdef, rest = stage.build_train_step(
        model, stage_cfg, make_optimizer(opt_cfg), ema_decay=None)
    train_step = jax.jit(train_step, donate_argnums=0)
    rng, key = np.random.default_rng(0), jax.random.key(0)
    losses = []
    for _ in range(c.total_steps):
        state, metrics = train_step(state, _batch(task, rng, c.batch_size), key)
        losses.append(float(metrics["loss"]))
    return nnx.merge(graphdef, state.params, rest), task, losses, c


def test_prior_learns_the_synthetic_mapping(trained):
    model, task, losses, c = trained
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:10])
    held_out = _batch(task, np.random.default_rng(123), 64)
    cond = TextConditioning(held_out["text_embed"], held_out["text_hidden"], held_out["text_mask"])
    sampling = prior_settings(c.sampling.to_dict())
    assert (sampling["spec"].sampler, sampling["best_of"]) == ("ddim", 2)

    def sample(batch, key=1):
        cond = TextConditioning(batch["text_embed"], batch["text_hidden"], batch["text_mask"])
        return sample_prior_jit(model, cond, jax.random.key(key), **sampling)["image_embed"]

    metrics = evaluate_prior(sample, [held_out])
    # Unconditional baseline: the same sampler fed the learned null instead of the caption.
    null = model.null_conditioning(64)
    uncond = evaluate_prior(lambda b: sample(dict(b, text_embed=null.text_embed,
                                                  text_hidden=null.text_hidden,
                                                  text_mask=null.text_mask)), [held_out])
    print("conditional", metrics, "unconditional", uncond)
    assert metrics["cos_true"] > 0.7
    assert metrics["cos_true"] > uncond["cos_true"] + 0.4
    assert metrics["margin"] > 0.5

    # Best-of-K raises the z_t dot product over K = 1 (256 fresh captions). Each of the K
    # candidates is itself a K = 1 sample, so their mean is the paired K = 1 reference.
    many = _batch(task, np.random.default_rng(321), 256)
    cond = TextConditioning(many["text_embed"], many["text_hidden"], many["text_mask"])
    one = dict(sampling, best_of=1)
    four = dict(sampling, best_of=4)
    s1 = np.asarray(sample_prior_jit(model, cond, jax.random.key(2), **one)["scores"][:, 0])
    scores = np.asarray(sample_prior_jit(model, cond, jax.random.key(3), **four)["scores"])
    gain = scores.max(axis=1) - s1  # same captions: only the sampling noise differs
    stderr = gain.std() / np.sqrt(len(gain))
    print("z_t . z_i: best of 4", scores.max(1).mean(), "K=1", s1.mean(), "stderr", stderr)
    assert gain.mean() > 4 * stderr
    assert scores.max(axis=1).mean() > scores.mean() + 3 * stderr


def _plain_model(**kw):
    return DiffusionPrior(get_preset("tiny", num_layers=1, **kw), rngs=nnx.Rngs(0))


def _null_batch(task, rng, n):
    b = _batch(task, rng, n)
    b.update(null_text_embed=np.zeros(32, np.float32),
             null_text_hidden=np.zeros((8, 32), np.float32),
             null_text_mask=np.arange(8) < 2)
    return b


def test_loss_drops_text_for_guidance():
    task = make_prior_task(num_concepts=8, dim=32, text_width=32, context_length=8)
    model = _plain_model()
    batch = _null_batch(task, np.random.default_rng(0), 32)
    poked = dict(batch, text_hidden=batch["text_hidden"] + 1.0, text_embed=-batch["text_embed"])
    key = jax.random.key(0)
    always = stage.make_loss_fn(stage.PriorStageConfig(cond_drop_prob=1.0))
    never = stage.make_loss_fn(stage.PriorStageConfig(cond_drop_prob=0.0))
    # All text dropped: the caption cannot matter; none dropped: it does.
    np.testing.assert_allclose(float(always(model, batch, key)[0]),
                               float(always(model, poked, key)[0]), rtol=1e-6)
    assert abs(float(never(model, batch, key)[0]) - float(never(model, poked, key)[0])) > 1e-4
    # About 10% of captions dropped by default.
    default = stage.make_loss_fn()
    rates = [float(default(model, batch, jax.random.key(i))[1]["text_dropped"]) for i in range(8)]
    assert 0.03 < np.mean(rates) < 0.2
    # A prior without a learned null needs the unconditional conditioning in the batch.
    with pytest.raises(KeyError, match="null_text_embed"):
        default(model, _batch(task, np.random.default_rng(0), 4), key)


def test_optimizer_is_table3_adamw_decaying_matrices_only():
    cfg = TABLE3["diffusion_prior"]
    assert (cfg.learning_rate, cfg.b2, cfg.eps, cfg.weight_decay) == (1.1e-4, 0.96, 1e-6, 6.0e-2)
    model = _plain_model(dropout=0.1)
    tx = make_optimizer(OptimizerConfig(lr_schedule="constant", learning_rate=0.1,
                                        weight_decay=0.5))
    params = nnx.state(model, nnx.Param)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    k_old = model.blocks.stack.attn.to_q.kernel[...]
    k_new = new["blocks"]["stack"]["attn"]["to_q"]["kernel"][...]
    np.testing.assert_allclose(np.asarray(k_new), np.asarray(k_old) * (1 - 0.1 * 0.5), rtol=1e-6)
    ln_new = new["blocks"]["stack"]["norm1"]["scale"][...]
    np.testing.assert_array_equal(np.asarray(ln_new), np.ones_like(ln_new))  # not decayed
    pos_new = new["positional_embedding"][...]
    np.testing.assert_array_equal(np.asarray(pos_new), np.asarray(model.positional_embedding[...]))

    # One full train step with dropout and the EMA: runs, and the EMA moves toward the params.
    task = make_prior_task(num_concepts=8, dim=32, text_width=32, context_length=8)
    train_step, state, graphdef, rest = stage.build_train_step(model, ema_decay=0.5)
    state, metrics = jax.jit(train_step)(state, _null_batch(task, np.random.default_rng(0), 8),
                                         jax.random.key(0))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert "clip_mean" in rest  # buffers are not trained
    p = state.params["proj_out"]["kernel"][...]
    e = state.ema["proj_out"]["kernel"][...]
    p0 = model.proj_out.kernel[...]
    np.testing.assert_allclose(np.asarray(e), np.asarray(0.5 * p0 + 0.5 * p), rtol=1e-5, atol=1e-7)


def test_embedding_stats_feed_mean_std_normalisation():
    rng = np.random.default_rng(0)
    z = (3.0 + 2.0 * rng.standard_normal((300, 32))).astype(np.float32)
    mean, std = stage.embedding_stats([z[:100], z[100:]])
    np.testing.assert_allclose(mean, z.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, z.std(0), rtol=1e-4)
    model = _plain_model(embed_norm="mean_std")
    model.set_embedding_stats(mean, std)
    x = np.asarray(model.normalise(z))
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(0), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="no embeddings"):
        stage.embedding_stats([])
