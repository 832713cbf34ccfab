"""UnCLIPPipeline on a tiny native model: shapes and dtype, determinism per seed, compile once,
the no-prior and AR-prior paths, and the batch sharded over 8 simulated devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unclip_jax.pipeline import PipelineError, UnCLIPPipeline

# 4 prompts x 2 images = 8 rows: divisible by the 8 simulated devices, so every test below
# runs sharded and reuses the functions the first one compiled.
PROMPTS = ["a red circle", "a blue square at the top", "a green triangle", "a cyan circle"]
SETTINGS = {
    "prior": {"steps": 3, "guidance_scale": 2.0, "best_of": 2},
    "decoder": {"steps": 3, "guidance_scale": 3.0},
    "super_res": [{"models": ["super_res_first"], "size": 16, "steps": 2}],
}


def tiny_pipeline(seed=0, settings=SETTINGS):
    """CLIP 'tiny' (64-dim), a 1-layer diffusion prior, an AR prior, an 8x8 decoder and a
    16x16 upsampler, all random."""
    from unclip_jax.clip.model import CLIP, get_preset
    from unclip_jax.models.ar_prior import ARPrior
    from unclip_jax.models.ar_prior import get_preset as ar_preset
    from unclip_jax.models.decoder import Decoder, DecoderConfig
    from unclip_jax.models.diffusion_prior import DiffusionPrior, PriorConfig
    from unclip_jax.models.layers import abstract_init
    from unclip_jax.models.upsampler import SuperRes, SuperResConfig

    def build(make, i):
        return _materialise(abstract_init(make), seed + i)

    clip = build(lambda: CLIP(get_preset("tiny"), rngs=nnx.Rngs(0)), 0)
    prior = build(lambda: DiffusionPrior(PriorConfig(
        embed_dim=64, context_length=77, num_heads=2, head_dim=16, num_layers=1,
        embed_norm="mean_std"), rngs=nnx.Rngs(0)), 1)
    ar = build(lambda: ARPrior(ar_preset("tiny", embed_dim=64, text_width=64, text_context=8,
                                         num_components=8), rngs=nnx.Rngs(0)), 2)
    ar.quantizer.fitted[...] = jnp.ones((), jnp.int32)  # an all-zero map: shapes only
    decoder = build(lambda: Decoder(DecoderConfig(
        image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
        head_dim=8, groups=4, clip_dim=64, context_dim=32, text_width=64), nnx.Rngs(0)), 3)
    sr = build(lambda: SuperRes(SuperResConfig(channels=16, channel_mult=(1, 2),
                                               num_res_blocks=1, groups=4), nnx.Rngs(0)), 4)
    return UnCLIPPipeline(clip=clip, prior=prior, ar_prior=ar, decoder=decoder,
                          super_res={"super_res_first": sr}, settings=settings)


def _materialise(abstract, seed):
    """Concrete arrays for an abstract (eval_shape) module, filled by ``_random_fill``."""
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    for path, var in state.flat_state():
        name = str(path[-1])
        dtype = np.dtype(var.dtype)
        if not np.issubdtype(dtype, np.floating):
            var.set_value(jnp.zeros(var.shape, var.dtype))
        elif name in ("scale", "clip_std"):
            var.set_value(jnp.ones(var.shape, var.dtype))
        else:
            fan = var.shape[0] if len(var.shape) > 1 else 1
            var.set_value(jnp.asarray(rng.standard_normal(var.shape) * 0.5 / fan ** 0.5, var.dtype))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


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
