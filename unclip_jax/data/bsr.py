"""The BSR degradation (BSRGAN, Zhang et al. 2021), as TensorFlow ops with a stateless seed.

The second upsampler (256 -> 1024) is trained with its low-resolution input degraded this way.
We follow `degradation_bsrgan` of BSRGAN's utils_blindsr.py (also latent-diffusion's
`degradation_bsrgan_variant`); numbers are for images in [0, 1], sf = input size / low_res:

  0. downsample1 (only when sf == 4), p = 0.25 (scale2_prob): halve the size, then sf = 2.
     Half the time with a random cv2-style interpolation (bilinear / bicubic / area), half the
     time with antialiased bicubic (MATLAB imresize).
  Then the seven steps below in a uniformly random order, except that downsample2 always comes
  before downsample3 (their positions are swapped if drawn the other way round):
  1. blur   } each: p = 0.5 anisotropic Gaussian, covariance eigenvalues l1, l2 ~ U(0, 4 + sf)
  2. blur   } (variances), angle ~ U(0, pi); else isotropic, sigma ~ U(0, 2 + 0.2 sf);
              kernel size 2 * randint(2, 11) + 3 (7..25), edges mirrored.
  3. downsample2: p = 0.75 resize by 1 / sf1, sf1 ~ U(1, 2 sf), random interpolation
     (bilinear / bicubic / area); else blur with a 25-tap Gaussian, sigma ~ U(0.1, 0.6 sf),
     shifted by (sf - 1) / 2 pixels, and keep every sf-th pixel (nearest downsampling).
  4. downsample3: resize to the target low resolution, random interpolation (bilinear /
     bicubic / area). (This is the "final resize": after it only blur, noise, JPEG follow.)
  5. gaussian_noise: level ~ randint(2, 25) / 255; p = 0.4 colour (channel-independent) noise
     of std level, p = 0.4 grey noise (one field for all channels), p = 0.2 correlated colour
     noise with covariance (25 / 255)^2 U^T D U (U random rotation, D ~ U(0, 1)^3).
  6. jpeg: p = 0.9 (jpeg_prob): JPEG at quality randint(30, 95).
  7. poisson_noise: p = 0.1 (poisson_prob): Poisson noise at scale 10^U(2, 4), per channel or
     (half the time) on the luma. BSRGAN's slot 7 is camera-sensor noise through a learned ISP
     model, which it skips when no model is given (always, in released code); we put its
     Poisson noise there, with the probability BSRGAN's extended model (degradation_bsrgan_plus)
     gives it.
  8. jpeg_final: always, JPEG at quality randint(30, 95).
The image is clipped to [0, 1] after every resize and noise. Differences from BSRGAN: resizes are
tf.image.resize (bicubic uses a = -0.5 where OpenCV uses -0.75); the shifted kernel is an exact
shifted Gaussian, not a bilinear interpolation of one; BSRGAN's random crop at the end is left to
the input pipeline (crop before degrading); the input must be an exact multiple of `low_res`.

All draws are `tf.random.stateless_*` from sub-seeds of the one `seed` (one sub-seed per step),
so the result is a pure function of (image, seed), identical in eager mode and in tf.data.
Cost: about 30 ms per 256x256 -> 64x64 image on one CPU core (graph mode, inside tf.data);
tracing the graph takes a few seconds once.

`degrade` dispatches on the config string of the input pipeline: 'blur' (the first upsampler's
`degradations.blur_downsample`), 'bsr' or 'none'.
"""
from __future__ import annotations

import math

import tensorflow as tf

from . import degradations as _d

BSR_STEP_NAMES = ("blur1", "blur2", "downsample2", "downsample3", "gaussian_noise", "jpeg",
                  "poisson_noise")
"""The seven shuffled steps, by index; `bsr_steps` also reports 'input', 'downsample1' and
'jpeg_final'."""

_MAX_KERNEL = 25          # largest blur kernel BSRGAN draws (2 * 11 + 3), also downsample2's
_CV2_METHODS = ("bilinear", "bicubic", "area")   # random.choice([1, 2, 3]) in cv2 constants


def _fmt(x, precision=2):
    return tf.strings.as_string(tf.cast(x, tf.float32), precision=precision)


def _int_str(x):
    return tf.strings.as_string(tf.cast(x, tf.int32))


def _random_resize(img, size, idx, methods=_CV2_METHODS):
    branches = [lambda m=m: _d.resize(img, size, m) for m in methods]
    out = tf.switch_case(tf.cast(idx, tf.int32), branches)
    out = tf.clip_by_value(out, 0.0, 1.0)
    return out, tf.gather(tf.constant(methods), idx)


def _ensure(img, channels):
    return tf.ensure_shape(img, [None, None, channels])


