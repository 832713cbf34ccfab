"""Tiny random pipeline folders for tests (a helper module, like torch_reference.py: test modules
import it, never each other)."""
import jax.numpy as jnp
import numpy as np
from flax import nnx


def materialise(make, seed):
    """A module built abstractly and filled with small random numbers (fast: no init kernels)."""
    from unclip_jax.models.layers import abstract_init
    graphdef, state = nnx.split(abstract_init(make))
    rng = np.random.default_rng(seed)
    for path, var in state.flat_state():
        dtype = np.dtype(var.dtype)
        if not np.issubdtype(dtype, np.floating):
            var.set_value(jnp.zeros(var.shape, var.dtype))
        elif str(path[-1]) in ("scale", "clip_std"):
            var.set_value(jnp.ones(var.shape, var.dtype))
        else:
            fan = var.shape[0] if len(var.shape) > 1 else 1
            var.set_value(jnp.asarray(rng.standard_normal(var.shape) * 0.5 / fan ** 0.5,
                                      var.dtype))
    return nnx.merge(graphdef, state)


def tiny_pipeline(path, *, ar_prior: bool = False, settings=None) -> str:
    """Save a random pipeline to ``path``: tiny CLIP (both towers, for the applications), a
    diffusion prior (and an AR prior), a 32 x 32 decoder (the Shapes judge's smallest size)."""
    from unclip_jax import clip
    from unclip_jax.models.ar_prior import ARPrior
    from unclip_jax.models.ar_prior import get_preset as ar_preset
    from unclip_jax.models.decoder import Decoder, DecoderConfig
    from unclip_jax.models.diffusion_prior import DiffusionPrior, PriorConfig
    from unclip_jax.pipeline import UnCLIPPipeline
    model = materialise(lambda: clip.CLIP(clip.get_preset("tiny"), rngs=nnx.Rngs(0)), 0)
    prior = materialise(lambda: DiffusionPrior(PriorConfig(
        embed_dim=64, context_length=77, num_heads=2, head_dim=16, num_layers=1,
        embed_norm="mean_std"), rngs=nnx.Rngs(0)), 1)
    ar = None
    if ar_prior:
        ar = materialise(lambda: ARPrior(ar_preset("tiny", embed_dim=64, text_width=64,
                                                   text_context=8, num_components=8),
                                         rngs=nnx.Rngs(0)), 2)
        ar.quantizer.fitted[...] = jnp.ones((), jnp.int32)
    dec = materialise(lambda: Decoder(DecoderConfig(
        image_size=32, channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(),
        head_dim=8, groups=4, clip_dim=64, context_dim=16, text_width=64), nnx.Rngs(0)), 3)
    UnCLIPPipeline(clip=model, prior=prior, ar_prior=ar, decoder=dec,
                   **({"settings": settings} if settings else {})).save_pretrained(path)
    return str(path)


SMALL_SETTINGS = {
    "prior": {"steps": 3, "guidance_scale": 2.0, "best_of": 2},
    "decoder": {"steps": 3, "guidance_scale": 3.0},
    "super_res": [{"models": ["super_res_first"], "size": 16, "steps": 2}],
}


def random_pipeline(seed=0, settings=None, learned_null=False):
    """An in-memory pipeline, all random: CLIP 'tiny' (64-dim), a 1-layer diffusion prior (with
    a learned null conditioning if ``learned_null``), an AR prior, an 8x8 decoder and a 16x16
    upsampler."""
    from unclip_jax.clip.model import CLIP, get_preset
    from unclip_jax.models.ar_prior import ARPrior
    from unclip_jax.models.ar_prior import get_preset as ar_preset
    from unclip_jax.models.decoder import Decoder, DecoderConfig
    from unclip_jax.models.diffusion_prior import DiffusionPrior, PriorConfig
    from unclip_jax.models.upsampler import SuperRes, SuperResConfig
    from unclip_jax.pipeline import UnCLIPPipeline

    clip = materialise(lambda: CLIP(get_preset("tiny"), rngs=nnx.Rngs(0)), seed)
    prior = materialise(lambda: DiffusionPrior(PriorConfig(
        embed_dim=64, context_length=77, num_heads=2, head_dim=16, num_layers=1,
        embed_norm="mean_std", learned_null=learned_null), rngs=nnx.Rngs(0)), seed + 1)
    ar = materialise(lambda: ARPrior(ar_preset("tiny", embed_dim=64, text_width=64,
                                               text_context=8, num_components=8),
                                     rngs=nnx.Rngs(0)), seed + 2)
    ar.quantizer.fitted[...] = jnp.ones((), jnp.int32)  # an all-zero map: shapes only
    decoder = materialise(lambda: Decoder(DecoderConfig(
        image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
        head_dim=8, groups=4, clip_dim=64, context_dim=32, text_width=64), nnx.Rngs(0)), seed + 3)
    sr = materialise(lambda: SuperRes(SuperResConfig(channels=16, channel_mult=(1, 2),
                                                     num_res_blocks=1, groups=4), nnx.Rngs(0)),
                     seed + 4)
    return UnCLIPPipeline(clip=clip, prior=prior, ar_prior=ar, decoder=decoder,
                          super_res={"super_res_first": sr},
                          settings=SMALL_SETTINGS if settings is None else settings)
