"""CLIP preprocessing against transformers' CLIPImageProcessor (PIL backend).

Both resize with the same PIL bicubic call on uint8 images, so the outputs differ only by float
rounding in rescale/normalise: the tolerance is 1e-5 (in normalised units, where one uint8 step
is about 0.015).
"""
import jax
import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from unclip_jax.clip.preprocess import OPENAI_MEAN, OPENAI_STD, preprocess, preprocess_jax

SIZE = 32
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    proc = CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                 crop_size={"height": SIZE, "width": SIZE})
    assert tuple(proc.image_mean) == pytest.approx(OPENAI_MEAN)
    assert tuple(proc.image_std) == pytest.approx(OPENAI_STD)

    def run(images):
        out = proc(images=images, return_tensors="np")["pixel_values"]
        return np.asarray(out).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    return run


def _rand(*shape, seed=0):
    return np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)


def test_mixed_sizes_match_reference(reference):
    # Landscape, portrait, square, already-short: exercises resize rounding and the crop offset.
    images = [_rand(40, 61, 3, seed=1), _rand(77, 50, 3, seed=2), _rand(33, 33, 3, seed=3),
              _rand(32, 45, 3, seed=4), _rand(300, 200, 3, seed=5)]
    ours = preprocess(images, image_size=SIZE)
    assert ours.shape == (5, SIZE, SIZE, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference(images), atol=ATOL)
    pil = [Image.fromarray(x) for x in images]
    np.testing.assert_allclose(preprocess(pil, image_size=SIZE), ours, atol=ATOL)


def test_uint8_batch(reference):
    batch = _rand(3, 48, 64, 3, seed=6)
    ours = preprocess(batch, image_size=SIZE)
    np.testing.assert_allclose(ours, reference(list(batch)), atol=ATOL)
    # Channel means land near 0 for uniform noise only after normalisation: a sanity check that
    # the mean/std are applied per channel in RGB order.
    expected = (0.5 - np.asarray(OPENAI_MEAN)) / np.asarray(OPENAI_STD)
    np.testing.assert_allclose(ours.mean(axis=(0, 1, 2)), expected, atol=0.1)


def test_greyscale_and_rgba_become_rgb(reference):
    grey = _rand(50, 40, seed=7)
    rgba = _rand(50, 40, 4, seed=8)
    for image in (grey[..., None], rgba, Image.fromarray(grey),
                  Image.fromarray(rgba, "RGBA"), Image.fromarray(grey).convert("P")):
        ours = preprocess([image], image_size=SIZE)
        assert ours.shape == (1, SIZE, SIZE, 3)
        np.testing.assert_allclose(ours, reference([image]), atol=ATOL)
    # A 2-D array is greyscale too (transformers refuses it inside a list; we accept it).
    np.testing.assert_allclose(preprocess(grey, SIZE), preprocess([grey[..., None]], SIZE),
                               atol=0)
    # Greyscale: the three channels carry the same value before normalisation.
    x = preprocess(grey, SIZE) * np.asarray(OPENAI_STD) + np.asarray(OPENAI_MEAN)
    np.testing.assert_allclose(x[..., 0], x[..., 2], atol=1e-5)
    # Fully transparent pixels are white, not black.
    clear = np.zeros((40, 40, 4), np.uint8)
    white = (1.0 - np.asarray(OPENAI_MEAN)) / np.asarray(OPENAI_STD)
    np.testing.assert_allclose(preprocess(clear, SIZE)[0, 5, 5], white, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((1, 40, 40, 3), np.float32))
    with pytest.raises(ValueError, match="channels last"):
        preprocess([np.zeros((3, 40, 40), np.uint8)])
    with pytest.raises(ValueError, match="empty list"):
        preprocess([])


def test_device_version_close_to_host_version():
    yy, xx = np.mgrid[0:90, 0:120]
    smooth = np.stack([127 + 120 * np.sin(xx / 9.0), 127 + 120 * np.cos(yy / 7.0),
                       127 + 100 * np.sin((xx + yy) / 13.0)], -1).round().astype(np.uint8)
    host = preprocess(smooth[None], SIZE)
    device = jax.jit(lambda x: preprocess_jax(x, SIZE))(smooth[None] / 127.5 - 1.0)
    assert device.shape == host.shape
    # Different bicubic implementations (PIL on uint8 vs jax.image.resize on floats).
    assert np.abs(np.asarray(device) - host).max() < 0.03
