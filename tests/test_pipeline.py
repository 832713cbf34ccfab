"""UnCLIPPipeline on a tiny native model: shapes and dtype, determinism per seed, compile once,
the no-prior and AR-prior paths, and the batch sharded over 8 simulated devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipeline_fixtures import SMALL_SETTINGS, materialise, random_pipeline
from unclip_jax.models.decoder import Decoder, DecoderConfig
from unclip_jax.pipeline import PipelineError, UnCLIPPipeline

# 4 prompts x 2 images = 8 rows: divisible by the 8 simulated devices, so every test below
# runs sharded and reuses the functions the first one compiled.
PROMPTS = ["a red circle", "a blue square at the top", "a green triangle", "a cyan circle"]
SETTINGS = SMALL_SETTINGS


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline(settings=SETTINGS)


def test_generate_shapes_determinism_and_compile_once(pipe):
    a = pipe.generate(PROMPTS, num_images=2, seed=0)
    assert a.dtype == np.uint8 and a.shape == (8, 16, 16, 3)
    traces = dict(pipe.trace_counts)
    assert set(traces) >= {"text", "prior", "decoder", "super_res_0"}
    b = pipe.generate(PROMPTS, num_images=2, seed=0)
    assert pipe.trace_counts == traces  # same shapes: nothing traced (so nothing compiled) again
    np.testing.assert_array_equal(a, b)
    c = pipe.generate(PROMPTS, num_images=2, seed=1)
    assert pipe.trace_counts == traces
    assert np.abs(a.astype(int) - c).mean() > 1.0
    # Images of one prompt differ from each other too (independent noise per row).
    assert np.abs(a[0].astype(int) - a[1]).mean() > 1.0


def test_no_prior_baseline_and_ar_prior(pipe):
    text = pipe.encode_text(PROMPTS)
    z = pipe.sample_image_embeds(text, jax.random.key(0), num_images=2, prior="none")
    np.testing.assert_array_equal(np.asarray(z), np.repeat(np.asarray(text.text_embed), 2, 0))
    out = pipe.generate(PROMPTS, num_images=2, seed=0, prior="none", upsample=0)
    assert out.shape == (8, 8, 8, 3) and out.dtype == np.uint8
    z_ar = pipe.sample_image_embeds(text, jax.random.key(0), num_images=2, prior="ar")
    assert z_ar.shape == (8, 64) and np.isfinite(np.asarray(z_ar)).all()


def test_batch_sharded_over_devices(pipe):
    assert jax.device_count() == 8
    text = pipe.encode_text(PROMPTS)
    z = pipe.sample_image_embeds(text, jax.random.key(1), num_images=2)
    assert z.shape == (8, 64) and len(z.sharding.device_set) == 8
    x = pipe.decode(z, text, jax.random.key(2))
    assert x.shape == (8, 8, 8, 3)
    assert len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
    assert x.sharding.spec[0] == "data"
    assert np.abs(np.asarray(x)).max() <= 1.0
    # Explicit starting noise replaces the draw from rng: the same x_T gives the same images.
    x_T = np.random.default_rng(0).standard_normal((8, 8, 8, 3)).astype(np.float32)
    a = pipe.decode(z, text, jax.random.key(3), x_T=x_T)
    b = pipe.decode(z, text, jax.random.key(4), x_T=x_T)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0  # per-step noise still differs
    c = pipe.decode(z, text, jax.random.key(3), x_T=x_T)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_bad_calls_are_refused(pipe):
    with pytest.raises(PipelineError, match="empty"):
        pipe.encode_text(["a red circle", "  "])
    text = pipe.encode_text(PROMPTS)
    with pytest.raises(PipelineError, match="prior must be one of"):
        pipe.sample_image_embeds(text, prior="clip")
    with pytest.raises(PipelineError, match="sampler must be one of"):
        pipe.decode(jnp.zeros((8, 64)), text, sampler="euler")
    with pytest.raises(PipelineError, match="Unknown decoder setting"):
        pipe.decode(jnp.zeros((8, 64)), text, stepz=3)


def test_upsampler_start_t_keeps_the_low_res_content(pipe):
    """start_t=None samples from pure noise (a random model returns noise); a low start_t starts
    from the resized image noised to that level and only refines it, for every sampler."""
    from unclip_jax.pipeline import resize_bicubic, stage_spec
    low = np.random.default_rng(0).uniform(-0.8, 0.8, (8, 8, 8, 3)).astype(np.float32)
    up = np.asarray(resize_bicubic(low, 16))
    full = np.asarray(pipe.upsample(low, jax.random.key(0)))
    assert np.abs(full - up).mean() > 0.2
    for sampler in ("ddim", "ddpm", "unclip", "dpm++"):
        s = {"sampler": sampler, "steps": 2, "start_t": 5}
        grid = stage_spec("super_res", {**pipe.settings["super_res"][0], **s}).timesteps()
        assert grid.max() <= 5 and grid.min() >= 0
        near = np.asarray(pipe.upsample(low, jax.random.key(0), **s))
        assert near.shape == (8, 16, 16, 3)
        assert np.abs(near - up).mean() < 0.1, sampler
    with pytest.raises(PipelineError, match="start_t must be in"):
        pipe.upsample(low, start_t=1000)


def test_prior_guidance_uses_what_the_prior_trained_with(pipe):
    """A prior with a learned null is guided against it (the empty caption's encoding is not
    read); one without (Karlo's) against the empty caption's CLIP encoding."""
    own = random_pipeline(settings=SETTINGS, learned_null=True)
    for p, reads_empty_caption in ((own, False), (pipe, True)):
        text = p.encode_text(PROMPTS)
        other = text._replace(uncond_embed=np.asarray(text.uncond_embed) + 1.0)
        a = np.asarray(p.sample_image_embeds(text, jax.random.key(0), guidance_scale=3.0))
        b = np.asarray(p.sample_image_embeds(other, jax.random.key(0), guidance_scale=3.0))
        assert np.isfinite(a).all()
        assert (np.abs(a - b).max() > 1e-3) == reads_empty_caption


def test_decoder_output_is_read_as_its_prediction_type(pipe):
    text = pipe.encode_text(PROMPTS)
    z = pipe.sample_image_embeds(text, jax.random.key(1), num_images=2)
    eps = np.asarray(pipe.decode(z, text, jax.random.key(2)))
    v = np.asarray(pipe.decode(z, text, jax.random.key(2), prediction_type="v_prediction"))
    assert np.isfinite(v).all() and np.abs(eps - v).mean() > 1e-2


def test_decoder_guidance_against_the_empty_or_the_dropped_caption(pipe):
    """A decoder with CLIP caption tokens is guided against CLIP's encoding of "" (Karlo's
    training) or against the caption dropped as `unclip-jax train` drops it (uncond_text)."""
    text = pipe.encode_text(PROMPTS)
    z = pipe.sample_image_embeds(text, jax.random.key(1), num_images=2)
    assert pipe.decoder.config.text_encoder == "clip"
    run = lambda **kw: np.asarray(pipe.decode(z, text, jax.random.key(2), **kw))  # noqa: E731
    empty, dropped = run(), run(uncond_text="dropped")
    assert np.isfinite(dropped).all() and np.abs(empty - dropped).mean() > 1e-3
    # without guidance there is no unconditional branch: the setting changes nothing
    np.testing.assert_array_equal(run(guidance_scale=1.0),
                                  run(guidance_scale=1.0, uncond_text="dropped"))
    with pytest.raises(PipelineError, match="uncond_text must be one of"):
        run(uncond_text="zeros")
    # caption_tokens=False: the tokens masked out of attention (the table's "without" row)
    off = run(guidance_scale=1.0, caption_tokens=False)
    assert np.abs(off - run(guidance_scale=1.0)).mean() > 1e-3
    with pytest.raises(PipelineError, match="caption_tokens must be true or false"):
        run(caption_tokens="no")


def test_decoder_with_its_own_text_transformer(pipe, tmp_path):
    """A decoder with GLIDE's text Transformer (text_encoder='transformer') reads the caption's
    token ids, not CLIP's states: guided against the empty caption's ids or the dropped
    caption; caption_tokens=False removes the ids' every trace (z_t still conditions it); a
    tokenizer whose ids it cannot hold is refused when the pipeline is built; it saves and
    loads as a folder."""
    cfg = dict(image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_levels=(1,), head_dim=8, groups=4, clip_dim=64, context_dim=32,
               text_encoder="transformer", xf_width=16, xf_layers=1, xf_heads=2, xf_ctx=77)
    dec = materialise(lambda: Decoder(DecoderConfig(**cfg), nnx.Rngs(0)), 7)
    p = UnCLIPPipeline(clip=pipe.clip, prior=pipe.prior, decoder=dec, settings=SETTINGS)
    text = p.encode_text(PROMPTS)
    z = jnp.asarray(text.text_embed)
    run = lambda t, **kw: np.asarray(p.decode(z, t, jax.random.key(2), **kw))  # noqa: E731
    base = run(text)
    assert base.shape == (4, 8, 8, 3) and np.isfinite(base).all()
    ids = np.asarray(text.tokens)
    other_ids = text._replace(tokens=np.where(text.mask, (ids + 7) % 49000, ids))
    other_states = text._replace(text_hidden=np.asarray(text.text_hidden) + 1.0)
    other_empty = text._replace(uncond_tokens=np.asarray(text.uncond_tokens) * 0 + 320)
    assert np.abs(run(other_ids) - base).mean() > 1e-3          # the ids are read ...
    np.testing.assert_array_equal(run(other_states), base)      # ... CLIP's states are not
    assert np.abs(run(other_empty) - base).mean() > 1e-3        # guided against the empty ids
    dropped = run(text, uncond_text="dropped")
    np.testing.assert_array_equal(run(other_empty, uncond_text="dropped"), dropped)
    off = run(text, caption_tokens=False)
    assert np.abs(off - base).mean() > 1e-3
    np.testing.assert_array_equal(run(other_ids, caption_tokens=False), off)
    p.save_pretrained(tmp_path / "xf")
    q = UnCLIPPipeline.from_pretrained(tmp_path / "xf")
    assert q.decoder.config.text_encoder == "transformer"
    np.testing.assert_allclose(np.asarray(q.decode(z, q.encode_text(PROMPTS), jax.random.key(2))),
                               base, atol=1e-5)
    with pytest.raises(PipelineError, match="holds 16 tokens but the tokenizer writes 77"):
        UnCLIPPipeline(clip=pipe.clip, decoder=materialise(lambda: Decoder(
            DecoderConfig(**dict(cfg, xf_ctx=16)), nnx.Rngs(0)), 7))
    with pytest.raises(PipelineError, match="set xf_vocab"):
        UnCLIPPipeline(clip=pipe.clip, decoder=materialise(lambda: Decoder(
            DecoderConfig(**dict(cfg, xf_vocab=1000)), nnx.Rngs(0)), 7))
