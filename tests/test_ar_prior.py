"""The AR prior module: causal structure, masking, KV-cache sampling, state that travels."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from unclip_jax.data.synthetic_embeddings import make_prior_task, sample_prior_batch
from unclip_jax.models.ar_prior import (
    ARPrior,
    ARPriorConfig,
    abstract_model,
    count_params,
    filter_logits,
    get_preset,
    sample,
)
from unclip_jax.models.pca_quantizer import QuantizerBuffer, fit_quantizer
from unclip_jax.train.step import split_model

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def setup():
    task = make_prior_task()
    rng = np.random.default_rng(0)
    fit = fit_quantizer([sample_prior_batch(task, rng, 512) for _ in range(2)],
                        CFG.num_components, CFG.num_buckets, CFG.num_dot_buckets)
    model = ARPrior(CFG, rngs=nnx.Rngs(0))
    model.quantizer.load_fit(fit)
    batch = sample_prior_batch(task, np.random.default_rng(1), 6)
    return model, batch


def args(model, batch):
    tokens = model.quantizer.encode(jnp.asarray(batch["image_embed"]))
    dot = model.quantizer.encode_dot(jnp.sum(batch["image_embed"] * batch["text_embed"], -1))
    return tokens, dot, batch["text_embed"], batch["text_hidden"], batch["text_mask"]


def test_logits_are_causal_and_padding_and_dropped_text_are_ignored(setup):
    model, batch = setup
    tokens, dot, te, th, tm = args(model, batch)
    base = np.asarray(model(tokens, dot, te, th, tm))
    assert base.shape == (6, CFG.num_components, CFG.num_buckets) and base.dtype == np.float32
    j = 7  # changing z_i token j changes only the predictions of tokens after it
    changed = np.asarray(model(tokens.at[:, j].set((tokens[:, j] + 5) % CFG.num_buckets),
                               dot, te, th, tm))
    np.testing.assert_array_equal(changed[:, :j + 1], base[:, :j + 1])
    assert np.abs(changed[:, j + 1:] - base[:, j + 1:]).max() > 1e-3
    # Padded caption positions are invisible.
    noisy = np.where(tm[..., None], th, 100.0 * np.random.default_rng(2).standard_normal(th.shape))
    np.testing.assert_allclose(model(tokens, dot, te, noisy, tm), base, rtol=1e-5, atol=1e-5)
    # The caption, z_t and the dot token all condition the prediction.
    for other in (model(tokens, dot, te[::-1], th, tm), model(tokens, dot, te, th[::-1], tm[::-1]),
                  model(tokens, (dot + 3) % CFG.num_dot_buckets, te, th, tm)):
        assert np.abs(np.asarray(other)[:, 0] - base[:, 0]).max() > 1e-3
    # Dropped rows see the null caption only: their text no longer matters.
    drop = jnp.array([True, False] * 3)
    a = np.asarray(model(tokens, dot, te, th, tm, drop))
    b = np.asarray(model(tokens, dot, te[::-1], th[::-1], tm[::-1], drop))
    np.testing.assert_allclose(a[0::2], b[0::2], rtol=1e-5, atol=1e-5)
    assert np.abs(a[1::2] - b[1::2]).max() > 1e-3


def test_cached_steps_give_the_full_forward_logits(setup):
    model, batch = setup
    tokens, dot, te, th, tm = args(model, batch)
    full = np.asarray(model(tokens, dot, te, th, tm))
    prefix, valid = model.embed_prefix(te, th, tm, dot)
    valid = jnp.concatenate([valid, jnp.ones(tokens.shape, bool)], axis=1)
    logits, cache = model.step(prefix, 0, valid, model.init_cache(6))
    steps = [logits]
    for j in range(CFG.num_components - 1):
        logits, cache = model.step(model.embed_tokens(tokens[:, j:j + 1], j),
                                   CFG.prefix_len + j, valid, cache)
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_sampler_draws_the_same_tokens_as_the_reference(setup):
    model, batch = setup
    run = nnx.jit(lambda m, r, cache: sample(
        m, batch["text_embed"], batch["text_hidden"], batch["text_mask"], r,
        guidance_scale=3.0, temperature=0.8, top_p=0.9, dot_percentile=None, use_cache=cache),
        static_argnums=2)
    for seed in (0, 1):
        fast, slow = run(model, jax.random.key(seed), True), run(model, jax.random.key(seed), False)
        np.testing.assert_array_equal(fast["tokens"], slow["tokens"])
        np.testing.assert_array_equal(fast["dot_tokens"], slow["dot_tokens"])
        np.testing.assert_array_equal(fast["image_embed"], slow["image_embed"])
    tokens = np.asarray(fast["tokens"])
    assert len(np.unique(tokens)) > 10  # real draws, not a constant
    # dot_percentile=None draws the dot token from the top half of its distribution.
    dots = np.asarray(fast["dot_tokens"])
    assert dots.min() >= CFG.num_dot_buckets // 2 and dots.max() < CFG.num_dot_buckets


def test_filter_logits_temperature_and_top_p():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda p: np.isfinite(np.asarray(filter_logits(logits, 1.0, p)))[0].tolist()
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.7) == [False, True, False, True]
    assert kept(0.85) == [False, True, True, True]
    assert kept(1.0) == [True] * 4
    np.testing.assert_allclose(filter_logits(logits, 2.0), logits / 2.0)


def test_fit_is_module_state_and_survives_a_checkpoint(setup, tmp_path):
    model, batch = setup
    graphdef, params, rest = split_model(model)
    buffers = nnx.state(model, QuantizerBuffer)
    assert len(jax.tree.leaves(buffers)) == 8
    assert not jax.tree.leaves(nnx.state(model.quantizer, nnx.Param))  # optimizer never sees it
    assert len(jax.tree.leaves(rest)) == 8

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "prior", nnx.state(model))
    restored = abstract_model(CFG)
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(tmp_path / "prior", nnx.state(restored))
    nnx.update(restored, state)
    restored.quantizer.require_fitted()
    for name in ("mean", "components", "edges", "centres", "dot_edges"):
        np.testing.assert_array_equal(getattr(restored.quantizer, name)[...],
                                      getattr(model.quantizer, name)[...])
    z = jnp.asarray(batch["image_embed"])
    np.testing.assert_array_equal(restored.quantizer.encode(z), model.quantizer.encode(z))
    np.testing.assert_array_equal(model(*args(model, batch)), restored(*args(restored, batch)))
    # A fresh model is unfitted and says so.
    with pytest.raises(ValueError, match="not been fitted"):
        ARPrior(CFG, rngs=nnx.Rngs(0)).quantizer.require_fitted()


def test_dropout_takes_an_explicit_rng(setup):
    model, batch = setup
    cfg = get_preset("tiny", dropout=0.3)
    m = ARPrior(cfg, rngs=nnx.Rngs(0))
    nnx.update(m, nnx.state(model, QuantizerBuffer))
    a = args(m, batch)
    det = m(*a)
    one = m(*a, deterministic=False, rng=jax.random.key(0))
    np.testing.assert_array_equal(one, m(*a, deterministic=False, rng=jax.random.key(0)))
    assert np.abs(np.asarray(one) - np.asarray(det)).max() > 1e-3
    assert np.abs(np.asarray(one) - np.asarray(
        m(*a, deterministic=False, rng=jax.random.key(1)))).max() > 1e-3
    with pytest.raises(ValueError, match="pass rng"):
        m(*a, deterministic=False)


def test_paper_size_without_allocating():
    cfg = get_preset("paper")
    assert cfg.seq_len == 384 and cfg.width // cfg.heads == 64
    n = count_params(cfg)
    assert 0.75e9 < n < 0.85e9, n  # Table 3: 1B with the paper's own text encoder
    # The bulk is 24 blocks of 12 w^2.
    assert n > 24 * 12 * cfg.width ** 2
    params = nnx.state(abstract_model(cfg), nnx.Param)
    flat = dict(nnx.get_partition_spec(params).flat_state())
    get = lambda *p: tuple(flat[p].value)
    assert get("token_embedding") == ("vocab", "embed")
    assert get("blocks", "stack", "qkv", "kernel") == ("layers", "embed", "heads")  # stacked layers
    assert get("blocks", "stack", "fc2", "kernel") == ("layers", "mlp", "embed")
    assert get("head", "kernel") == ("embed", "vocab")
    for path, var in dict(params.flat_state()).items():
        if len(var.shape) >= 2:  # every matrix is annotated with a named axis
            assert any(a is not None for a in flat[path].value), path
    # The whole guided, best-of-2, KV-cached sampler traces at this size (shapes only).
    graphdef, state = nnx.split(abstract_model(cfg))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    out = jax.eval_shape(
        lambda st, te, th, tm: sample(nnx.merge(graphdef, st), te, th, tm, jax.random.key(0),
                                      guidance_scale=3.0, best_of=2, top_p=0.9),
        state, f32(2, 1024), f32(2, 63, 1024), jax.ShapeDtypeStruct((2, 63), bool))
    assert out["tokens"].shape == (2, 319) and out["image_embed"].shape == (2, 1024)

def test_bad_input_is_refused_clearly(setup):
    model, batch = setup
    tokens, dot, te, th, tm = args(model, batch)
    with pytest.raises(ValueError, match="tokens must be"):
        model(tokens[:, :3], dot, te, th, tm)
    with pytest.raises(ValueError, match="text_context"):
        model(tokens, dot, te, jnp.concatenate([th, th], 1), jnp.concatenate([tm, tm], 1))
    with pytest.raises(ValueError, match="text_embed"):
        model(tokens, dot, te[:, :5], th, tm)
    with pytest.raises(ValueError, match="multiple of heads"):
        ARPriorConfig(width=100, heads=3)
    with pytest.raises(ValueError, match="Unknown ARPriorConfig preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="best_of"):
        sample(model, te, th, tm, jax.random.key(0), best_of=0)
