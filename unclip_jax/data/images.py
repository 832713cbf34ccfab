"""Image decoding, mode conversion, validation and resizing for the input pipeline (tf ops).

Decoding (``decode_rgb``) uses TensorFlow's codecs, which run in parallel inside tf.data
without the GIL: JPEG, PNG (8 and 16 bit), GIF (first frame), WebP and BMP. Every image comes
out as uint8 RGB [H, W, 3], and what had to be converted is reported as bit flags:

  FLAG_GREYSCALE  1 or 2 channels (grey, grey + alpha): replicated to RGB
  FLAG_RGBA       an alpha channel (RGBA, grey + alpha, palette with transparency):
                  composited on white
  FLAG_CMYK       a 4-component (CMYK / YCCK) JPEG. TensorFlow's JPEG decoder converts these to
                  RGB itself (checked against PIL: mean abs difference 1.6 / 255 on a random
                  CMYK JPEG, JPEG rounding), so no PIL fallback is needed; we only detect them
                  (tf.image.extract_jpeg_shape reports 4 components) to count them.
  FLAG_16BIT      a 16-bit PNG: decoded at 16 bits and rounded to 8 (v / 257)

Undecodable bytes make ``decode_rgb`` raise (TensorFlow's decoders cannot report failure any
other way); the input pipeline maps it in a stage of its own followed by ``ignore_errors`` and
counts the gaps, so nothing else is ever swallowed.

Geometry (``square_crop_resize``): "resize the shorter side to S, then crop S x S" done the
cheap way round: cut the largest square (centred, or at a seeded random offset along the longer
side) and resize that square to S x S, antialiased (bicubic with antialias, or area). The two
orders give the same pixels up to sub-pixel placement of the crop, and this one never resizes
the part that is thrown away. Output float32 in [-1, 1].

Public API
  sniff_format(image_bytes) -> tf.string  'jpeg' | 'png' | 'gif' | 'webp' | 'bmp' | ''
  decode_rgb(image_bytes) -> (uint8 [H, W, 3], int32 flags)
  square_crop_resize(image, size, crop='center', seed=None, method='bicubic') -> float32
  to_float(image_uint8) -> float32 [-1, 1]
  FLAG_* constants, FLAG_NAMES (flag -> counter name)
"""
from __future__ import annotations

import tensorflow as tf

FLAG_GREYSCALE = 1
FLAG_RGBA = 2
FLAG_CMYK = 4
FLAG_16BIT = 8
FLAG_CAPTION_TRUNCATED = 16
FLAG_NAMES = {FLAG_GREYSCALE: "converted_greyscale", FLAG_RGBA: "converted_rgba",
              FLAG_CMYK: "converted_cmyk", FLAG_16BIT: "converted_16bit",
              FLAG_CAPTION_TRUNCATED: "caption_truncated"}
