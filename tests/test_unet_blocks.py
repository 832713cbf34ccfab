"""ADM UNet building blocks: sinusoidal features, GroupNorm, residual blocks, attention with
encoder tokens, remat, dropout, compute dtype and the logical axis names of the parameters."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from unclip_jax.models.group_norm import group_norm
from unclip_jax.models.unet_blocks import (AttentionBlock, GroupNorm, ResBlock, UNet, UNetConfig,
                                           timestep_embedding)

RNG = lambda seed: nnx.Rngs(jax.random.key(seed, impl="rbg"))  # noqa: E731 (cheap to compile)


def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def randomize(module, seed, scale=0.3):
    """Replace every parameter (zero-initialised output layers included) by random values."""
    graphdef, state = nnx.split(module)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed, impl="rbg"), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = np.array([0, 1, 17, 999], np.int64)
    for dim, shift, flip in ((32, 0, True), (15, 1, False)):
        ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                     downscale_freq_shift=shift).numpy()
        ours = np.asarray(timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip,
                                             freq_shift=shift))
        np.testing.assert_allclose(ours, ref, atol=1e-4)  # float32 sin of arguments up to 999


def test_group_norm_matches_torch():
    x = np.random.default_rng(0).standard_normal((2, 5, 6, 12)).astype(np.float32) * 3 + 1
    norm = GroupNorm(12, 4, 1e-5, dtype=jnp.float32, param_dtype=jnp.float32, rngs=RNG(0))
    norm = randomize(norm, 1)
    ref = torch.nn.GroupNorm(4, 12, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(np.asarray(norm.scale[...])))
        ref.bias.copy_(torch.tensor(np.asarray(norm.bias[...])))
        expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected.transpose(0, 2, 3, 1),
                               atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 6, 12), (3, 7, 12)])
def test_group_norm_gradients_match_torch(shape):
    """The hand-written backward pass (models/group_norm.py) against torch's autograd, for the
    NHWC and the [B, L, C] layouts, with a mean far from zero (the two-pass variance)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 5
    dy = rng.standard_normal(shape).astype(np.float32)
    norm = randomize(GroupNorm(12, 4, 1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                               rngs=RNG(0)), 2)

    def loss(x, scale, bias):
        return jnp.sum(group_norm(x, scale, bias, 4, 1e-5, jnp.float32) * dy)

    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), norm.scale[...], norm.bias[...])
    ref = torch.nn.GroupNorm(4, 12, eps=1e-5)
    to_nc = lambda a: np.moveaxis(a, -1, 1).copy()  # noqa: E731
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(np.asarray(norm.scale[...])))
        ref.bias.copy_(torch.tensor(np.asarray(norm.bias[...])))
    xt = torch.from_numpy(to_nc(x)).requires_grad_()
    (ref(xt) * torch.from_numpy(to_nc(dy))).sum().backward()
    np.testing.assert_allclose(np.asarray(grads[0]), np.moveaxis(xt.grad.numpy(), 1, -1),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[1]), ref.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[2]), ref.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_group_norm_keeps_float32_statistics_for_bfloat16():
    """bfloat16 in and out, float32 inside: the output and the gradient match the float32
    computation to bfloat16's precision, and the gradient comes back in the input's dtype."""
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 8)) * 2 + 1
    norm = GroupNorm(8, 2, 1e-5, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=RNG(0))
    ref = GroupNorm(8, 2, 1e-5, dtype=jnp.float32, param_dtype=jnp.float32, rngs=RNG(0))
    y = norm(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref(x)), atol=3e-2)
    g = jax.grad(lambda v: jnp.sum(norm(v).astype(jnp.float32) ** 2))(x.astype(jnp.bfloat16))
    g32 = jax.grad(lambda v: jnp.sum(ref(v) ** 2))(x)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g32), atol=5e-2)


