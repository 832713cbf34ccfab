"""Degradations of the upsamplers' low-resolution conditioning image (training only).

The paper corrupts the conditioning image of each upsampler while it trains, so that at sampling
time the upsampler forgives the artefacts of the stage below it:

  * 64 -> 256: Gaussian blur, kernel 3, sigma 0.6 (`blur_downsample`).
  * 256 -> 1024: the BSR degradation of BSRGAN (Zhang et al. 2021), a randomly shuffled chain
    of blurs, resizes, noises and JPEG compression (`bsr_degrade`, `bsr_steps`; see bsr.py for
    the chain and its probabilities).

Where they run: in the tf.data input pipeline, as TensorFlow ops. JPEG compression is the reason
(TensorFlow has a JPEG codec with a tensor-valued quality; XLA has none), and the low-resolution
image is small, so degrading it on the host costs the accelerator nothing. All randomness comes
from `tf.random.stateless_*` ops driven by an explicit seed, so a degradation is a pure function
of (image, seed): the same seed gives the same result, in eager mode and inside
`tf.data.Dataset.map` alike, and a pipeline that derives each element's seed from (base seed,
element index) is reproducible and resumable. Give each element its own seed, e.g.

    ds = tf.data.Dataset.zip(images, tf.data.Dataset.counter())
    ds = ds.map(lambda x, i: bsr_degrade(x, 64, tf.stack([base_seed, i])))

The bicubic upsampling of the degraded image back to the target size (the upsampler's
conditioning input) is `unclip_jax.models.upsampler.resize_low_res`, a JAX function meant for the
device: the host sends the small image, the device enlarges it (torch's / diffusers' bicubic).

Images: one image [H, W, C] or a batch [B, H, W, C] (NHWC), either float (taken to be in
[-1, 1], the models' range) or uint8 ([0, 255]). Every function returns the dtype and range it was
given (float results are clipped to [-1, 1]). Inside, the ops work on float32 in [0, 1], the
range BSRGAN's constants are stated in.

Public API
  blur_downsample(image, low_res, sigma=0.6, kernel=3, method='area', blur_at='low')
  bsr_degrade(image, low_res, seed, **probabilities)          (bsr.py)
  bsr_steps(image, low_res, seed, **probabilities)            (bsr.py) each named step
  degrade(image, low_res, kind='blur'|'bsr'|'none', seed=None, **kw)   (bsr.py) dispatch
Building blocks (TensorFlow, float32 in [0, 1], used by the chain and handy in tests)
  gaussian_kernel(size, sigma, shift=0.0, max_size=None)
  anisotropic_gaussian_kernel(size, theta, l1, l2, max_size=None)
  filter2d(image, kernel)                        'mirror' edges (d c b | a b c d | c b a)
  resize(image, size, method)                    RESIZE_METHODS, no antialias except 'bicubic_aa'
  gaussian_noise(image, seed, level, kind)       kind in NOISE_KINDS, level in [0, 1] units
  poisson_noise(image, seed, scale, gray)
  jpeg(image, quality)
  high_frequency_energy(image), psnr(a, b)       statistics used by the tests
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

RESIZE_METHODS = ("bilinear", "bicubic", "area", "bicubic_aa")
NOISE_KINDS = ("color", "gray", "correlated")


# ----------------------------------------------------------------------------- input handling

def _size_pair(size, what: str = "low_res") -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or a pair (height, width) of ints, "
                         f"got {size!r}.") from None
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive, got {(h, w)}.")
    return h, w


def _check_image(image, what: str) -> tf.Tensor:
    image = tf.convert_to_tensor(image)
    if image.shape.rank not in (3, 4):
        raise ValueError(f"{what}: expected one image [H, W, C] or a batch [B, H, W, C] "
                         f"(channels last), got shape {image.shape}.")
    if not (image.dtype.is_floating or image.dtype == tf.uint8):
        raise ValueError(f"{what}: expected a float image in [-1, 1] or a uint8 image, "
                         f"got dtype {image.dtype.name}.")
    return image


def to_unit(image: tf.Tensor) -> tf.Tensor:
    """float in [-1, 1] or uint8 -> float32 in [0, 1]."""
    if image.dtype == tf.uint8:
        return tf.cast(image, tf.float32) / 255.0
    return tf.clip_by_value((tf.cast(image, tf.float32) + 1.0) * 0.5, 0.0, 1.0)


def from_unit(x: tf.Tensor, dtype) -> tf.Tensor:
    """float32 in [0, 1] -> `dtype` (uint8 rounded, float in [-1, 1])."""
    x = tf.clip_by_value(x, 0.0, 1.0)
    if dtype == tf.uint8:
        return tf.cast(tf.round(x * 255.0), tf.uint8)
    return tf.cast(x * 2.0 - 1.0, dtype)


def as_seed(seed) -> tf.Tensor:
    """An int, a scalar int tensor or a [2] int tensor -> a [2] int64 stateless seed."""
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer:
        raise ValueError(f"seed must be an integer or a pair of integers, got dtype "
                         f"{seed.dtype.name}.")
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 0:
        return tf.stack([seed, tf.constant(0, tf.int64)])
    if seed.shape.as_list() != [2]:
        raise ValueError(f"seed must be a scalar or have shape [2] (a tf.random stateless "
                         f"seed), got shape {seed.shape}.")
    return seed


# ----------------------------------------------------------------------------- kernels, filtering

def _kernel_grid(size, max_size):
    """Offsets (dy, dx) of a [max_size, max_size] grid and the mask of the central size x size."""
    r = (max_size - 1) // 2
    offs = tf.range(-r, r + 1, dtype=tf.float32)
    dy, dx = tf.meshgrid(offs, offs, indexing="ij")
    half = (tf.cast(size, tf.float32) - 1.0) / 2.0
    inside = tf.logical_and(tf.abs(dy) <= half, tf.abs(dx) <= half)
    return dy, dx, inside


def _normalised(logk, inside):
    logk = tf.where(inside, logk, -np.inf)
    logk = logk - tf.reduce_max(logk)
    k = tf.where(inside, tf.exp(logk), 0.0)
    return k / tf.reduce_sum(k)


def _max_size(size, max_size):
    if max_size is None:
        if not isinstance(size, (int, np.integer)):
            raise ValueError("kernel size is a tensor: give max_size (a static odd int).")
        max_size = int(size)
    if max_size % 2 != 1:
        raise ValueError(f"kernel sizes must be odd, got {max_size}.")
    return max_size


def gaussian_kernel(size, sigma, shift=0.0, max_size: int | None = None) -> tf.Tensor:
    """Isotropic Gaussian kernel [size, size] summing to 1 (MATLAB fspecial('gaussian')).

    `size` (odd) and `sigma` may be tensors; the kernel is then embedded, centred, in a
    [max_size, max_size] array of zeros (same filter, static shape). `shift` moves the centre
    by that many pixels down and right (BSRGAN's shifted kernel before strided downsampling).
    """
    max_size = _max_size(size, max_size)
    dy, dx, inside = _kernel_grid(size, max_size)
    sigma = tf.maximum(tf.cast(sigma, tf.float32), 1e-3)
    shift = tf.cast(shift, tf.float32)
    logk = -((dy - shift) ** 2 + (dx - shift) ** 2) / (2.0 * sigma ** 2)
    return _normalised(logk, inside)


def anisotropic_gaussian_kernel(size, theta, l1, l2, max_size: int | None = None) -> tf.Tensor:
    """Anisotropic Gaussian kernel [size, size] summing to 1 (BSRGAN's anisotropic_Gaussian).

    Covariance V diag(l1, l2) V with V the reflection [[cos t, sin t], [sin t, -cos t]]: `l1` is
    the variance (pixels^2) along the direction at angle `theta` (x towards y), `l2` across it.
    Variances are floored at 1e-6 (BSRGAN can draw 0, a singular covariance).
    """
    max_size = _max_size(size, max_size)
    dy, dx, inside = _kernel_grid(size, max_size)
    theta = tf.cast(theta, tf.float32)
    l1 = tf.maximum(tf.cast(l1, tf.float32), 1e-6)
    l2 = tf.maximum(tf.cast(l2, tf.float32), 1e-6)
    c, s = tf.cos(theta), tf.sin(theta)
    # coordinates along / across the principal direction; inverse covariance is diagonal there.
    along = c * dx + s * dy
    across = s * dx - c * dy
    logk = -0.5 * (along ** 2 / l1 + across ** 2 / l2)
    return _normalised(logk, inside)


def _mirror_indices(n, pad):
    """Indices of a length-n axis padded by `pad` on both sides, mirrored about the edge pixels
    (scipy.ndimage mode 'mirror'), for any pad (also pad >= n)."""
    i = tf.range(-pad, n + pad)
    period = tf.maximum(2 * (n - 1), 1)
    i = tf.math.floormod(i, period)
    return tf.where(i >= n, period - i, i)


def filter2d(image, kernel) -> tf.Tensor:
    """Correlate every channel of `image` ([H, W, C] or [B, H, W, C], float) with `kernel`
    ([k, k], k odd, static), edges mirrored. A symmetric kernel gives a convolution."""
    image = tf.convert_to_tensor(image)
    kernel = tf.convert_to_tensor(kernel, tf.float32)
    k = kernel.shape[0]
    if kernel.shape.rank != 2 or k is None or kernel.shape[1] != k or k % 2 != 1:
        raise ValueError(f"filter2d: the kernel must be square with a static odd size, got "
                         f"shape {kernel.shape}.")
    single = image.shape.rank == 3
    x = image[None] if single else image
    pad = k // 2
    shape = tf.shape(x)
    x = tf.gather(x, _mirror_indices(shape[1], pad), axis=1)
    x = tf.gather(x, _mirror_indices(shape[2], pad), axis=2)
    channels = image.shape[-1]
    w = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    y = tf.nn.depthwise_conv2d(tf.cast(x, tf.float32), w, [1, 1, 1, 1], "VALID")
    return y[0] if single else y


def resize(image, size, method: str) -> tf.Tensor:
    """Resize to `size` (h, w; may be tensors) with one of RESIZE_METHODS, as OpenCV's
    cv2.resize does it for 'bilinear' / 'bicubic' / 'area' (no antialiasing when shrinking);
    'bicubic_aa' is antialiased bicubic (MATLAB imresize, BSRGAN's util.imresize_np)."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}, got {method!r}.")
    if method == "bicubic_aa":
        return tf.image.resize(image, size, "bicubic", antialias=True)
    return tf.image.resize(image, size, method, antialias=False)


# ----------------------------------------------------------------------------- noises, JPEG

def gaussian_noise(image, seed, level, kind: str = "color", correlated_level=25.0 / 255.0):
    """Add zero-mean Gaussian noise to `image` (float32 [H, W, 3] in [0, 1]) and clip.

    kind 'color': independent per channel, std `level`; 'gray': one field shared by all
    channels, std `level`; 'correlated': colour noise with the random covariance
    correlated_level^2 U^T D U (U a random rotation, D random diagonal in [0, 1]), as BSRGAN's
    third branch (which ignores `level` there). BSRGAN takes elementwise |.| of that covariance;
    we keep it as is, positive semi-definite, so it can be sampled exactly.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}.")
    s = tf.random.experimental.stateless_split(as_seed(seed), 3)
    shape = tf.shape(image)
    level = tf.cast(level, tf.float32)
    if kind == "color":
        noise = tf.random.stateless_normal(shape, s[0]) * level
    elif kind == "gray":
        noise = tf.random.stateless_normal(tf.concat([shape[:-1], [1]], 0), s[0]) * level
    else:
        d = tf.random.stateless_uniform([3], s[1])
        _, u, _ = tf.linalg.svd(tf.random.stateless_uniform([3, 3], s[2]))
        # rows z [.., 3] with cov I; z @ A has cov A^T A = U^T D U * L^2 for A = L sqrt(D) U.
        a = correlated_level * tf.sqrt(d)[:, None] * u
        noise = tf.tensordot(tf.random.stateless_normal(shape, s[0]), a, axes=1)
    return tf.clip_by_value(image + noise, 0.0, 1.0)


def poisson_noise(image, seed, scale, gray: bool = False):
    """Poisson ("shot") noise as BSRGAN's add_Poisson_noise: the image quantised to 8 bits,
    counts ~ Poisson(image * scale), result counts / scale (per channel), or, with `gray`,
    the Poisson noise of the luma added to every channel. Clipped to [0, 1]."""
    scale = tf.cast(scale, tf.float32)
    image = tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0) / 255.0
    seed = as_seed(seed)
    if not gray:
        out = tf.random.stateless_poisson(tf.shape(image), seed, image * scale,
                                          dtype=tf.float32) / scale
    else:
        luma = tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), -1)
        luma = tf.round(tf.clip_by_value(luma, 0.0, 1.0) * 255.0) / 255.0
        noise = tf.random.stateless_poisson(tf.shape(luma), seed, luma * scale,
                                            dtype=tf.float32) / scale - luma
        out = image + noise[..., None]
    return tf.clip_by_value(out, 0.0, 1.0)


def jpeg(image, quality):
    """JPEG-compress and decode `image` (float32 [H, W, 1 or 3] in [0, 1]) at `quality`
    (int, may be a tensor, 0..100). The image is rounded to 8 bits first, as BSRGAN does."""
    image8 = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)
    out = tf.image.adjust_jpeg_quality(image8, tf.cast(quality, tf.int32))
    return tf.cast(out, tf.float32) / 255.0


# ----------------------------------------------------------------------------- statistics

_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)


def high_frequency_energy(image) -> tf.Tensor:
    """Mean squared response to the discrete Laplacian (high-frequency energy) of a float image."""
    return tf.reduce_mean(filter2d(tf.cast(image, tf.float32), _LAPLACIAN) ** 2)


def psnr(a, b, max_value: float = 1.0) -> tf.Tensor:
    """Peak signal-to-noise ratio in dB of two float images of the same shape."""
    mse = tf.reduce_mean((tf.cast(a, tf.float32) - tf.cast(b, tf.float32)) ** 2)
    return 10.0 * tf.math.log(max_value ** 2 / mse) / math.log(10.0)


# ----------------------------------------------------------------------------- first upsampler

def blur_downsample(image, low_res, sigma: float = 0.6, kernel: int = 3, method: str = "area",
                    blur_at: str = "low") -> tf.Tensor:
    """The first upsampler's conditioning image: downsample to `low_res` and blur.

    image: [H, W, C] or [B, H, W, C], float in [-1, 1] or uint8; low_res: int or (h, w).
    A Gaussian blur of `kernel` x `kernel` taps with std `sigma` (paper: 3, 0.6), edges
    mirrored. `blur_at='low'` (default) blurs the downsampled image, which is the conditioning
    image the paper says it corrupts; 'high' blurs before downsampling (with a 4x reduction a
    3-tap blur then has almost no effect). `method` is the downsampling filter (RESIZE_METHODS;
    'area' averages whole pixels, as the data pipeline makes the lower cascade stages).
    Deterministic; returns the input's dtype and range.
    """
    image = _check_image(image, "blur_downsample")
    size = _size_pair(low_res)
    if blur_at not in ("low", "high"):
        raise ValueError(f"blur_at must be 'low' or 'high', got {blur_at!r}.")
    if not (isinstance(kernel, (int, np.integer)) and kernel >= 1 and kernel % 2 == 1):
        raise ValueError(f"kernel must be a positive odd int, got {kernel!r}.")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}.")
    k = gaussian_kernel(int(kernel), float(sigma))
    x = to_unit(image)
    if blur_at == "high":
        x = filter2d(x, k)
    x = resize(x, size, method)
    if blur_at == "low":
        x = filter2d(x, k)
    return from_unit(x, image.dtype)


__all__ = [
    "RESIZE_METHODS", "NOISE_KINDS",
    "blur_downsample",
    "gaussian_kernel", "anisotropic_gaussian_kernel", "filter2d", "resize", "gaussian_noise",
    "poisson_noise", "jpeg", "high_frequency_energy", "psnr", "to_unit", "from_unit", "as_seed",
]
