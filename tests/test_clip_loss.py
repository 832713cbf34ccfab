"""CLIP contrastive loss against a numpy reference, plus its limiting cases."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.clip.loss import contrastive_loss


def _reference(text, image, logit_scale):
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    i = image / np.linalg.norm(image, axis=1, keepdims=True)
    logits = np.exp(min(logit_scale, math.log(100.0))) * i @ t.T

    def xent(z):
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    n = len(text)
    return (0.5 * (xent(logits) + xent(logits.T)),
            np.mean(logits.argmax(axis=1) == np.arange(n)),
            np.mean(logits.argmax(axis=0) == np.arange(n)))


def test_matches_numpy_reference():
    rs = np.random.RandomState(0)
    text = rs.randn(8, 16).astype(np.float32)
    image = (text + 1.5 * rs.randn(8, 16)).astype(np.float32) * 3.0  # norms must not matter
    for scale in (math.log(1 / 0.07), 1.0):
        loss, metrics = jax.jit(contrastive_loss)(text, image, scale)
        ref_loss, ref_i2t, ref_t2i = _reference(text.astype(np.float64),
                                                image.astype(np.float64), scale)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["accuracy_i2t"], ref_i2t)
        np.testing.assert_allclose(metrics["accuracy_t2i"], ref_t2i)
        np.testing.assert_allclose(metrics["scale"], math.exp(scale), rtol=1e-6)


def test_accuracy_directions_differ():
    # Both images are nearest text 0, so i2t accuracy is 1/2; but each text's nearest image is
    # its own (text 1 is nearer image 1 than image 0), so t2i accuracy is 1.
    text = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    image = np.array([[1.0, 0.05], [0.95, 0.3]], np.float32)
    _, metrics = contrastive_loss(text, image, 2.0)
    _, ref_i2t, ref_t2i = _reference(text, image, 2.0)
    assert (ref_i2t, ref_t2i) == (0.5, 1.0)
    assert float(metrics["accuracy_i2t"]) == 0.5 and float(metrics["accuracy_t2i"]) == 1.0


def test_aligned_embeddings_give_near_zero_loss():
    emb = np.eye(6, 32, dtype=np.float32) * 5.0
    loss, metrics = contrastive_loss(emb, 2.0 * emb, math.log(100.0))
    assert float(loss) < 1e-6
    assert float(metrics["accuracy_i2t"]) == 1.0 and float(metrics["accuracy_t2i"]) == 1.0
    # Random pairs at scale 1 are near the uniform-guess loss log(B).
    rs = np.random.RandomState(1)
    loss, _ = contrastive_loss(rs.randn(64, 32), rs.randn(64, 32), 0.0)
    assert abs(float(loss) - math.log(64)) < 0.1


def test_scale_is_clamped_at_100_and_gradients_flow():
    rs = np.random.RandomState(2)
    text, image = rs.randn(4, 8).astype(np.float32), rs.randn(4, 8).astype(np.float32)
    clamped, m = contrastive_loss(text, image, 10.0)
    at_max, _ = contrastive_loss(text, image, math.log(100.0))
    np.testing.assert_allclose(clamped, at_max, rtol=1e-6)
    np.testing.assert_allclose(m["scale"], 100.0, rtol=1e-5)

    grad = jax.grad(lambda s, t, i: contrastive_loss(t, i, s)[0], argnums=(0, 1, 2))
    g_scale, g_text, g_image = grad(jnp.float32(1.0), jnp.asarray(text), jnp.asarray(image))
    assert float(g_scale) != 0.0
    assert np.all(np.isfinite(g_text)) and np.abs(np.asarray(g_image)).max() > 0
    assert float(grad(jnp.float32(10.0), jnp.asarray(text), jnp.asarray(image))[0]) == 0.0


def test_hard_negatives_join_the_image_to_text_side_and_the_focused_term():
    rs = np.random.RandomState(1)
    text = rs.randn(6, 16).astype(np.float32)
    image = (text + rs.randn(6, 16)).astype(np.float32)
    neg = rs.randn(6, 2, 16).astype(np.float32)
    valid = np.array([[True, True], [False, False], [True, False], [True, True],
                      [False, False], [False, True]])
    scale = 2.0
    loss, m = jax.jit(contrastive_loss, static_argnums=5)(text, image, scale, neg, valid, 0.5)
    # reference: image -> [texts; valid negatives], text -> images unchanged, plus 0.5 x the
    # focused term over the rows with a negative
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    s = math.exp(scale)
    img, t, n = unit(image.astype(np.float64)), unit(text.astype(np.float64)), unit(neg)
    i2t = s * img @ np.concatenate([t, n.reshape(12, 16)[valid.reshape(-1)]]).T
    t2i = (s * img @ t.T).T
    logp = lambda z: z - z.max(1, keepdims=True) - np.log(  # noqa: E731
        np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    base = 0.5 * (-np.mean(np.diag(logp(i2t)[:, :6])) - np.mean(np.diag(logp(t2i))))
    pos, own = s * np.sum(img * t, 1), s * np.einsum("bd,bkd->bk", img, n)
    focused = [-logp(np.array([[pos[i]] + list(own[i][valid[i]])]))[0, 0]
               for i in range(6) if valid[i].any()]
    np.testing.assert_allclose(loss, base + 0.5 * np.mean(focused), rtol=1e-5)
    np.testing.assert_allclose(m["negative_loss"], np.mean(focused), rtol=1e-5)
    beats = (pos[:, None] > own)[valid]
    np.testing.assert_allclose(m["negative_accuracy"], beats.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["negative_fraction"], 6 / 12)
    # no valid negative: exactly the plain loss, whatever the weight
    none, _ = contrastive_loss(text, image, scale, neg, np.zeros((6, 2), bool), 3.0)
    plain, _ = contrastive_loss(text, image, scale)
    np.testing.assert_allclose(none, plain, rtol=1e-6)


def test_clip_stage_loss_with_hard_negative_captions():
    """The CLIP stage reads negative_tokens / negative_mask when input.negative_captions is set,
    encodes them with the text tower, and rows without a negative change nothing."""
    import ml_collections
    from flax import nnx

    from unclip_jax.clip.model import CLIP, get_preset
    from unclip_jax.train import clip_stage
    model = CLIP(get_preset("tiny"), rngs=nnx.Rngs(0))
    c = ml_collections.ConfigDict({"input": {"negative_captions": "shapes"}})
    assert clip_stage.STAGE.batch_keys(c)[-2:] == ("negative_tokens", "negative_mask")
    assert "negative_tokens" not in clip_stage.STAGE.batch_keys(
        ml_collections.ConfigDict({"input": {"negative_captions": ""}}))
    rs = np.random.RandomState(0)
    size = model.config.image_size
    tokens = rs.randint(1, 400, (4, 8)).astype(np.int32)
    neg_mask = np.zeros((4, 3, 8), bool)
    neg_mask[0, :] = neg_mask[2, 1] = True
    batch = {"image": rs.uniform(-1, 1, (4, size, size, 3)).astype(np.float32),
             "text_tokens": tokens, "text_mask": np.ones((4, 8), bool),
             "negative_tokens": np.stack([tokens[:, ::-1], np.roll(tokens, 1, axis=1),
                                          np.roll(tokens, 2, axis=1)], 1),
             "negative_mask": neg_mask}
    plain, m0 = clip_stage.make_loss_fn(False)(model, batch, None)
    with_neg, m1 = clip_stage.make_loss_fn(True, 0.0)(model, batch, None)
    focused, m2 = clip_stage.make_loss_fn(True, 2.0)(model, batch, None)
    assert "negative_accuracy" not in m0
    np.testing.assert_allclose(m1["negative_fraction"], 4 / 12, rtol=1e-6)
    assert float(with_neg) > float(plain)          # four more texts to tell apart
    np.testing.assert_allclose(focused, with_neg + 2.0 * m2["negative_loss"], rtol=1e-5)
    batch["negative_mask"][:] = False
    none, _ = clip_stage.make_loss_fn(True, 2.0)(model, batch, None)
    np.testing.assert_allclose(none, plain, rtol=1e-6)


def test_clip_stage_refuses_a_bad_negative_weight():
    import ml_collections
    import pytest

    from unclip_jax.train import clip_stage
    clip_stage.check_settings(ml_collections.ConfigDict({"negative_weight": 0.0}))
    for bad in (-1.0, float("nan"), "x", True):
        with pytest.raises(clip_stage.StageConfigError, match="negative_weight must be"):
            clip_stage.check_settings(ml_collections.ConfigDict({"negative_weight": bad}))
