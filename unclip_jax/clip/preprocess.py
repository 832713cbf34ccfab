"""Image preprocessing for CLIP, matching transformers' ``CLIPImageProcessor`` (PIL backend).

:func:`preprocess` (host side, numpy + PIL): convert to RGB (greyscale repeated, transparency
composited onto white), resize the shorter side to ``image_size`` with PIL bicubic, centre crop
``image_size`` x ``image_size``, scale to [0, 1] and normalise with the CLIP mean and std. The
output is float32 NHWC, ready for ``CLIP.encode_image``. Resizing is the same PIL call the
reference makes, so results agree with it to float rounding.

:func:`preprocess_jax` does the same on device for images already in a JAX computation (e.g. the
decoder's samples, for CLIP scores); its bicubic filter is ``jax.image.resize``'s, which is close
to but not bit-identical with PIL's.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(x, Image.Image)


def to_rgb(image: Any) -> np.ndarray:
    """One image (PIL, or a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]) -> uint8 RGB.

    Transparency is composited onto a white background, as transformers does.
    """
    if _is_pil(image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))

    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"Images given as arrays must be uint8 in [0, 255], got dtype "
                         f"{array.dtype}. Convert with (x * 255).round().astype(np.uint8) for "
                         "[0, 1] floats, or use preprocess_jax for float images on device.")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"An image array must be [H, W] or [H, W, C] with C in (1, 3, 4) "
                         f"(channels last), got shape {array.shape}.")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:].astype(np.float64) / 255.0
        rgb = alpha * array[..., :3] + (1.0 - alpha) * 255.0
        return np.round(rgb).astype(np.uint8)
    return array


def resize_and_crop(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [S, S, 3]: shorter side to S (PIL bicubic), centre crop."""
    h, w = rgb.shape[:2]
    if min(h, w) < 1:
        raise ValueError(f"Cannot preprocess an empty image of shape {rgb.shape}.")
    if w <= h:
        new_w, new_h = image_size, int(image_size * h / w)
    else:
        new_h, new_w = image_size, int(image_size * w / h)
    if (new_h, new_w) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=Image.BICUBIC))
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    return rgb[top:top + image_size, left:left + image_size]


def _as_list(images: Any) -> list:
    if _is_pil(images):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(f"A numpy batch must be [B, H, W, C] (or one image [H, W(, C)]), got "
                         f"shape {images.shape}.")
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("preprocess got an empty list of images.")
        return list(images)
    raise ValueError(f"preprocess takes a uint8 array [B, H, W, C], a PIL image or a list of "
                     f"them, got {type(images).__name__}.")


def preprocess(images: Any, image_size: int = 224, mean: Sequence[float] = OPENAI_MEAN,
               std: Sequence[float] = OPENAI_STD) -> np.ndarray:
    """Images -> float32 [B, image_size, image_size, 3], normalised for CLIP.

    ``images``: a uint8 array [B, H, W, C]; one image (PIL, or array [H, W] / [H, W, C]); or a
    list of images of any sizes and modes (greyscale and RGBA are converted to RGB).
    """
    out = []
    for image in _as_list(images):
        crop = resize_and_crop(to_rgb(image), image_size)
        out.append(crop.astype(np.float64) / 255.0)
    batch = np.stack(out)
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    return ((batch - mean) / std).astype(np.float32)


def preprocess_jax(images, image_size: int = 224, value_range: tuple[float, float] = (-1.0, 1.0),
                   mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD):
    """On-device version for float NHWC images in ``value_range`` (default [-1, 1]).

    Shorter side to ``image_size`` (bicubic, antialiased), centre crop, CLIP normalisation.
    Traceable under ``jax.jit``; all images in the batch share one size.
    """
    b, h, w, c = images.shape
    if c != 3:
        raise ValueError(f"preprocess_jax expects RGB NHWC images, got shape {images.shape}.")
    lo, hi = value_range
    x = (images.astype(jnp.float32) - lo) / (hi - lo)
    if w <= h:
        new_w, new_h = image_size, int(image_size * h / w)
    else:
        new_h, new_w = image_size, int(image_size * w / h)
    if (new_h, new_w) != (h, w):
        x = jax.image.resize(x, (b, new_h, new_w, c), method="bicubic", antialias=True)
        x = jnp.clip(x, 0.0, 1.0)  # PIL works on uint8, so its overshoot is clipped too
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    x = x[:, top:top + image_size, left:left + image_size]
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