# ----------------------------------------------------------------------------- the steps
# Each takes (img [h, w, C] float32 in [0, 1], seed [2], sf float32 scalar) and returns
# (img, detail: a tf.string saying what it drew).

def _blur(img, seed, sf):
    s = tf.random.experimental.stateless_split(seed, 2)
    u = tf.random.stateless_uniform([4], s[0])
    ksize = 2 * tf.random.stateless_uniform([], s[1], 2, 12, tf.int32) + 3
    wd2 = 4.0 + sf
    wd = 2.0 + 0.2 * sf
    aniso = u[0] < 0.5

    def anisotropic():
        l1, l2, theta = wd2 * u[1], wd2 * u[2], u[3] * math.pi
        k = _d.anisotropic_gaussian_kernel(ksize, theta, l1, l2, max_size=_MAX_KERNEL)
        detail = tf.strings.join(["anisotropic k=", _int_str(ksize), " l1=", _fmt(l1),
                                  " l2=", _fmt(l2), " theta=", _fmt(theta)])
        return k, detail

    def isotropic():
        sigma = wd * u[1]
        k = _d.gaussian_kernel(ksize, sigma, max_size=_MAX_KERNEL)
        return k, tf.strings.join(["isotropic k=", _int_str(ksize), " sigma=", _fmt(sigma)])

    k, detail = tf.cond(aniso, anisotropic, isotropic)
    k = tf.ensure_shape(k, [_MAX_KERNEL, _MAX_KERNEL])
    return _d.filter2d(img, k), detail


def _downsample2(img, seed, sf):
    u = tf.random.stateless_uniform([4], seed)
    shape = tf.shape(img)
    h, w = shape[0], shape[1]

    def by_resize():
        sf1 = 1.0 + u[1] * (2.0 * sf - 1.0)
        size = tf.stack([tf.maximum(tf.cast(tf.cast(h, tf.float32) / sf1, tf.int32), 1),
                         tf.maximum(tf.cast(tf.cast(w, tf.float32) / sf1, tf.int32), 1)])
        idx = tf.minimum(tf.cast(u[2] * 3.0, tf.int32), 2)
        out, method = _random_resize(img, size, idx)
        return out, tf.strings.join(["resize 1/", _fmt(sf1), " ", method])

    def by_shifted_kernel():
        sigma = 0.1 + u[1] * (0.6 * sf - 0.1)
        k = _d.gaussian_kernel(_MAX_KERNEL, sigma, shift=(sf - 1.0) / 2.0)
        stride = tf.cast(tf.round(sf), tf.int32)
        out = _d.filter2d(img, k)[::stride, ::stride]
        return (tf.clip_by_value(out, 0.0, 1.0),
                tf.strings.join(["shifted gaussian sigma=", _fmt(sigma), " nearest 1/",
                                 _int_str(stride)]))

    return tf.cond(u[0] < 0.75, by_resize, by_shifted_kernel)


def _make_downsample3(low_hw):
    def downsample3(img, seed, sf):
        del sf
        idx = tf.random.stateless_uniform([], seed, 0, 3, tf.int32)
        out, method = _random_resize(img, tf.constant(low_hw), idx)
        return out, tf.strings.join(["resize to ", _int_str(low_hw[0]), "x",
                                     _int_str(low_hw[1]), " ", method])
    return downsample3


def _gaussian_noise(img, seed, sf):
    del sf
    s = tf.random.experimental.stateless_split(seed, 3)
    level = tf.cast(tf.random.stateless_uniform([], s[0], 2, 26, tf.int32), tf.float32) / 255.0
    r = tf.random.stateless_uniform([], s[1])
    kind = tf.where(r > 0.6, 0, tf.where(r < 0.4, 1, 2))
    branches = [lambda k=k: _d.gaussian_noise(img, s[2], level, k) for k in _d.NOISE_KINDS]
    out = tf.switch_case(kind, branches)
    detail = tf.strings.join([tf.gather(tf.constant(_d.NOISE_KINDS), kind), " level=",
                              _int_str(tf.round(level * 255.0)), "/255"])
    return out, detail


def _random_jpeg(seed):
    quality = tf.random.stateless_uniform([], seed, 30, 96, tf.int32)
    return quality


def _make_jpeg(prob):
    def jpeg_step(img, seed, sf):
        del sf
        s = tf.random.experimental.stateless_split(seed, 2)
        apply = tf.random.stateless_uniform([], s[0]) < prob
        quality = _random_jpeg(s[1])

        def yes():
            return _d.jpeg(img, quality), tf.strings.join(["quality ", _int_str(quality)])
        return tf.cond(apply, yes, lambda: (img, tf.constant("skipped")))
    return jpeg_step


