"""Prior metrics: cosine of sampled z_i against the true z_i, z_t and an unrelated caption's z_i."""
import numpy as np
import pytest

from unclip_jax.evaluate.prior_metrics import cosine, evaluate_prior, prior_cosines, summarise


def test_cosine_values():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = np.array([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    np.testing.assert_allclose(np.asarray(cosine(a, b)), [0.0, 1.0, -1.0], atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        cosine(a, b[:2])


def test_prior_cosines_against_known_answers():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((6, 16)).astype(np.float32)
    text = rng.standard_normal((6, 16)).astype(np.float32)
    # A perfect prior: cos_true 1, the unrelated caption is row b-1 (rolled).
    per = prior_cosines(2.0 * image, image, text)
    np.testing.assert_allclose(np.asarray(per["cos_true"]), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(per["cos_unrelated"]),
                               np.asarray(cosine(image, np.roll(image, 1, axis=0))), atol=1e-6)
    np.testing.assert_allclose(np.asarray(per["cos_text"]), np.asarray(per["cos_text_true"]),
                               atol=1e-6)
    s = summarise(per)
    assert s["margin"] == pytest.approx(s["cos_true"] - s["cos_unrelated"])
    # A prior that returns z_t: cos_text 1 and cos_true equals cos(z_t, z_i).
    per = prior_cosines(text, image, text, unrelated_image_embed=image[::-1])
    np.testing.assert_allclose(np.asarray(per["cos_text"]), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(per["cos_unrelated"]),
                               np.asarray(cosine(text, image[::-1])), atol=1e-6)
    # z_t of another dimension: the text cosines are left out.
    assert "cos_text" not in prior_cosines(image, image, text[:, :8])
    with pytest.raises(ValueError, match="batch of at least 2"):
        prior_cosines(image[:1], image[:1], text[:1])


def test_evaluate_prior_weights_examples_equally():
    rng = np.random.default_rng(1)
    batches = [dict(image_embed=rng.standard_normal((n, 8)).astype(np.float32),
                    text_embed=rng.standard_normal((n, 8)).astype(np.float32)) for n in (2, 6)]
    noisy = lambda b: b["image_embed"] + 0.5 * b["text_embed"]  # noqa: E731
    out = evaluate_prior(noisy, batches)
    assert out["count"] == 8
    per = [prior_cosines(noisy(b), b["image_embed"], b["text_embed"]) for b in batches]
    want = np.concatenate([np.asarray(p["cos_true"]) for p in per]).mean()
    assert out["cos_true"] == pytest.approx(float(want), abs=1e-6)
    assert 0.5 < out["cos_true"] < 1.0 and out["cos_text"] > 0.2
    with pytest.raises(ValueError, match="no batches"):
        evaluate_prior(noisy, [])