CROPS = ("center", "random")
RESIZE_METHODS = ("bicubic", "area", "bilinear")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sniff_format(image_bytes) -> tf.Tensor:
    """The container format by magic number (a scalar tf.string; '' when unknown)."""
    head = tf.strings.substr(image_bytes, 0, 12)
    return tf.case([
        (tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff"), lambda: tf.constant("jpeg")),
        (tf.equal(tf.strings.substr(head, 0, 8), _PNG_MAGIC), lambda: tf.constant("png")),
        (tf.equal(tf.strings.substr(head, 0, 4), b"GIF8"), lambda: tf.constant("gif")),
        (tf.logical_and(tf.equal(tf.strings.substr(head, 0, 4), b"RIFF"),
                        tf.equal(tf.strings.substr(head, 8, 4), b"WEBP")),
         lambda: tf.constant("webp")),
        (tf.equal(tf.strings.substr(head, 0, 2), b"BM"), lambda: tf.constant("bmp")),
    ], default=lambda: tf.constant(""), exclusive=False)


def _png_bit_depth(image_bytes) -> tf.Tensor:
    """The IHDR bit depth of a PNG (byte 24)."""
    byte = tf.io.decode_raw(tf.strings.substr(image_bytes, 24, 1), tf.uint8)
    return tf.cast(tf.reduce_sum(byte), tf.int32)


def _flatten_alpha(rgb, alpha):
    """Composite ``rgb`` (float [H, W, C]) with ``alpha`` ([H, W, 1], 0..255) on white."""
    a = alpha / 255.0
    return rgb * a + 255.0 * (1.0 - a)


def decode_rgb(image_bytes):
    """Decode ``image_bytes`` (scalar tf.string) to uint8 RGB [H, W, 3] and conversion flags.

    Raises (tf.errors.InvalidArgumentError) when the bytes are not a decodable image.
    """
    fmt = sniff_format(image_bytes)
    is_png = tf.equal(fmt, "png")
    is_jpeg = tf.equal(fmt, "jpeg")
    png16 = tf.logical_and(is_png, tf.equal(_png_bit_depth(image_bytes), 16))

    def decode16():
        img = tf.io.decode_png(image_bytes, channels=0, dtype=tf.uint16)
        return tf.cast(tf.round(tf.cast(img, tf.float32) / 257.0), tf.uint8)

    def decode8():
        img = tf.io.decode_image(image_bytes, channels=0, dtype=tf.uint8,
                                 expand_animations=False)
        return tf.ensure_shape(img, [None, None, None])

    image = tf.cond(png16, decode16, decode8)
    channels = tf.shape(image)[2]
    cmyk = tf.cond(is_jpeg,
                   lambda: tf.equal(tf.image.extract_jpeg_shape(image_bytes)[2], 4),
                   lambda: tf.constant(False))
    x = tf.cast(image, tf.float32)

    def grey():
        return tf.tile(x[:, :, :1], [1, 1, 3])

    def grey_alpha():
        return tf.tile(_flatten_alpha(x[:, :, :1], x[:, :, 1:2]), [1, 1, 3])

    def rgb():
        return x[:, :, :3]

    def rgba():
        return _flatten_alpha(x[:, :, :3], x[:, :, 3:4])

    # channels 1, 2, 3, 4 -> branches 0..3 (anything else: keep the first three).
    branch = tf.clip_by_value(channels - 1, 0, 3)
    out = tf.switch_case(branch, [grey, grey_alpha, rgb, rgba])
    out = tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
    out = tf.ensure_shape(out, [None, None, 3])
    flags = (tf.where(channels <= 2, FLAG_GREYSCALE, 0)
             + tf.where(tf.logical_or(channels == 2, channels == 4), FLAG_RGBA, 0)
             + tf.where(cmyk, FLAG_CMYK, 0)
             + tf.where(png16, FLAG_16BIT, 0))
    return out, tf.cast(flags, tf.int32)


def to_float(image) -> tf.Tensor:
    """uint8 [0, 255] (or float in [0, 255]) -> float32 in [-1, 1], clipped."""
    return tf.clip_by_value(tf.cast(image, tf.float32) / 127.5 - 1.0, -1.0, 1.0)


def square_crop_resize(image, size: int, crop: str = "center", seed=None,
                       method: str = "bicubic") -> tf.Tensor:
    """The S x S training view of ``image`` (uint8 [H, W, 3]) as float32 in [-1, 1].

    Cuts the largest square (``crop`` 'center', or 'random' at an offset drawn from the
    stateless ``seed``, a [2] int tensor) and resizes it to ``size`` antialiased (``method``
    'bicubic' with antialias, 'area', or 'bilinear' with antialias). Equivalent to resizing the
    shorter side to ``size`` and cropping ``size`` x ``size`` there.
    """
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}.")
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}, got {method!r}.")
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    side = tf.minimum(h, w)
    if crop == "center":
        top, left = (h - side) // 2, (w - side) // 2
    else:
        if seed is None:
            raise ValueError("crop='random' needs a seed (a [2] int tensor, one per image).")
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
        top = tf.random.stateless_uniform((), seeds[0], 0, h - side + 1, tf.int32)
        left = tf.random.stateless_uniform((), seeds[1], 0, w - side + 1, tf.int32)
    square = image[top:top + side, left:left + side]
    out = tf.image.resize(tf.cast(square, tf.float32), (size, size), method=method,
                          antialias=method != "area")
    return tf.ensure_shape(to_float(out), [size, size, 3])


__all__ = [
    "CROPS", "FLAG_16BIT", "FLAG_CAPTION_TRUNCATED", "FLAG_CMYK", "FLAG_GREYSCALE", "FLAG_NAMES",
    "FLAG_RGBA", "RESIZE_METHODS", "decode_rgb", "sniff_format", "square_crop_resize", "to_float",
]
