import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unclip_jax.models import ar_prior, diffusion_prior, transformer
from unclip_jax.models.transformer import (stack_layer_names, unstack_layer_names,
                                           unstack_layer_shapes)


def test_layer_names_round_trip():
    flat = {"blocks.stack.attn.to_q.kernel": np.arange(24.0).reshape(3, 2, 4),
            "text.encoder.layers.stack.ln_1.scale": np.ones((2, 5)), "proj_out.bias": np.zeros(3)}
    per_layer = unstack_layer_names(flat)
    assert sorted(per_layer) == sorted(
        ["blocks.0.attn.to_q.kernel", "blocks.1.attn.to_q.kernel", "blocks.2.attn.to_q.kernel",
         "text.encoder.layers.0.ln_1.scale", "text.encoder.layers.1.ln_1.scale",
         "proj_out.bias"])
    np.testing.assert_array_equal(per_layer["blocks.2.attn.to_q.kernel"], flat[
        "blocks.stack.attn.to_q.kernel"][2])
    shapes = {k: v.shape for k, v in flat.items()}
    assert unstack_layer_shapes(shapes) == {k: v.shape for k, v in per_layer.items()}
    back = stack_layer_names(per_layer, shapes)
    assert sorted(back) == sorted(flat)
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k])
    # A missing layer leaves the others under their per-layer names (the caller reports it).
    del per_layer["blocks.1.attn.to_q.kernel"]
    partial = stack_layer_names(per_layer, shapes)
    assert "blocks.stack.attn.to_q.kernel" not in partial and "blocks.0.attn.to_q.kernel" in partial
    # Path tuples work the same way.
    assert list(unstack_layer_shapes({("blocks", "stack", "w"): (2, 3)})) == [
        ("blocks", 0, "w"), ("blocks", 1, "w")]


def test_scanned_and_looped_layers_agree():
    for scan in (True, False):
        cfg = diffusion_prior.get_preset("tiny", num_layers=3, dropout=0.1, scan_layers=scan)
        m = diffusion_prior.DiffusionPrior(cfg, rngs=nnx.Rngs(0))
        b = 2
        args = (jnp.ones((b, 32)), jnp.array([3, 7]), jnp.ones((b, 32)),
                jax.random.normal(jax.random.key(1), (b, 8, 32)))
        fwd = nnx.jit(lambda m, *a: m(*a, deterministic=False, dropout_rng=jax.random.key(2)))
        grad = nnx.jit(nnx.grad(lambda m, *a: jnp.sum(m(*a) ** 2)))
        out = (fwd(m, *args), jax.tree.leaves(nnx.state(grad(m, *args))))
        if scan:
            ref = out
    np.testing.assert_array_equal(out[0], ref[0])  # the forward pass: the same bits
    # Gradients: the same up to float32 rounding (XLA orders the bias / LayerNorm reductions of
    # the backward pass differently inside the scan's loop body than in the unrolled program).
    # (Key biases have a zero gradient up to rounding: compare on the scale of all gradients.)
    scale = max(float(np.abs(v).max()) for v in ref[1])
    for u, v in zip(out[1], ref[1]):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6 * scale)


def test_ar_cache_is_stacked():
    model = ar_prior.ARPrior(ar_prior.get_preset("tiny"), rngs=nnx.Rngs(0))
    k, v = model.init_cache(3)
    cfg = model.config
    assert k.shape == v.shape == (cfg.depth, 3, cfg.seq_len, cfg.heads, cfg.width // cfg.heads)
    assert isinstance(model.blocks, transformer.Stack)