def test_fresh_res_blocks_are_identity_on_their_skip_path():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
    emb = jax.random.normal(jax.random.key(1), (2, 16))

    def run(x, emb):  # built and called inside one compiled function (eager ops compile each)
        same = ResBlock(8, 8, 16, groups=4, rngs=RNG(0))
        down = ResBlock(8, 8, 16, groups=4, down=True, rngs=RNG(0))
        up = ResBlock(8, 8, 16, groups=4, up=True, rngs=RNG(0))
        block = randomize(ResBlock(8, 12, 16, groups=4, scale_shift=True, rngs=RNG(0)), 0)
        return same(x, emb), down(x, emb), up(x, emb), block(x, emb), block(x, emb * 0)

    same, down, up, trained, no_emb = compiled(run, x, emb)(x, emb)
    np.testing.assert_allclose(same, x, atol=1e-6)  # conv2 starts at zero
    np.testing.assert_allclose(down, x.reshape(2, 4, 2, 4, 2, 8).mean((2, 4)), atol=1e-6)
    np.testing.assert_allclose(up, jnp.repeat(jnp.repeat(x, 2, 1), 2, 2), atol=1e-6)
    # Once trained (random weights), the timestep embedding changes the output.
    assert trained.shape == (2, 8, 8, 12)
    assert float(jnp.abs(trained - no_emb).max()) > 1e-3


def test_attention_attends_to_unmasked_context_only():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 6))
    mask = jnp.array([[True, True, False, False, False]] * 2)

    def run(x, ctx, mask):
        attn = randomize(AttentionBlock(8, 4, context_dim=6, groups=4, rngs=RNG(0)), 0)
        fresh = AttentionBlock(8, 4, context_dim=6, groups=4, rngs=RNG(0))
        changed = ctx.at[:, 2:].set(100.0)  # only masked tokens change
        return (attn(x, ctx, mask), attn(x, changed, mask), attn(x, changed),
                attn(x, ctx.at[:, :2].set(3.0), mask), fresh(x, ctx, mask))

    out, masked_changed, unmasked_changed, visible_changed, fresh = \
        compiled(run, x, ctx, mask)(x, ctx, mask)
    np.testing.assert_allclose(masked_changed, out, atol=1e-5)
    assert float(jnp.abs(unmasked_changed - out).max()) > 1e-2   # unmasked, they matter
    assert float(jnp.abs(visible_changed - out).max()) > 1e-3
    np.testing.assert_allclose(fresh, x, atol=1e-6)  # to_out starts at zero
    with pytest.raises(ValueError, match="context"):
        nnx.eval_shape(lambda: AttentionBlock(8, 4, context_dim=6, groups=4,
                                              rngs=nnx.Rngs(0))(x))


def _tiny_unet(**kw):
    c = UNetConfig(**{**dict(in_channels=3, out_channels=6, channels=8, channel_mult=(1, 2),
                             num_res_blocks=1, attention_levels=(1,), mid_attention=True,
                             head_dim=4, context_dim=6, groups=4), **kw})
    return nnx.eval_shape(lambda: UNet(c, nnx.Rngs(0)))


