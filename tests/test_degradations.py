"""Degradations of the upsamplers' conditioning image: blur (first upsampler), BSR (second)."""
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf
from PIL import Image

from unclip_jax.data import bsr as B
from unclip_jax.data import degradations as D


def synthetic_image(size=256, seed=0):
    """Float32 [size, size, 3] in [-1, 1]: gradients, flat shapes, stripes, checkerboard, grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([x, y, 1.0 - 0.5 * (x + y)], -1) * 0.8 + 0.1            # smooth gradients
    disc = (x - 0.3) ** 2 + (y - 0.3) ** 2 < 0.15 ** 2
    img[disc] = [0.86, 0.12, 0.12]                                          # red disc
    img[(np.abs(x - 0.72) < 0.14) & (np.abs(y - 0.3) < 0.14)] = [0.12, 0.27, 0.86]   # square
    stripes = (y > 0.6) & (x < 0.5)
    img[stripes] = (0.5 + 0.45 * np.sin(2 * np.pi * x[stripes] * size / 6.0))[:, None]
    checker = (y > 0.6) & (x >= 0.5)
    img[checker] = (((x[checker] * size // 4) + (y[checker] * size // 4)) % 2)[:, None] * 0.8 + 0.1
    img += rng.normal(0.0, 0.02, img.shape).astype(np.float32)               # fine grain
    return np.clip(img * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


def unit(img):
    return (np.asarray(img, np.float32) + 1.0) / 2.0


def lowpass_corr(a, b):
    """Correlation of two same-size images after a sigma-2 blur (same scene, same alignment)."""
    k = D.gaussian_kernel(9, 2.0)
    lp = lambda x: D.filter2d(np.asarray(x, np.float32), k).numpy().ravel()
    return np.corrcoef(lp(a), lp(b))[0, 1]


def hf(img01):
    return float(D.high_frequency_energy(tf.constant(img01, tf.float32)))


@pytest.fixture(scope="module")
def image():
    return synthetic_image()


# ----------------------------------------------------------------------------- kernels

def test_blur_kernel_is_gaussian_sigma_06():
    k = D.gaussian_kernel(3, 0.6).numpy()
    assert k.shape == (3, 3)
    np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-6)
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * 0.6 ** 2))
    np.testing.assert_allclose(k, np.outer(g, g) / np.outer(g, g).sum(), rtol=1e-6)
    np.testing.assert_allclose(k[1], [0.1664 * 0.6672, 0.6672 ** 2, 0.1664 * 0.6672], atol=1e-4)
    # same filter as scipy's Gaussian truncated at radius 1, edges mirrored
    x = np.random.default_rng(1).uniform(size=(12, 9, 2)).astype(np.float32)
    ref = scipy.ndimage.gaussian_filter(x, (0.6, 0.6, 0), truncate=1.0 / 0.6, mode="mirror")
    np.testing.assert_allclose(D.filter2d(x, k).numpy(), ref, atol=1e-5)
    # a wide kernel has variance sigma^2 along each axis
    k = D.gaussian_kernel(25, 3.0).numpy()
    off = np.arange(-12, 13)
    np.testing.assert_allclose((k.sum(0) * off ** 2).sum(), 9.0, rtol=2e-3)
    # the shifted kernel (downsample2's nearest branch) is centred (sf - 1) / 2 off
    k = D.gaussian_kernel(25, 1.0, shift=1.5).numpy()
    np.testing.assert_allclose([(k.sum(1) * off).sum(), (k.sum(0) * off).sum()], [1.5, 1.5],
                               atol=1e-4)


def test_anisotropic_kernel_covariance():
    theta, l1, l2 = 0.5, 4.0, 1.0
    k = D.anisotropic_gaussian_kernel(25, theta, l1, l2).numpy()
    np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-6)
    dy, dx = np.mgrid[-12:13, -12:13]
    pts = np.stack([dx.ravel(), dy.ravel()], 1).astype(np.float64)
    cov = (pts * k.ravel()[:, None]).T @ pts
    v = np.array([np.cos(theta), np.sin(theta)])
    w = np.array([np.sin(theta), -np.cos(theta)])
    np.testing.assert_allclose(cov, l1 * np.outer(v, v) + l2 * np.outer(w, w), atol=5e-3)
    # a kernel smaller than its static frame is zero outside the size x size centre
    k = D.anisotropic_gaussian_kernel(tf.constant(7), theta, l1, l2, max_size=25).numpy()
    assert np.all(k[:9] == 0) and np.all(k[:, 16:] == 0) and k[12, 12] > 0
    np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- first upsampler

def test_blur_downsample(image):
    out = D.blur_downsample(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == tf.float32
    # = area downsampling (4x4 means) then the 3-tap sigma-0.6 blur with mirrored edges
    area = unit(image).reshape(64, 4, 64, 4, 3).mean((1, 3))
    ref = scipy.ndimage.gaussian_filter(area, (0.6, 0.6, 0), truncate=1.0 / 0.6, mode="mirror")
    np.testing.assert_allclose(unit(out), ref, atol=2e-5)
    assert -1.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0
    plain = B.degrade(image, 64, "none").numpy()
    assert hf(unit(out)) < 0.7 * hf(unit(plain))
    high = D.blur_downsample(image, 64, blur_at="high").numpy()
    assert hf(unit(out)) < hf(unit(high)) < hf(unit(plain))
    # batches, non-square sizes and uint8 keep their layout, dtype and range
    batch = D.blur_downsample(np.stack([image, -image]), (32, 16))
    assert batch.shape == (2, 32, 16, 3)
    u8 = D.blur_downsample(np.round(unit(image) * 255).astype(np.uint8), 64)
    assert u8.dtype == tf.uint8
    assert np.abs(u8.numpy() / 255.0 - unit(out)).max() < 3 / 255
    np.testing.assert_array_equal(B.degrade(image, 64, "blur").numpy(), out.numpy())


# ----------------------------------------------------------------------------- building blocks

def test_noise_jpeg_resize_statistics(image):
    x = unit(image)
    flat = tf.fill([96, 96, 3], 0.5)
    level = 10 / 255
    color = D.gaussian_noise(flat, 1, level, "color").numpy() - 0.5
    np.testing.assert_allclose(color.std(), level, rtol=0.03)
    assert abs(np.corrcoef(color[..., 0].ravel(), color[..., 1].ravel())[0, 1]) < 0.05
    gray = D.gaussian_noise(flat, 1, level, "gray").numpy() - 0.5
    np.testing.assert_allclose(gray.std(), level, rtol=0.03)
    np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-6)
    corr = D.gaussian_noise(flat, 1, level, "correlated").numpy() - 0.5
    assert 0 < corr.std() < 25 / 255
    # white noise of std s adds 20 s^2 to the Laplacian's energy (taps 1, 1, 1, 1, -4)
    gain = hf(D.gaussian_noise(x, 2, level, "color")) - hf(x)
    np.testing.assert_allclose(gain, 20 * level ** 2, rtol=0.2)
    # Poisson: variance = mean / scale on a flat 0.5 image; grey noise is shared by channels
    pois = D.poisson_noise(flat, 3, 100.0).numpy()
    np.testing.assert_allclose(pois.mean(), 0.5, atol=3e-3)
    np.testing.assert_allclose(pois.var(), 0.5 / 100.0, rtol=0.06)
    pg = D.poisson_noise(flat, 3, 100.0, gray=True).numpy()
    np.testing.assert_allclose(pg[..., 0], pg[..., 1], atol=1e-6)
    assert hf(D.poisson_noise(x, 4, 300.0)) > hf(x)
    # JPEG: lower quality, lower PSNR; the result is 8-bit
    p30, p95 = (float(D.psnr(D.jpeg(x, q), x)) for q in (30, 95))
    assert 20.0 < p30 < p95 - 4.0, (p30, p95)
    j = D.jpeg(x, tf.constant(50)).numpy()
    np.testing.assert_allclose(j * 255, np.round(j * 255), atol=1e-3)
    # resizes hit the asked size; 'bicubic_aa' (antialiased) keeps less aliasing than 'bilinear'
    for m in D.RESIZE_METHODS:
        assert D.resize(x, (37, 50), m).shape == (37, 50, 3)
    assert hf(D.resize(x, (64, 64), "bicubic_aa")) < hf(D.resize(x, (64, 64), "bilinear"))
    # mirrored edges work for kernels wider than the image
    tiny = np.random.default_rng(0).uniform(size=(3, 2, 3)).astype(np.float32)
    out = D.filter2d(tiny, D.gaussian_kernel(25, 4.0)).numpy()
    assert out.shape == (3, 2, 3) and np.all(np.isfinite(out))


# ----------------------------------------------------------------------------- BSR

def test_bsr_deterministic_shape_range(image):
    a = B.bsr_degrade(image, 64, 7).numpy()
    assert a.shape == (64, 64, 3) and a.dtype == np.float32
    assert a.min() >= -1.0 and a.max() <= 1.0 and a.std() > 0.1
    np.testing.assert_array_equal(a, B.bsr_degrade(image, 64, 7).numpy())
    np.testing.assert_array_equal(a, B.bsr_degrade(image, 64, tf.constant([7, 0])).numpy())
    others = [B.bsr_degrade(image, 64, s).numpy() for s in (8, [7, 1])]
    for o in others:
        assert np.abs(o - a).mean() > 0.01
    # still the same scene, in place: its low frequencies match the clean downsampled image
    # (0.99 here) far better than a copy shifted by 3 pixels does (0.90)
    clean = B.degrade(image, 64, "none").numpy()
    assert lowpass_corr(a, clean) > 0.97 > 0.93 > lowpass_corr(a, np.roll(clean, 3, 0))
    # uint8 in, uint8 out; batches get one sub-seed per image, each equal to a single call
    u8 = B.bsr_degrade(np.round(unit(image) * 255).astype(np.uint8), 64, 7)
    assert u8.dtype == tf.uint8 and u8.shape == (64, 64, 3)
    small = np.stack([synthetic_image(64, 1), synthetic_image(64, 2)])
    batch = B.bsr_degrade(small, 16, 5).numpy()
    assert batch.shape == (2, 16, 16, 3)
    seeds = tf.random.experimental.stateless_split(tf.constant([5, 0], tf.int64), 2)
    for i in range(2):
        np.testing.assert_array_equal(batch[i], B.bsr_degrade(small[i], 16, seeds[i]).numpy())


def test_bsr_steps_png_strip(image, tmp_path):
    # every optional step switched on, so the strip shows all of them
    steps = B.bsr_steps(image, 64, 11, scale2_prob=1.0, jpeg_prob=1.0, poisson_prob=1.0)
    names = [n for n, _, _ in steps]
    assert names[0] == "input" and names[1] == "downsample1" and names[-1] == "jpeg_final"
    assert sorted(names[2:-1]) == sorted(B.BSR_STEP_NAMES)
    assert names.index("downsample2") < names.index("downsample3")
    np.testing.assert_array_equal(
        steps[-1][2].numpy(),
        B.bsr_degrade(image, 64, 11, scale2_prob=1.0, jpeg_prob=1.0, poisson_prob=1.0).numpy())
    assert steps[1][2].shape == (128, 128, 3)
    prev = unit(steps[1][2])
    seen = set()
    for name, detail, img in steps[2:]:
        cur = unit(img)
        assert detail and detail != "skipped", (name, detail)
        assert cur.min() >= 0.0 and cur.max() <= 1.0
        if name == "downsample2":
            assert cur.shape[0] < prev.shape[0]
        elif name == "downsample3":
            assert cur.shape == (64, 64, 3)
        else:
            assert cur.shape == prev.shape, name
        if name.startswith("blur"):
            assert hf(cur) <= hf(prev) * (1 + 1e-5), (name, detail)
        if name in ("gaussian_noise", "poisson_noise"):
            assert hf(cur) > hf(prev), (name, detail)
        if name.startswith("jpeg"):
            assert 15.0 < float(D.psnr(cur, prev)) < 60.0, (name, detail)
        seen.add(name)
        prev = cur
    assert len(seen) == 8
    # the strip: every stage shown at 256 px (nearest), side by side, written as a PNG
    tiles = [tf.image.resize(unit(x), (256, 256), "nearest") for _, _, x in steps]
    strip = tf.cast(tf.round(tf.concat(tiles, 1) * 255), tf.uint8)
    path = tmp_path / "bsr_steps.png"
    tf.io.write_file(str(path), tf.io.encode_png(strip))
    back = np.asarray(Image.open(path))
    assert back.shape == (256, 256 * len(steps), 3)
    first, last = back[:, :256] / 255.0, back[:, -256:] / 255.0
    np.testing.assert_allclose(first, unit(image), atol=1 / 255 + 1e-6)
    # the final stage is the degraded image: blurrier than the input, but the same scene
    assert hf(last) < hf(first)
    clean = B.degrade(image, 64, "none").numpy()
    assert lowpass_corr(unit(steps[-1][2]), unit(clean)) > 0.95


def test_bsr_random_choices_follow_bsrgan():
    """Frequencies of the random choices over 400 seeds (4-sigma binomial tolerances)."""
    def trace(i):
        x = tf.fill([16, 16, 3], 0.5)
        seed = tf.stack([tf.constant(123, tf.int64), i])
        _, names, details, _ = B._chain(x, (4, 4), 4, seed, 0.25, 0.9, 0.1)
        return names, details

    n = 400
    ds = tf.data.Dataset.range(n).map(trace, num_parallel_calls=2).batch(n)
    all_names, all_details = next(iter(ds))
    names = [[s.decode() for s in row] for row in all_names.numpy()]
    details = [dict(zip(row_n, (s.decode() for s in row_d)))
               for row_n, row_d in zip(names, all_details.numpy())]
    freq = lambda pred: np.mean([pred(d) for d in details])
    tol = lambda p: 4 * np.sqrt(p * (1 - p) / n)
    for p, f in [(0.75, freq(lambda d: d["downsample1"] == "skipped")),
                 (0.1, freq(lambda d: d["jpeg"] == "skipped")),
                 (0.1, freq(lambda d: d["poisson_noise"] != "skipped")),
                 (0.5, freq(lambda d: d["blur1"].startswith("anisotropic"))),
                 (0.75, freq(lambda d: d["downsample2"].startswith("resize"))),
                 (0.4, freq(lambda d: d["gaussian_noise"].startswith("color"))),
                 (0.2, freq(lambda d: d["gaussian_noise"].startswith("correlated")))]:
        assert abs(f - p) < tol(p), (p, f)
    for order in names:
        assert order.index("downsample2") < order.index("downsample3")
    # every other step lands in every position of the shuffle
    pos = {s: {o.index(s) for o in names} for s in B.BSR_STEP_NAMES}
    assert pos["blur1"] == pos["jpeg"] == set(range(1, 8))   # after downsample1
    sizes = {int(d["blur2"].split("k=")[1].split()[0]) for d in details}
    assert sizes == set(range(7, 26, 2))
    levels = {int(d["gaussian_noise"].split("level=")[1].split("/")[0]) for d in details}
    assert min(levels) == 2 and max(levels) == 25


def test_bsr_inside_tf_data_map():
    images = np.stack([synthetic_image(64, s) for s in range(3)])
    ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(images),
                             tf.data.Dataset.counter())
    ds = ds.map(lambda x, i: B.bsr_degrade(x, 16, tf.stack([tf.constant(42, tf.int64), i])),
                num_parallel_calls=2, deterministic=True)
    out = np.stack(list(ds.as_numpy_iterator()))
    assert out.shape == (3, 16, 16, 3)
    eager = np.stack([B.bsr_degrade(images[i], 16, [42, i]).numpy() for i in range(3)])
    np.testing.assert_allclose(out, eager, atol=2e-6)
    assert np.abs(out[0] - out[1]).mean() > 0.01
    # batched elements: one sub-seed per image, as eagerly
    batched = tf.data.Dataset.from_tensor_slices(images[:2]).batch(2, drop_remainder=True)
    got = next(iter(batched.map(lambda x: B.bsr_degrade(x, 16, 9)))).numpy()
    np.testing.assert_allclose(got, B.bsr_degrade(images[:2], 16, 9).numpy(), atol=2e-6)
    # the first upsampler's blur runs there too
    blurred = tf.data.Dataset.from_tensor_slices(images).map(lambda x: B.degrade(x, 16, "blur"))
    np.testing.assert_allclose(np.stack(list(blurred.as_numpy_iterator())),
                               D.blur_downsample(images, 16).numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- bad input

def test_bad_input_errors(image):
    with pytest.raises(ValueError, match="whole multiple"):
        B.bsr_degrade(image, 60, 0)
    with pytest.raises(ValueError, match="channels"):
        B.bsr_degrade(image[..., :2], 64, 0)
    with pytest.raises(ValueError, match="shape \\[2\\]"):
        B.bsr_degrade(image, 64, [1, 2, 3])
    with pytest.raises(ValueError, match="channels last"):
        D.blur_downsample(image[..., 0], 64)
    with pytest.raises(ValueError, match="odd"):
        D.blur_downsample(image, 64, kernel=4)
    with pytest.raises(ValueError, match="pass a seed"):
        B.degrade(image, 64, "bsr")
    with pytest.raises(ValueError, match="'blur', 'bsr' or 'none'"):
        B.degrade(image, 64, "gaussian")

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
    def dynamic(x):
        return B.bsr_degrade(x, 64, 0)
    with pytest.raises(ValueError, match="static height"):
        dynamic.get_concrete_function()
