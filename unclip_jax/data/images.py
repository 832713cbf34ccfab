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

Headers first (``image_header``, ``header_reason``). Before anything is decoded, the image's
dimensions are read from its header alone (PNG IHDR, JPEG SOFn, GIF logical screen and frame
count, WebP VP8/VP8L/VP8X, BMP DIB header; pure Python, microseconds). The input pipeline skips
an image whose decoded size (height x width x frames: TensorFlow's GIF decoder decodes every
frame) exceeds ``max_image_pixels`` *without decoding it* (counted 'too_large'), and one whose
header cannot be read or that TensorFlow cannot decode safely (an animated WebP aborts the
process inside TensorFlow's decoder) as 'undecodable'.

16-bit images. A 16-bit PNG (any colour type: grey, grey + alpha, RGB, RGBA) is decoded at 16
bits and reduced to 8 by round(v / 257), so 65535 -> 255 and 257 -> 1; alpha is composited after
that reduction, as for 8-bit images. unclip_jax.applications reads images for vary / probe with
PIL using the same rule (v / 257), so a 16-bit image is scaled the same way at training and at
inference.

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
  image_header(data: bytes) -> ImageHeader(format, height, width, frames, problem)  (Python)
  header_reason(image_bytes, max_pixels) -> tf.string  '' | 'too_large' | 'undecodable'
  decode_rgb(image_bytes) -> (uint8 [H, W, 3], int32 flags)
  square_crop_resize(image, size, crop='center', seed=None, method='bicubic') -> float32
  to_float(image_uint8) -> float32 [-1, 1]
  FLAG_* constants, FLAG_NAMES (flag -> counter name)
"""
from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np
import tensorflow as tf

FLAG_GREYSCALE = 1
FLAG_RGBA = 2
FLAG_CMYK = 4
FLAG_16BIT = 8
FLAG_CAPTION_TRUNCATED = 16
FLAG_CAPTION_RECODED = 32
FLAG_NAMES = {FLAG_GREYSCALE: "converted_greyscale", FLAG_RGBA: "converted_rgba",
              FLAG_CMYK: "converted_cmyk", FLAG_16BIT: "converted_16bit",
              FLAG_CAPTION_TRUNCATED: "caption_truncated",
              FLAG_CAPTION_RECODED: "caption_recoded"}
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


class ImageHeader(NamedTuple):
    """What an image's header says: ``problem`` is '' when the header was read and the image
    may be decoded; otherwise why not (the dimensions are then 0)."""
    format: str
    height: int
    width: int
    frames: int
    problem: str


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes):
    """(height, width) from the first SOFn segment, walking markers as libjpeg does (bytes
    between segments that are not a marker are skipped); None when there is none before SOS."""
    pos, n = 2, len(data)
    while pos < n:
        while pos < n and data[pos] != 0xFF:   # garbage between segments (libjpeg skips it)
            pos += 1
        while pos < n and data[pos] == 0xFF:   # fill bytes
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue                           # no length field
        if marker in (0xD9, 0xDA) or pos + 2 > n:
            return None                        # end of image / scan data before any frame
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if pos + 7 > n:
                return None
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            return height, width
        pos += length
    return None


def _gif_frames(data: bytes) -> int:
    """Image descriptors in a GIF (TensorFlow decodes every one of them)."""
    pos, n, frames = 13, len(data), 0
    if data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)       # global colour table
    while pos < n:
        block = data[pos]
        if block == 0x3B:                      # trailer
            break
        if block == 0x21:                      # extension: label, then sub-blocks
            pos += 2
        elif block == 0x2C:                    # image descriptor
            frames += 1
            if pos + 10 > n:
                break
            flags = data[pos + 9]
            pos += 10
            if flags & 0x80:
                pos += 3 << ((flags & 7) + 1)  # local colour table
            pos += 1                           # LZW minimum code size
        else:
            break                              # damage: decoding will tell
        while pos < n and data[pos]:
            pos += data[pos] + 1
        pos += 1
    return max(frames, 1)


def image_header(data: bytes) -> ImageHeader:
    """The format, dimensions and frame count of an encoded image, from its header only.

    Never decodes pixel data and never raises: unreadable or unsupported headers come back
    with ``problem`` set ('no known image format', 'truncated header', 'animated WebP', ...).
    """
    if isinstance(data, np.ndarray):  # what tf.numpy_function passes for a scalar string
        data = data.item()
    data = data.encode("latin-1") if isinstance(data, str) else bytes(data)
    n = len(data)

    def bad(fmt, why):
        return ImageHeader(fmt, 0, 0, 0, why)

    def ok(fmt, height, width, frames=1):
        if height <= 0 or width <= 0:
            return bad(fmt, f"{fmt} header gives a size of {width} x {height}")
        return ImageHeader(fmt, int(height), int(width), int(frames), "")
    try:
        if data[:8] == _PNG_MAGIC:
            if n < 24 or data[12:16] != b"IHDR":
                return bad("png", "truncated header")
            width, height = struct.unpack(">II", data[16:24])
            return ok("png", height, width)
        if data[:3] == b"\xff\xd8\xff":
            size = _jpeg_size(data)
            return bad("jpeg", "no frame header") if size is None else ok("jpeg", *size)
        if data[:4] == b"GIF8":
            if n < 13:
                return bad("gif", "truncated header")
            width, height = struct.unpack("<HH", data[6:10])
            return ok("gif", height, width, _gif_frames(data))
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8X" and n >= 30:
                if data[20] & 0x02:
                    return bad("webp", "animated WebP (TensorFlow cannot decode it safely)")
                width = 1 + int.from_bytes(data[24:27], "little")
                height = 1 + int.from_bytes(data[27:30], "little")
                return ok("webp", height, width)
            if chunk == b"VP8L" and n >= 25 and data[20] == 0x2F:
                (bits,) = struct.unpack("<I", data[21:25])
                return ok("webp", ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1)
            if chunk == b"VP8 " and n >= 30 and data[23:26] == b"\x9d\x01\x2a":
                width, height = struct.unpack("<HH", data[26:30])
                return ok("webp", height & 0x3FFF, width & 0x3FFF)
            return bad("webp", "truncated or unknown WebP header")
        if data[:2] == b"BM":
            if n < 26:
                return bad("bmp", "truncated header")
            (dib,) = struct.unpack("<I", data[14:18])
            if dib == 12:
                width, height = struct.unpack("<HH", data[18:22])
            else:
                width, height = struct.unpack("<ii", data[18:26])
            return ok("bmp", abs(height), width)
    except (IndexError, struct.error):
        return bad("", "truncated header")
    return bad("", "no known image format" if n else "empty image file")


def _header_np(data, max_pixels):
    header = image_header(data)
    if header.problem:
        return np.bytes_(b"undecodable")
    if header.height * header.width * header.frames > int(max_pixels):
        return np.bytes_(b"too_large")
    return np.bytes_(b"")


def header_reason(image_bytes, max_pixels: int) -> tf.Tensor:
    """'' when ``image_bytes`` may be decoded, else the skip reason: 'too_large' (the header's
    height x width x frames exceeds ``max_pixels``) or 'undecodable' (no readable header, or an
    image TensorFlow cannot decode safely). Reads the header only (a tf.numpy_function)."""
    out = tf.numpy_function(_header_np, [image_bytes, tf.constant(int(max_pixels), tf.int64)],
                            tf.string, stateful=False)
    return tf.ensure_shape(out, [])


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

    def convert():  # in float32 (4 bytes a value): only for images that need a conversion
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
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    # Plain RGB (most images) stays uint8: no float copy of a large image.
    out = tf.cond(tf.equal(channels, 3), lambda: image[:, :, :3], convert)
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
    "CROPS", "FLAG_16BIT", "FLAG_CAPTION_RECODED", "FLAG_CAPTION_TRUNCATED", "FLAG_CMYK",
    "FLAG_GREYSCALE", "FLAG_NAMES", "FLAG_RGBA", "ImageHeader", "RESIZE_METHODS", "decode_rgb",
    "header_reason", "image_header", "sniff_format", "square_crop_resize", "to_float",
]