def _make_poisson(prob):
    def poisson_step(img, seed, sf):
        del sf
        s = tf.random.experimental.stateless_split(seed, 2)
        u = tf.random.stateless_uniform([3], s[0])
        scale = 10.0 ** (2.0 * u[1] + 2.0)

        def yes():
            out = tf.cond(u[2] < 0.5,
                          lambda: _d.poisson_noise(img, s[1], scale, gray=False),
                          lambda: _d.poisson_noise(img, s[1], scale, gray=True))
            kind = tf.where(u[2] < 0.5, "color", "gray")
            return out, tf.strings.join([kind, " scale=", _fmt(scale, 0)])
        return tf.cond(u[0] < prob, yes, lambda: (img, tf.constant("skipped")))
    return poisson_step


# ----------------------------------------------------------------------------- the chain

def _scale_factor(image, low_res, what):
    h, w, c = image.shape[-3:]
    if h is None or w is None or c is None:
        raise ValueError(f"{what}: the image needs a static height, width and channel count "
                         f"(got {image.shape}); crop it to a fixed size first, e.g. "
                         "tf.image.random_crop(x, [256, 256, 3]) or tf.ensure_shape.")
    if c != 3:
        raise ValueError(f"{what}: expected 3 (RGB) channels, got {c}.")
    lh, lw = _d._size_pair(low_res)
    if h % lh or w % lw or h // lh != w // lw:
        raise ValueError(f"{what}: the image size {h}x{w} must be the same whole multiple of "
                         f"low_res {lh}x{lw} along both axes (e.g. 256x256 -> 64); crop the "
                         "image to a multiple first.")
    return h // lh, (lh, lw)


