"""Image metrics: Frechet distance against closed forms, FID / FD-CLIP / CLIP score code paths."""
import numpy as np
import pytest
from flax import nnx

from unclip_jax import clip
from unclip_jax.errors import UserError
from unclip_jax.evaluate import image_metrics as im
from unclip_jax.evaluate import inception as inc
from unclip_jax.models.layers import abstract_init
from unclip_jax.io import safetensors


def random_rotation(d, rng):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    got = im.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # Rotating both Gaussians by the same rotation leaves the distance unchanged.
    q = random_rotation(d, rng)
    got_rot = im.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    np.testing.assert_allclose(got_rot, want, rtol=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    np.testing.assert_allclose(im.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]), 9.0 + 1.0)
    # Same covariance (not diagonal): only the means count.
    s = rng.normal(size=(d, d))
    s = s @ s.T + 0.1 * np.eye(d)
    np.testing.assert_allclose(im.frechet_distance(mu1, s, mu2, s), np.sum((mu1 - mu2) ** 2),
                               rtol=1e-7)
    with pytest.raises(UserError, match="covariances"):
        im.frechet_distance(mu1, np.eye(d), mu2[:3], np.eye(3))


def test_identical_and_shifted_features_including_singular_covariance():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(10, 32)) @ rng.normal(size=(32, 32))  # N < D: singular covariance
    mu, sigma = im.feature_stats(feats)
    np.testing.assert_allclose(mu, feats.mean(0))
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False))
    assert np.linalg.matrix_rank(sigma) < 32
    scale = np.trace(sigma)
    same = im.frechet_distance(mu, sigma, mu, sigma)
    assert abs(same) < 1e-6 * scale
    # Permuting the rows changes nothing; shifting one set by delta adds |delta|^2.
    mu_p, sigma_p = im.feature_stats(feats[rng.permutation(10)])
    assert abs(im.frechet_distance(mu_p, sigma_p, mu, sigma)) < 1e-6 * scale
    delta = rng.normal(size=32)
    shifted = im.frechet_distance(*im.feature_stats(feats + delta), mu, sigma)
    np.testing.assert_allclose(shifted, np.sum(delta ** 2), rtol=1e-6, atol=1e-6 * scale)
    with pytest.raises(UserError, match="at least 2 samples"):
        im.feature_stats(feats[:1])


def test_sample_space_formula_matches_sqrtm():
    """fid / fd_clip's exact low-rank path (N <= D) equals pytorch-fid's sqrtm computation."""
    rng = np.random.default_rng(6)
    mix = rng.normal(size=(24, 24))
    for n_a, n_b in ((9, 12), (30, 40)):  # singular covariances; then full rank (sqrtm path)
        fa = rng.normal(size=(n_a, 24)) @ mix
        fb = 0.7 * rng.normal(size=(n_b, 24)) @ mix + 0.3
        want = im.frechet_distance(*im.feature_stats(fa), *im.feature_stats(fb))
        got = im.frechet_distance_features(fa, fb)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(UserError, match="different dimensions"):
        im.frechet_distance_features(fa, fb[:, :3])


def test_fixed_batches_pad_and_regroup():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(7, 4, 5, 3), dtype=np.uint8)
    batches = list(im.fixed_batches(images, 3))
    assert [n for _, n in batches] == [3, 3, 1]
    assert all(b.shape == (3, 4, 5, 3) for b, _ in batches)
    np.testing.assert_array_equal(np.concatenate([b[:n] for b, n in batches]), images)
    # An iterable of uneven batches is regrouped into the same fixed batches.
    again = list(im.fixed_batches(iter([images[:2], images[2:6], images[6:]]), 3))
    for (b1, n1), (b2, n2) in zip(batches, again):
        assert n1 == n2
        np.testing.assert_array_equal(b1[:n1], b2[:n2])
    with pytest.raises(UserError, match="uint8"):
        list(im.fixed_batches(images.astype(np.float32), 3))
    with pytest.raises(UserError, match="one size"):
        list(im.fixed_batches([images, images[:, :3]], 3))


# ----------------------------------------------------------------------------- CLIP metrics

@pytest.fixture(scope="module")
def tiny_clip():
    return clip.CLIP(clip.get_preset("tiny"), rngs=nnx.Rngs(0)), clip.get_tokenizer()