def test_unet_remat_dropout_and_bfloat16():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    t = jnp.array([3, 500])
    ctx = jax.random.normal(jax.random.key(1), (2, 3, 6))
    mask = jnp.array([[True, True, False], [True, False, False]])
    graphdef = nnx.split(_tiny_unet(dropout=0.5))[0]
    remat_graphdef = nnx.split(_tiny_unet(dropout=0.5, remat=True))[0]
    dots_graphdef = nnx.split(_tiny_unet(dropout=0.5, remat=True,
                                         remat_policy="dots_saveable"))[0]
    half_graphdef = nnx.split(_tiny_unet(dropout=0.5, dtype="bfloat16"))[0]
    # Random weights everywhere (zero-initialised output layers included), drawn on the host.
    state = nnx.split(_tiny_unet(dropout=0.5))[1]
    rng = np.random.default_rng(3)
    state = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32)
                              * 0.5 / np.sqrt(np.prod(a.shape[:-1]) if len(a.shape) > 1 else 4)),
        state)

    def loss(state, graphdef, rng):
        out = nnx.merge(graphdef, state)(x, t, context=ctx, context_mask=mask,
                                         deterministic=False, rng=rng)
        return jnp.mean(out ** 2), out

    grad = lambda g: jax.value_and_grad(lambda s, r: loss(s, g, r), has_aux=True)  # noqa: E731
    key = jax.random.key(7)
    (l1, out1), g1 = compiled(grad(graphdef), state, key)(state, key)
    (l2, out2), g2 = compiled(grad(remat_graphdef), state, key)(state, key)
    (l3, out3), g3 = compiled(grad(dots_graphdef), state, key)(state, key)
    np.testing.assert_allclose(out1, out2, rtol=1e-4, atol=1e-5)   # remat: same numbers
    np.testing.assert_allclose(out1, out3, rtol=1e-4, atol=1e-5)   # whatever the policy
    for a, b, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), jax.tree.leaves(g3)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(a, c, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="remat_policy"):
        _tiny_unet(remat=True, remat_policy="everything")
    with pytest.raises(ValueError, match="attention_impl"):
        _tiny_unet(attention_impl="flash")

    def eval_both(state):
        full = nnx.merge(graphdef, state)(x, t, context=ctx, context_mask=mask)
        half = nnx.merge(half_graphdef, state)(x, t, context=ctx, context_mask=mask)
        return full, half

    deterministic, out16 = compiled(eval_both, state)(state)
    assert float(jnp.abs(out1 - deterministic).max()) > 1e-3       # dropout was active
    with pytest.raises(ValueError, match="rng"):
        nnx.eval_shape(lambda: nnx.merge(graphdef, state)(x, t, context=ctx, context_mask=mask,
                                                          deterministic=False))
    # bfloat16 compute with float32 parameters: close to the float32 result.
    rel = float(jnp.linalg.norm(out16 - deterministic) / jnp.linalg.norm(deterministic))
    assert out16.dtype == jnp.float32 and rel < 0.05, rel


def test_parameters_carry_logical_axis_names():
    unet = nnx.eval_shape(lambda: UNet(UNetConfig(channels=8, channel_mult=(1, 2), groups=4,
                                                  attention_levels=(1,), head_dim=4,
                                                  context_dim=6), nnx.Rngs(0)))
    specs = nnx.get_partition_spec(nnx.state(unet, nnx.Param))
    flat = {tuple(map(str, p)): v.get_value() if hasattr(v, "get_value") else v
            for p, v in specs.flat_state()}
    assert tuple(flat[("conv_in", "kernel")]) == (None, None, "conv_in", "conv_out")
    assert tuple(flat[("down", "1", "attn", "0", "to_q", "kernel")]) == ("embed", "heads")
    assert tuple(flat[("down", "1", "attn", "0", "to_out", "kernel")]) == ("heads", "embed")
    assert tuple(flat[("time_embed", "linear_1", "kernel")]) == ("embed", "mlp")


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="groups"):
        UNetConfig(channels=12, groups=8)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="head_dim"):
        UNetConfig(channels=32, channel_mult=(1,), attention_levels=(0,), head_dim=24)
    with pytest.raises(ValueError, match="divisible"):
        nnx.eval_shape(lambda: UNet(UNetConfig(channels=8, channel_mult=(1, 2), groups=4),
                                    nnx.Rngs(0))(jnp.zeros((1, 7, 8, 3)), jnp.zeros((1,))))


