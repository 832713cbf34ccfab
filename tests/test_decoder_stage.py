"""Training steps of the decoder (hybrid loss, learned variance, z_i / caption dropout) and of
the upsamplers (plain loss on random quarter-size crops, run at full size)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unclip_jax import diffusion
from unclip_jax.config import load_file
from unclip_jax.models.decoder import Decoder, DecoderConfig
from unclip_jax.models.upsampler import SuperRes, SuperResConfig, resize_low_res
from unclip_jax.train import decoder_stage as ds
from unclip_jax.train import upsampler_stage as us

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = lambda seed: nnx.Rngs(jax.random.key(seed, impl="rbg"))  # noqa: E731 (cheap to compile)


def compiled(fn, *args):
    """fn jitted for these argument shapes with XLA's cheapest backend optimisation: a third
    of the compile time of these tiny models on CPU, which dominates the tests."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def smooth_images(seed, n, size):
    """Images in [-1, 1] made of a few random low-frequency waves per channel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.zeros((n, size, size, 3), np.float32)
    for i in range(n):
        for c in range(3):
            for _ in range(3):
                fy, fx, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.3)
                out[i, :, :, c] += np.sin(2 * np.pi * (fy * yy + fx * xx) + ph) / 3
    return np.clip(out, -1, 1)


def eval_loss(model_fn, schedule, x0, seed=0, ts=(50, 200, 400, 600, 800)):
    """Mean epsilon MSE over fixed steps and fixed noise (deterministic); jit it."""
    losses = []
    for k, t in enumerate(ts):
        noise = jax.random.normal(jax.random.key(seed + k), x0.shape)
        loss, _ = diffusion.training_losses(model_fn, schedule, x0, jnp.full((x0.shape[0],), t),
                                            noise)
        losses.append(jnp.mean(loss))
    return jnp.mean(jnp.stack(losses))


def test_upsampler_trained_on_crops_runs_at_full_size():
    cfg = load_file(os.path.join(REPO, "configs", "upsampler.py") + ":runlocal")
    stage, _ = us.from_config(cfg)
    assert stage.crop_size == cfg.image_size // 4 == 8
    model = SuperRes(SuperResConfig(**cfg.model.to_dict()), RNG(0))
    train_step, state, graphdef, rest = us.build_train_step(
        model, stage, tx=optax.adam(2e-3), ema_decay=None)
    full = smooth_images(0, 64, cfg.image_size)
    low = np.asarray(jax.image.resize(full, (64, 8, 8, 3), method="linear"))
    schedule = diffusion.get_schedule(stage.schedule, stage.num_train_steps)

    def loss_at(params, x0, low_up):
        m = nnx.merge(graphdef, params, rest)
        return eval_loss(lambda x, t: m(x, t, low_up), schedule, x0)

    # Evaluation sets: held-out images at full size (32x32) and their 8x8 crops.
    test_full = smooth_images(1, 8, 32)
    test_low = resize_low_res(jax.image.resize(test_full, (8, 8, 8, 3), method="linear"), 32)
    crops = [us.random_crops([jnp.asarray(test_full), test_low], 8, jax.random.key(i))
             for i in range(4)]
    crop_x0 = jnp.concatenate([c[0] for c in crops]); crop_low = jnp.concatenate([c[1] for c in crops])
    crop_eval = compiled(loss_at, state.params, crop_x0, crop_low)
    full_eval = compiled(loss_at, state.params, jnp.asarray(test_full), test_low)
    before = float(crop_eval(state.params, crop_x0, crop_low))
    batches = [{"image": full[idx], "low_res": low[idx]}
               for idx in (np.random.default_rng(i).choice(64, 8, replace=False)
                           for i in range(150))]
    step = compiled(train_step, state, batches[0], jax.random.key(1))
    for batch in batches:
        state, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))
    crop_loss = float(crop_eval(state.params, crop_x0, crop_low))
    full_loss = float(full_eval(state.params, jnp.asarray(test_full), test_low))
    gap = full_loss / crop_loss - 1
    print(f"upsampler eps-MSE: untrained {before:.4f}; after 150 steps on 8x8 crops: "
          f"crops {crop_loss:.4f}, full 32x32 {full_loss:.4f} ({100 * gap:+.1f}%)")
    assert crop_loss < 0.8 * before            # it learned on crops
    assert abs(gap) < 0.25                     # and the full-size loss stays close


def tiny_decoder(**kw):
    base = dict(image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(1,), head_dim=8, groups=4, clip_dim=12, context_dim=16,
                text_width=10, dropout=0.1)
    return Decoder(DecoderConfig(**{**base, **kw}), RNG(0))


def decoder_batch(seed=0, b=4, length=5):
    rng = np.random.default_rng(seed)
    return {"image": smooth_images(seed, b, 8),
            "image_embed": rng.standard_normal((b, 12)).astype(np.float32),
            "text_embed": rng.standard_normal((b, 12)).astype(np.float32),
            "text_hidden": rng.standard_normal((b, length, 10)).astype(np.float32),
            "text_mask": np.arange(length)[None] < rng.integers(1, length + 1, (b, 1))}


def test_decoder_train_step_overfits_a_batch():
    model = tiny_decoder()
    stage = ds.DecoderStageConfig()
    train_step, state, graphdef, rest = ds.build_train_step(
        model, stage, tx=optax.adam(3e-3), ema_decay=0.9)
    batch = decoder_batch()
    schedule = diffusion.get_schedule("cosine", 1000)
    step = compiled(train_step, state, batch, jax.random.key(2))

    def fixed_loss(params):
        m = nnx.merge(graphdef, params, rest)
        fn = lambda x, t: m(x, t, *(jnp.asarray(batch[k]) for k in  # noqa: E731
                                     ("image_embed", "text_embed", "text_hidden", "text_mask")))
        return eval_loss(lambda x, t: fn(x, t)[..., :3], schedule, jnp.asarray(batch["image"]))

    fixed_loss = compiled(fixed_loss, state.params)
    before = float(fixed_loss(state.params))
    for i in range(40):
        state, metrics = step(state, batch, jax.random.key(2))
    after = float(fixed_loss(state.params))
    print(f"decoder eps-MSE on the fixed batch: {before:.4f} -> {after:.4f} after 40 steps; "
          f"last hybrid loss {float(metrics['loss']):.4f} (vb {float(metrics['vb']):.4f})")
    assert after < 0.7 * before
    assert float(metrics["vb"]) > 0.0  # the learned-variance term is part of the loss
    assert state.ema is not None and int(state.step) == 40


def test_decoder_loss_drops_conditioning_at_the_configured_rates():
    model = tiny_decoder(dropout=0.0)
    batch = decoder_batch(b=256, length=3)
    batch["image"] = np.zeros((256, 8, 8, 3), np.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = ds.make_loss_fn(ds.DecoderStageConfig())
    run = lambda p, b, r: loss_fn(nnx.merge(graphdef, p, rest), b, r)  # noqa: E731
    _, metrics = compiled(run, params, batch, jax.random.key(0))(params, batch, jax.random.key(0))
    assert abs(float(metrics["image_dropped"]) - 0.1) < 0.05
    assert abs(float(metrics["text_dropped"]) - 0.5) < 0.1


def test_stage_errors_are_clear():
    model = tiny_decoder(dropout=0.0)
    loss_fn = ds.make_loss_fn()
    batch = decoder_batch()
    del batch["text_hidden"]
    with pytest.raises(KeyError, match="text_hidden"):
        loss_fn(model, batch, jax.random.key(0))
    sr = SuperRes(SuperResConfig(channels=8, channel_mult=(1,), num_res_blocks=1, groups=4),
                  RNG(0))
    with pytest.raises(ValueError, match="learned_variance"):
        us.make_loss_fn(us.UpsamplerStageConfig(learned_variance=True))(
            sr, {"image": np.zeros((1, 8, 8, 3)), "low_res": np.zeros((1, 4, 4, 3))},
            jax.random.key(0))
    with pytest.raises(ValueError, match="crop_size"):
        us.random_crops([jnp.zeros((1, 8, 8, 3))], 16, jax.random.key(0))


def test_config_files_build_their_stages():
    dec = load_file(os.path.join(REPO, "configs", "decoder.py") + ":size=paper")
    stage, opt = ds.from_config(dec)
    assert (stage.image_drop_prob, stage.text_drop_prob, stage.learned_variance) == (0.1, 0.5, True)
    assert (opt.learning_rate, opt.b2, opt.eps) == (1.2e-4, 0.999, 1e-8)
    up = load_file(os.path.join(REPO, "configs", "upsampler.py") + ":size=paper_1024")
    stage, opt = us.from_config(up)
    assert (stage.crop_size, stage.schedule, opt.learning_rate) == (256, "linear", 1.0e-4)