def test_fd_clip_invariances(tiny_clip):
    model, _ = tiny_clip
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(12, 40, 48, 3), dtype=np.uint8)  # resized + cropped to 32
    b = np.clip(a.astype(np.int32) // 2 + rng.integers(0, 128, size=a.shape), 0, 255)
    b = b.astype(np.uint8)

    emb_a = im.clip_image_embeddings(a, model, batch_size=5)  # 5 + 5 + 2 padded
    full = np.asarray(model.encode_image(clip.preprocess_jax(a.astype(np.float32), 32,
                                                             value_range=(0.0, 255.0))))
    np.testing.assert_allclose(emb_a, full, rtol=1e-5, atol=1e-5)

    base = im.fd_clip(a, b, model, batch_size=5)
    scale = np.trace(im.feature_stats(emb_a)[1])
    assert base > 1e-3 * scale
    assert abs(im.fd_clip(a, a, model, batch_size=5)) < 1e-5 * scale
    perm = rng.permutation(12)
    np.testing.assert_allclose(im.fd_clip(a[perm], b, model, batch_size=5), base, rtol=1e-4)
    np.testing.assert_allclose(im.fd_clip(iter([a[:7], a[7:]]), b, model, batch_size=5), base,
                               rtol=1e-4)
    # Moving one set's embeddings further from the other's mean increases the distance.
    emb_b = im.clip_image_embeddings(b, model, batch_size=5)
    mu_a, s_a = im.feature_stats(emb_a)
    mu_b, s_b = im.feature_stats(emb_b)
    np.testing.assert_allclose(im.frechet_distance(mu_a, s_a, mu_b, s_b), base, rtol=1e-4)
    further = im.feature_stats(emb_a + 0.5 * (mu_a - mu_b))
    assert im.frechet_distance(*further, mu_b, s_b) > base
    normed = im.fd_clip(a, b, model, batch_size=5, normalize=True)
    assert 0 < normed < 4.0 * 2  # unit vectors: |mu diff|^2 <= 4 and traces <= 1 each


def test_clip_score(tiny_clip):
    model, tok = tiny_clip
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square at the top", "a green triangle",
                "a yellow square below a purple circle", "a cyan circle " + "very " * 100]
    scores = im.clip_scores(images, captions, model, tok, batch_size=2)
    assert scores.shape == (5,) and np.all(scores >= 0) and np.all(scores <= 100)

    tokens = tok(captions, truncate=True)
    txt, _ = model.encode_text(tokens.ids, tokens.mask)
    img = model.encode_image(clip.preprocess_jax(images.astype(np.float32), 32,
                                                 value_range=(0.0, 255.0)))
    txt, img = np.asarray(txt, np.float64), np.asarray(img, np.float64)
    cos = np.sum(txt * img, -1) / np.linalg.norm(txt, axis=-1) / np.linalg.norm(img, axis=-1)
    np.testing.assert_allclose(scores, np.maximum(100 * cos, 0), rtol=1e-4, atol=1e-3)

    mean = im.clip_score(images, captions, model, tok, batch_size=2)
    np.testing.assert_allclose(mean, scores.mean(), rtol=1e-5)
    perm = rng.permutation(5)  # permuting (image, caption) pairs together changes nothing
    np.testing.assert_allclose(
        im.clip_score(images[perm], [captions[i] for i in perm], model, tok, batch_size=2), mean,
        rtol=1e-5)
    with pytest.raises(UserError, match="one caption per image"):
        im.clip_score(images, captions[:4], model, tok, batch_size=2)


# ----------------------------------------------------------------------------- FID

def random_inception_file(file, seed=0):
    """Random He-scaled weights under pytorch-fid's names, drawn with numpy (initialising the
    JAX module eagerly would compile ~100 random kernels and take far longer)."""
    rng = np.random.default_rng(seed)
    abstract = abstract_init(lambda: inc.InceptionV3(rngs=nnx.Rngs(0)))
    table = inc.name_table(abstract)
    tensors = {}
    for key, var in nnx.state(abstract).flat_state():
        name, shape = table[key][0], var.shape
        if name.endswith("conv.weight"):  # HWIO in our layout -> OIHW in the file
            kh, kw, cin, cout = shape
            w = rng.normal(size=(cout, cin, kh, kw)) * np.sqrt(2.0 / (cin * kh * kw))
        elif name.endswith("running_var") or name.endswith("bn.weight"):
            w = rng.uniform(0.8, 1.2, size=shape)
        else:
            w = rng.uniform(-0.1, 0.1, size=shape)
        tensors[name] = w.astype(np.float32)
    safetensors.write(file, tensors)


def test_fid_with_random_inception_from_file(tmp_path):
    file = str(tmp_path / "fid_inception.safetensors")
    random_inception_file(file)
    model = inc.load_inception(file, input_size=75)
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, size=(5, 48, 64, 3), dtype=np.uint8)
    b = rng.integers(0, 128, size=(5, 48, 64, 3), dtype=np.uint8)

    feats_a = im.inception_features(a, model, batch_size=2)  # 2 + 2 + 1 padded
    assert feats_a.shape == (5, inc.FEATURE_DIM)
    # Each image lands in another batch and slot (and the padded batch) when reversed.
    np.testing.assert_allclose(im.inception_features(a[::-1], model, batch_size=2)[::-1],
                               feats_a, rtol=1e-5, atol=1e-5 * np.abs(feats_a).max())
    feats_b = im.inception_features(b, model, batch_size=2)
    want = im.frechet_distance_features(feats_a, feats_b)

    got = im.fid(a, b, model, batch_size=2)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    scale = np.trace(im.feature_stats(feats_a)[1])
    assert got > 1e-2 * scale  # darker images are far from the others
    assert abs(im.fid(a, a[::-1], model, batch_size=2)) < 1e-5 * scale
