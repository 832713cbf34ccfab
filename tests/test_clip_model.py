"""CLIP NNX model: shapes, causal masking, EOS pooling, logical axes, dtypes, remat, presets."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unclip_jax.clip.model import (CLIP, CLIPConfig, abstract_model, count_params, get_preset,
                                   preset_names)

EOS = 49407


@pytest.fixture(scope="module")
def tiny():
    return CLIP(get_preset("tiny"), rngs=nnx.Rngs(0))


@nnx.jit
def _encode_text(model, ids):
    return model.encode_text(ids)


def _ids(rows, length=12, seed=0):
    """Random token rows with the first EOS at the given positions, EOS-padded after it."""
    ids = np.random.RandomState(seed).randint(1, 49406, (len(rows), length))
    for r, pos in enumerate(rows):
        ids[r, pos:] = EOS
    return jnp.asarray(ids, jnp.int32)


def test_tiny_shapes(tiny):
    cfg = tiny.config
    ids = _ids([3, 7], length=16)  # shorter than the 77-token context is allowed
    pixels = jax.random.normal(jax.random.key(1), (2, cfg.image_size, cfg.image_size, 3))
    text_embeds, hidden = tiny.encode_text(ids)
    assert text_embeds.shape == (2, cfg.embed_dim) and text_embeds.dtype == jnp.float32
    assert hidden.shape == (2, 16, cfg.text_width)
    image_embeds = tiny.encode_image(pixels)
    assert image_embeds.shape == (2, cfg.embed_dim)
    out = tiny(ids, pixels)
    assert set(out) == {"text_embeds", "image_embeds", "logit_scale"}
    np.testing.assert_allclose(out["text_embeds"], text_embeds, rtol=1e-6)
    np.testing.assert_allclose(out["image_embeds"], image_embeds, rtol=1e-6)
    assert out["logit_scale"].shape == ()
    np.testing.assert_allclose(out["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(image_embeds)))


def test_text_is_causal(tiny):
    ids = _ids([10, 11])
    changed = ids.at[:, 6].set(1234)
    _, h1 = _encode_text(tiny, ids)
    _, h2 = _encode_text(tiny, changed)
    np.testing.assert_allclose(h1[:, :6], h2[:, :6], atol=1e-6)
    # Every later position sees the change.
    assert np.all(np.abs(np.asarray(h1[:, 6:] - h2[:, 6:])).max(axis=-1) > 1e-4)


def test_pooling_takes_first_eos(tiny):
    ids = _ids([3, 8])
    embeds, hidden = _encode_text(tiny, ids)
    kernel = tiny.text_projection.kernel[...]
    for row, pos in enumerate([3, 8]):
        np.testing.assert_allclose(embeds[row], hidden[row, pos] @ kernel, rtol=1e-5, atol=1e-6)
    # Not the last EOS, and not position 0.
    assert not np.allclose(embeds[0], hidden[0, -1] @ kernel, atol=1e-4)
    # Right padding behind the EOS does not reach the pooled state (causal mask), and an
    # explicit padding mask does not change it either.
    other_pad = ids.at[:, 10:].set(7)
    np.testing.assert_allclose(_encode_text(tiny, other_pad)[0][1], embeds[1], atol=1e-6)
    mask = (jnp.arange(12)[None] <= jnp.array([[3], [8]])).astype(jnp.int32)
    np.testing.assert_allclose(tiny.encode_text(ids, mask)[0], embeds, atol=1e-5)


def test_eos_rule_first_eos_versus_legacy_argmax():
    # With an added token above the EOS id, "first EOS" and "highest id" disagree.
    ids = np.full((1, 10), 5)
    ids[0, 1] = 2        # the legacy eos id itself plays no part
    ids[0, 3] = 49409    # an added token, the highest id
    ids[0, 6:] = EOS
    for eos, pooled_at in ((EOS, 6), (2, 3)):
        model = CLIP(get_preset("tiny", vocab_size=49410, eos_token_id=eos), rngs=nnx.Rngs(0))
        embeds, hidden = model.encode_text(jnp.asarray(ids))
        kernel = model.text_projection.kernel[...]
        np.testing.assert_allclose(embeds[0], hidden[0, pooled_at] @ kernel, rtol=1e-5,
                                   atol=1e-6)
        other = 3 if pooled_at == 6 else 6
        assert not np.allclose(embeds[0], hidden[0, other] @ kernel, atol=1e-4)


def test_logical_axes(tiny):
    specs = nnx.get_partition_spec(nnx.state(tiny, nnx.Param))
    flat = dict(specs.flat_state())
    get = lambda *p: tuple(flat[p].value)
    block = ("text", "encoder", "layers", "stack")  # stacked layers: a leading "layers" axis
    assert get(*block, "attn", "q_proj", "kernel") == ("layers", "embed", "heads")
    assert get(*block, "attn", "out_proj", "kernel") == ("layers", "heads", "embed")
    assert get(*block, "mlp", "fc1", "kernel") == ("layers", "embed", "mlp")
    assert get(*block, "mlp", "fc2", "kernel") == ("layers", "mlp", "embed")
    assert get("text", "token_embedding") == ("vocab", "embed")
    assert get("vision", "patch_embed", "kernel") == (None, None, "conv_in", "conv_out")
    assert get("visual_projection", "kernel") == ("embed", None)
    params = dict(nnx.state(tiny, nnx.Param).flat_state())
    for path, var in params.items():
        if var.ndim >= 2:  # every matrix-like parameter is annotated with a named axis
            assert any(a is not None for a in flat[path].value), path


def test_bfloat16_compute_close_to_float32(tiny):
    model16 = CLIP(get_preset("tiny", dtype="bfloat16"), rngs=nnx.Rngs(0))
    p32 = jax.tree.leaves(nnx.state(tiny, nnx.Param))
    p16 = jax.tree.leaves(nnx.state(model16, nnx.Param))
    assert all(a.dtype == jnp.float32 for a in p16)  # parameters stay float32
    assert all(np.array_equal(a, b) for a, b in zip(p32, p16))
    ids = _ids([4, 9])
    pixels = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    t16, h16 = _encode_text(model16, ids)
    i16 = nnx.jit(lambda m, x: m.encode_image(x))(model16, pixels)
    assert t16.dtype == jnp.bfloat16 and h16.dtype == jnp.bfloat16 and i16.dtype == jnp.bfloat16
    t32, _ = _encode_text(tiny, ids)
    i32 = tiny.encode_image(pixels)
    for lo, hi in ((t16, t32), (i16, i32)):
        rel = np.linalg.norm(np.asarray(lo, np.float32) - hi) / np.linalg.norm(hi)
        assert rel < 3e-2, rel


def test_remat_same_values_and_gradients():
    ids = _ids([5, 9])
    pixels = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))

    def loss(model):
        out = model(ids, pixels)
        return jnp.sum(out["text_embeds"] ** 2) + jnp.sum(jnp.sin(out["image_embeds"]))

    grads = []
    for remat in (False, True):
        model = CLIP(get_preset("tiny", remat=remat), rngs=nnx.Rngs(0))
        grads.append(nnx.jit(nnx.grad(loss))(model))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _hf_param_count(text: dict, vision: dict, projection_dim: int) -> int:
    import torch
    from transformers import CLIPConfig as HFConfig, CLIPModel
    cfg = HFConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    with torch.device("meta"):  # shapes only, nothing allocated
        model = CLIPModel(cfg)
    return sum(p.numel() for p in model.parameters())


def test_large_preset_parameter_counts():
    vit_l = count_params(get_preset("ViT-L/14"))
    assert vit_l == _hf_param_count(
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, patch_size=14, image_size=224), 768)
    assert abs(vit_l - 427.6e6) < 0.1e6
    vit_h = count_params(get_preset("ViT-H/14"))
    assert vit_h == _hf_param_count(
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, hidden_act="gelu"),
        dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=16, patch_size=14, image_size=224, hidden_act="gelu"), 1024)
    assert abs(vit_h - 986.1e6) < 0.1e6


def test_presets_and_config_validation():
    assert {"tiny", "small", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14-336",
            "ViT-H/14"} <= set(preset_names())
    l336 = get_preset("ViT-L/14-336")
    assert l336.image_size == 336 and l336.num_patches == 576 and l336.vision_mlp == 4096
    assert get_preset("ViT-H/14").activation == "gelu"
    assert get_preset("ViT-B/32").activation == "quick_gelu"
    assert get_preset("tiny", text_layers=3).text_layers == 3
    with pytest.raises(ValueError, match="Known presets"):
        get_preset("ViT-Z/99")
    with pytest.raises(ValueError, match="text_widht"):
        get_preset("tiny", text_widht=3)
    with pytest.raises(ValueError, match="multiple of text_heads"):
        CLIPConfig(text_width=100, text_heads=3)
    with pytest.raises(ValueError, match="patch_size"):
        CLIPConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="activation"):
        CLIPConfig(activation="relu")
    # Shapes of an abstract model are right without allocating anything.
    abstract = abstract_model(get_preset("tiny"))
    assert abstract.vision.position_embedding.shape == (17, 64)


def test_bad_inputs_are_refused(tiny):
    with pytest.raises(ValueError, match="context_length"):
        tiny.encode_text(jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match="NHWC"):
        tiny.encode_image(jnp.zeros((1, 3, 32, 32)))