def test_convolutional_resampling_variant():
    """resblock_updown=False resamples with a stride-2 conv / nearest + conv (ADM's
    conv_resample) instead of inside residual blocks; the shapes and parameters follow."""
    config = UNetConfig(channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, groups=4,
                        resblock_updown=False, out_channels=3)
    unet = nnx.eval_shape(lambda: UNet(config, nnx.Rngs(0)))
    assert type(unet.down[0].resample).__name__ == "Downsample"
    assert type(unet.up[0].resample).__name__ == "Upsample"
    assert unet.down[0].resample.conv.kernel.shape == (3, 3, 8, 8)
    out = nnx.eval_shape(lambda: UNet(config, nnx.Rngs(0))(jnp.zeros((2, 12, 16, 3)),
                                                          jnp.zeros((2,))))
    assert out.shape == (2, 12, 16, 3)


@pytest.mark.parametrize("fields, says", [
    (dict(num_res_blocks=(1, 2)), "num_res_blocks (1, 2) must have one entry per level (3)"),
    (dict(up_head_dim=(8,)), "up_head_dim"),
    (dict(block_widths=(8, 16)), "block_widths"),
    (dict(block_widths=(8, 12, 18)), "width 18 is not a multiple of groups"),
    (dict(mid_attention=True, mid_blocks=1), "mid_blocks=2"),
    (dict(mid_blocks=3), "mid_blocks must be 0, 1 or 2"),
    (dict(context_norm="layer"), "context_norm needs context tokens"),
    (dict(context_norm="batch", context_dim=8), "context_norm must be"),
    (dict(context_norm="group", context_dim=8, context_norm_groups=3), "context_norm_groups"),
    (dict(conv_in_kernel=2), "conv_in_kernel must be an odd positive int"),
    (dict(time_proj="spectral"), "time_proj"),
    (dict(emb_act="tanh"), "emb_act"),
    (dict(up_attention_levels=(3,)), "up_attention_levels [3]"),
    (dict(attention_levels=(1,), head_dim=(8, 8, 8), up_head_dim=(8, 24, 8)), "head_dim (24)"),
])
def test_variant_config_errors_name_the_field(fields, says):
    with pytest.raises(ValueError, match="Invalid UNetConfig") as err:
        UNetConfig(**{**dict(channels=16, channel_mult=(1, 2, 2), groups=4), **fields})
    assert says in str(err.value)


def test_variant_layout():
    """Per-level blocks, widths, resampling and attention variants build the modules they name;
    the middle block can be one residual block or none."""
    config = UNetConfig(channels=8, channel_mult=(1, 1, 1), block_widths=(8, 12, 16),
                        num_res_blocks=(1, 2, 1), attention_levels=(1,), up_attention_levels=(2,),
                        head_dim=4, context_dim=6, cross_only=(False, True, False),
                        context_norm="layer", resblock_updown=(False, True, True),
                        up_resblock_updown=(True, False, True), mid_blocks=1, groups=4,
                        out_scale=(1.0, 2.0, 1.0), time_proj="fourier", out_channels=3,
                        self_attn_levels=(), up_self_attn_levels=(2,))
    unet = nnx.eval_shape(lambda: UNet(config, nnx.Rngs(0)))
    assert [len(level.res) for level in unet.down] == [1, 2, 1]
    assert [len(level.res) for level in unet.up] == [2, 3, 2]  # levels 2, 1, 0
    assert unet.down[1].attn[0].to_k is None and unet.down[1].attn[0].norm_cross is not None
    assert unet.up[0].attn[0].add_k_proj is None and unet.up[1].attn is None
    assert type(unet.down[0].resample).__name__ == "Downsample"
    assert type(unet.up[1].resample).__name__ == "Upsample"  # level 1 going up
    assert len(unet.mid.res) == 1 and unet.mid.attn is None
    assert unet.time_proj.weight.shape == (16,)
    out = nnx.eval_shape(lambda: UNet(config, nnx.Rngs(0))(
        jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,)), context=jnp.zeros((2, 5, 6))))
    assert out.shape == (2, 8, 8, 3)
    none = dataclasses.replace(config, mid_blocks=0)
    assert nnx.eval_shape(lambda: UNet(none, nnx.Rngs(0))).mid is None