def _chain(x, low_hw, sf: int, seed, scale2_prob, jpeg_prob, poisson_prob):
    """x: [H, W, 3] float32 in [0, 1]. Returns (low-res image, names [n], details [n], images)
    for the n stages after the input: 'downsample1' (when sf == 4), the 7 shuffled steps,
    'jpeg_final'. `images` lists each stage's output when run eagerly, else it is None.

    In a graph the 7 shuffled positions are one tf.while_loop around one switch over the
    steps, so the graph holds each step once (tracing for tf.data stays quick)."""
    eager = tf.executing_eagerly()
    seeds = tf.random.experimental.stateless_split(seed, 10)
    names, details, images = [], [], []

    def record(name, detail, img):
        names.append(tf.convert_to_tensor(name))
        details.append(detail)
        images.append(img)

    cur_sf = tf.constant(float(sf))
    if sf == 4:
        u = tf.random.stateless_uniform([3], seeds[7])

        def downsample1():
            size = tf.constant([x.shape[0] // 2, x.shape[1] // 2])
            idx = tf.where(u[1] < 0.5, tf.minimum(tf.cast(u[2] * 3.0, tf.int32), 2), 3)
            out, method = _random_resize(x, size, idx, _d.RESIZE_METHODS)
            return out, tf.strings.join(["resize 1/2 ", method])

        apply = u[0] < scale2_prob
        x, detail = tf.cond(apply, downsample1, lambda: (x, tf.constant("skipped")))
        x = _ensure(x, 3)
        cur_sf = tf.where(apply, 2.0, 4.0)
        record("downsample1", detail, x)

    perm = tf.argsort(tf.random.stateless_uniform([7], seeds[8]))
    pos = tf.range(7)
    p2 = tf.reduce_sum(tf.where(perm == 2, pos, 0))
    p3 = tf.reduce_sum(tf.where(perm == 3, pos, 0))
    first, last = tf.minimum(p2, p3), tf.maximum(p2, p3)
    perm = tf.where(pos == first, 2, tf.where(pos == last, 3, perm))   # downsample2 first

    ops = [_blur, _blur, _downsample2, _make_downsample3(low_hw), _gaussian_noise,
           _make_jpeg(jpeg_prob), _make_poisson(poisson_prob)]
    step_names = tf.constant(BSR_STEP_NAMES)

    def step(i, img):
        branches = [lambda j=j: ops[j](img, seeds[j], cur_sf) for j in range(7)]
        out, detail = tf.switch_case(perm[i], branches)
        return _ensure(out, 3), tf.gather(step_names, perm[i]), detail

    if eager:
        for i in range(7):
            x, name, detail = step(i, x)
            record(name, detail, x)
    else:
        def body(i, img, name_arr, detail_arr):
            img, name, detail = step(i, img)
            return i + 1, img, name_arr.write(i, name), detail_arr.write(i, detail)

        arrays = [tf.TensorArray(tf.string, size=7) for _ in range(2)]
        _, x, name_arr, detail_arr = tf.while_loop(
            lambda i, *_: i < 7, body, [tf.constant(0), x, *arrays],
            shape_invariants=[tf.TensorShape([]), tf.TensorShape([None, None, 3]),
                              tf.TensorShape(None), tf.TensorShape(None)])
        names.extend(tf.unstack(name_arr.stack(), 7))
        details.extend(tf.unstack(detail_arr.stack(), 7))
        images.extend([None] * 7)

    quality = _random_jpeg(seeds[9])
    x = tf.ensure_shape(_d.jpeg(x, quality), [low_hw[0], low_hw[1], 3])
    record("jpeg_final", tf.strings.join(["quality ", _int_str(quality)]), x)
    return x, tf.stack(names), tf.stack(details), (images if eager else None)


def bsr_degrade(image, low_res, seed, scale2_prob: float = 0.25, jpeg_prob: float = 0.9,
                poisson_prob: float = 0.1) -> tf.Tensor:
    """BSR-degrade `image` down to `low_res` (see the module docstring for the chain).

    image: [H, W, 3] (or a batch [B, H, W, 3]), float in [-1, 1] or uint8, static size an exact
    multiple of low_res (int or (h, w)); seed: int or [2] int tensor (stateless; a batch gets
    one sub-seed per image). Returns [low_h, low_w, 3] (or [B, ...]) in the input's dtype and
    range. Usable eagerly and inside tf.data.Dataset.map / tf.function.
    """
    image = _d._check_image(image, "bsr_degrade")
    sf, low_hw = _scale_factor(image, low_res, "bsr_degrade")
    seed = _d.as_seed(seed)
    probs = dict(scale2_prob=scale2_prob, jpeg_prob=jpeg_prob, poisson_prob=poisson_prob)

    def one(x, s):
        out = _chain(_d.to_unit(x), low_hw, sf, s, **probs)[0]
        return _d.from_unit(out, image.dtype)

    if image.shape.rank == 3:
        return one(image, seed)
    n = image.shape[0] if image.shape[0] is not None else tf.shape(image)[0]
    seeds = tf.random.experimental.stateless_split(seed, n)
    if tf.executing_eagerly():
        return tf.stack([one(image[i], seeds[i]) for i in range(n)])
    return tf.map_fn(lambda a: one(a[0], a[1]), (image, seeds),
                     fn_output_signature=tf.TensorSpec([*low_hw, 3], image.dtype))


def bsr_steps(image, low_res, seed, scale2_prob: float = 0.25, jpeg_prob: float = 0.9,
              poisson_prob: float = 0.1) -> list[tuple[str, str, tf.Tensor]]:
    """Run the chain of `bsr_degrade` (same seed, same result) on one image [H, W, 3] and return
    every stage as (name, detail, image) in the order applied: 'input', 'downsample1' (when
    sf == 4), the seven shuffled BSR_STEP_NAMES, 'jpeg_final'. Images keep the input's dtype
    and range, at the size each stage left them. Eager mode only (it is for inspection)."""
    if not tf.executing_eagerly():
        raise RuntimeError("bsr_steps is for inspection and runs eagerly; inside tf.data or "
                           "tf.function use bsr_degrade.")
    image = _d._check_image(image, "bsr_steps")
    if image.shape.rank != 3:
        raise ValueError(f"bsr_steps takes one image [H, W, 3], got shape {image.shape}.")
    sf, low_hw = _scale_factor(image, low_res, "bsr_steps")
    x = _d.to_unit(image)
    _, names, details, images = _chain(x, low_hw, sf, _d.as_seed(seed), scale2_prob, jpeg_prob,
                                       poisson_prob)
    steps = [("input", "", image)]
    for n, d, img in zip(names.numpy(), details.numpy(), images):
        steps.append((n.decode(), d.decode(), _d.from_unit(img, image.dtype)))
    return steps


def degrade(image, low_res, kind: str = "blur", seed=None, **kwargs) -> tf.Tensor:
    """Dispatch on a config string: 'blur' (blur_downsample), 'bsr' (bsr_degrade, needs
    `seed`) or 'none' (plain area downsampling). Extra keywords go to the chosen function."""
    if kind == "blur":
        return _d.blur_downsample(image, low_res, **kwargs)
    if kind == "bsr":
        if seed is None:
            raise ValueError("degrade(kind='bsr') is random: pass a seed (an int or a [2] "
                             "int tensor, one per element).")
        return bsr_degrade(image, low_res, seed, **kwargs)
    if kind == "none":
        image = _d._check_image(image, "degrade")
        low = _d.resize(_d.to_unit(image), _d._size_pair(low_res), "area")
        return _d.from_unit(low, image.dtype)
    raise ValueError(f"degradation kind must be 'blur', 'bsr' or 'none', got {kind!r}.")
