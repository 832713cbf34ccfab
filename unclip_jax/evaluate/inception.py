"""The Inception-v3 of FID (Heusel et al. 2017) in Flax NNX: 2048-d pool3 features.

FID is only comparable across papers when it is computed with one particular network: the
Inception-v3 graph TensorFlow released in December 2015, as ported to PyTorch by pytorch-fid
(``FIDInceptionV3``, weights ``pt_inception-2015-12-05-6726825d.pth``). That port differs from
torchvision's Inception-v3 in three places, all reproduced here:

* the 3x3 average pools inside the A, C and first E blocks (``Mixed_5b..5d``, ``Mixed_6b..6e``,
  ``Mixed_7b``) divide by the number of *real* pixels under the window at the borders
  (``count_include_pad=False``);
* the pool branch of the last E block (``Mixed_7c``) is a 3x3 *max* pool, stride 1, padding 1;
* the input is resized to 299 x 299 with bilinear interpolation (``align_corners=False``, no
  antialiasing, as ``torch.nn.functional.interpolate``) and scaled from [0, 1] to [-1, 1].

Every convolution has no bias and is followed by inference-mode BatchNorm (eps 1e-3) and a
ReLU. The features are the global average of ``Mixed_7c``'s output (pytorch-fid's block 3,
"pool3"); the 1008-way classifier is not used (its tensors in a checkpoint are accepted and
skipped).

Weights are never downloaded: pass the file to :func:`load_inception`. Accepted are

* a safetensors file with pytorch-fid's state-dict names (``Conv2d_1a_3x3.conv.weight``,
  ``Mixed_5b.branch1x1.bn.running_mean``, ...); :func:`convert_pth` writes one;
* pytorch-fid's own ``.pth``, read with ``torch.load(..., weights_only=True)`` (no code runs while
  reading it) when torch is installed.

Module attribute names are the checkpoint's names, so the name table is a rule: our path
``Mixed_5b.branch1x1.kernel`` <-> ``Mixed_5b.branch1x1.conv.weight`` and so on
(:func:`name_table`). Every tensor must be used and every parameter found, or the load is refused
with a list of the offending names.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unclip_jax.errors import UserError
from unclip_jax.io import safetensors
from unclip_jax.models.layers import abstract_init
from unclip_jax.torch_weights import TORCH_METADATA, NameTable, load_into, path_str, to_theirs

Array = jax.Array

INPUT_SIZE = 299            # pytorch-fid resizes every image to this before the network
MIN_INPUT_SIZE = 75         # the smallest input the strided stem and reductions accept
FEATURE_DIM = 2048
BN_EPS = 1e-3
PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"

# checkpoint suffix of each of our per-convolution variables, and its layout kind
_SUFFIX = {"kernel": ("conv.weight", "conv"), "scale": ("bn.weight", "copy"),
           "bias": ("bn.bias", "copy"), "mean": ("bn.running_mean", "copy"),
           "var": ("bn.running_var", "copy")}


class InceptionWeightsError(UserError, ValueError):
    """An Inception weights file that cannot be read as asked; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class ConvBN(nnx.Module):
    """Bias-free convolution, inference BatchNorm (eps 1e-3), ReLU (pytorch's ``BasicConv2d``)."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0, *,
                 precision: Any, rngs: nnx.Rngs):
        kh, kw = _pair(kernel)
        self.stride = _pair(stride)
        ph, pw = _pair(padding)
        self.padding = ((ph, ph), (pw, pw))
        self.precision = precision
        init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")  # He: keeps ReLU nets O(1)
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, c_in, c_out), jnp.float32))
        self.scale = nnx.Param(jnp.ones((c_out,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((c_out,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((c_out,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((c_out,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], window_strides=self.stride, padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        inv = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
        return jax.nn.relu(y * inv + (self.bias[...] - self.mean[...] * inv))


def max_pool(x: Array, size: int = 3, stride: int = 2, pad: int = 0) -> Array:
    """Max pool over H, W; padding (if any) never wins, as torch pads with -inf."""
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1),
                                 (1, stride, stride, 1), pads)


def avg_pool_exclude_pad(x: Array) -> Array:
    """3x3 average pool, stride 1, padding 1, dividing by the count of real pixels in the window
    (torch ``avg_pool2d(..., count_include_pad=False)``: 4 at corners, 6 on edges, else 9)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    h, w = x.shape[1], x.shape[2]
    rows = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
    cols = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
    count = (rows[:, None] * cols[None, :]).astype(np.float32)
    return total / jnp.asarray(count)[None, :, :, None]


# --------------------------------------------------------------------------------------------
# Blocks (torchvision's names; the FID variants' pooling)
# --------------------------------------------------------------------------------------------

class BlockA(nnx.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features."""

    def __init__(self, c_in: int, pool_features: int, *, precision, rngs):
        kw = dict(precision=precision, rngs=rngs)
        self.branch1x1 = ConvBN(c_in, 64, 1, **kw)
        self.branch5x5_1 = ConvBN(c_in, 48, 1, **kw)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1, **kw)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, **kw)
        self.branch_pool = ConvBN(c_in, pool_features, 1, **kw)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class BlockB(nnx.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 768."""

    def __init__(self, c_in: int, *, precision, rngs):
        kw = dict(precision=precision, rngs=rngs)
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1, **kw)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, **kw)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x)], axis=-1)


class BlockC(nnx.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions (1x7 then 7x1) -> 768."""

    def __init__(self, c_in: int, c7: int, *, precision, rngs):
        kw = dict(precision=precision, rngs=rngs)
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(c_in, 192, 1, **kw)
        self.branch7x7_1 = ConvBN(c_in, c7, 1, **kw)
        self.branch7x7_2 = ConvBN(c7, c7, **row, **kw)
        self.branch7x7_3 = ConvBN(c7, 192, **col, **kw)
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1, **kw)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col, **kw)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row, **kw)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col, **kw)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row, **kw)
        self.branch_pool = ConvBN(c_in, 192, 1, **kw)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


class BlockD(nnx.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 1280."""

    def __init__(self, c_in: int, *, precision, rngs):
        kw = dict(precision=precision, rngs=rngs)
        self.branch3x3_1 = ConvBN(c_in, 192, 1, **kw)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1, **kw)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, **kw)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class BlockE(nnx.Module):
    """Mixed_7b / 7c: expanded 3x3 branches (1x3 and 3x1 side by side) -> 2048.

    ``pool='avg'`` (Mixed_7b: average excluding padding) or ``'max'`` (Mixed_7c: the 2015
    graph's max pool, stride 1, padding 1).
    """

    def __init__(self, c_in: int, pool: str, *, precision, rngs):
        assert pool in ("avg", "max"), pool
        self.pool = pool
        kw = dict(precision=precision, rngs=rngs)
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = ConvBN(c_in, 320, 1, **kw)
        self.branch3x3_1 = ConvBN(c_in, 384, 1, **kw)
        self.branch3x3_2a = ConvBN(384, 384, **row, **kw)
        self.branch3x3_2b = ConvBN(384, 384, **col, **kw)
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1, **kw)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = ConvBN(384, 384, **row, **kw)
        self.branch3x3dbl_3b = ConvBN(384, 384, **col, **kw)
        self.branch_pool = ConvBN(c_in, 192, 1, **kw)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
        return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


# --------------------------------------------------------------------------------------------
# Input preparation
# --------------------------------------------------------------------------------------------

def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bilinear resize along one axis (align_corners=False,
    no antialiasing): source = (i + 0.5) * n_in / n_out - 0.5, clamped below at 0.

    The source positions are rounded to float32 as torch's CPU kernel rounds them for float32
    images (a float32 scale, then one fused multiply-add): at a few hundred pixels that
    rounding moves the weights by ~1e-5, which would otherwise show.
    """
    f32 = np.float32
    scale = np.float64(f32(n_in) / f32(n_out))
    src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(f32), f32(0))
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = np.clip(src - lo.astype(f32), f32(0), f32(1)).astype(np.float64)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


def prepare_images(images: Array, size: int | None = INPUT_SIZE) -> Array:
    """Images with values in [0, 255] (uint8 or float) [B, H, W, 3] -> float32 in [-1, 1],
    resized to ``size`` x ``size`` as pytorch-fid does (``size=None`` keeps the input size)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Inception takes RGB NHWC images [batch, height, width, 3], got shape "
                         f"{images.shape}.")
    x = images.astype(jnp.float32) / 255.0
    h, w = x.shape[1], x.shape[2]
    if size is not None and (h, w) != (size, size):
        hi = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(_bilinear_matrix(h, size)), x, precision=hi)
        x = jnp.einsum("pw,bowc->bopc", jnp.asarray(_bilinear_matrix(w, size)), x, precision=hi)
    return 2.0 * x - 1.0


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------

class InceptionV3(nnx.Module):
    """pytorch-fid's FIDInceptionV3 up to pool3.

    ``input_size``: the side images are resized to by :meth:`features` (299 for FID; a smaller
    value >= 75, or None for no resize, only for tests). ``precision``: of the convolutions;
    the default ``'highest'`` keeps float32 accuracy on GPUs and TPUs, whose default would
    round the inputs to TF32 / bfloat16.
    """

    def __init__(self, *, input_size: int | None = INPUT_SIZE, precision: Any = "highest",
                 rngs: nnx.Rngs):
        if input_size is not None and input_size < MIN_INPUT_SIZE:
            raise ValueError(f"input_size must be at least {MIN_INPUT_SIZE} (or None), got "
                             f"{input_size}; FID uses {INPUT_SIZE}.")
        self.input_size = input_size
        kw = dict(precision=precision, rngs=rngs)
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, **kw)
        self.Mixed_5b = BlockA(192, 32, **kw)
        self.Mixed_5c = BlockA(256, 64, **kw)
        self.Mixed_5d = BlockA(288, 64, **kw)
        self.Mixed_6a = BlockB(288, **kw)
        self.Mixed_6b = BlockC(768, 128, **kw)
        self.Mixed_6c = BlockC(768, 160, **kw)
        self.Mixed_6d = BlockC(768, 160, **kw)
        self.Mixed_6e = BlockC(768, 192, **kw)
        self.Mixed_7a = BlockD(768, **kw)
        self.Mixed_7b = BlockE(1280, "avg", **kw)
        self.Mixed_7c = BlockE(2048, "max", **kw)

    def __call__(self, x: Array) -> Array:
        """x float32 [B, H, W, 3] in [-1, 1] (already resized), H, W >= 75 -> [B, 2048]."""
        if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"Inception needs NHWC RGB input of at least {MIN_INPUT_SIZE} x "
                             f"{MIN_INPUT_SIZE}, got shape {x.shape}.")
        x = x.astype(jnp.float32)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def features(self, images: Array) -> Array:
        """Images in [0, 255] (uint8 or float) [B, H, W, 3] -> pool3 features [B, 2048]:
        resized to ``input_size`` and scaled to [-1, 1] first, as pytorch-fid does."""
        return self(prepare_images(images, self.input_size))


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def name_table(model: InceptionV3) -> NameTable:
    """Our variable path -> (pytorch-fid state-dict name, layout kind), for every variable."""
    table = {}
    for path, _ in nnx.state(model).flat_state():
        *prefix, leaf = path
        suffix, kind = _SUFFIX[leaf]
        table[path] = (path_str(tuple(prefix)) + "." + suffix, kind)
    return table


def _ignored(name: str) -> bool:
    """Tensors a pytorch-fid file may hold that FID features do not use."""
    return name in ("fc.weight", "fc.bias") or name.endswith(".num_batches_tracked")


class _ArrayTensors:
    """The TensorFiles interface (names / shape / read) over an in-memory state dict."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def names(self) -> set[str]:
        return set(self.arrays)

    def shape(self, name: str) -> tuple:
        return tuple(self.arrays[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return self.arrays[name].dtype

    def read(self, name: str) -> np.ndarray:
        return self.arrays[name]


def read_pth(path: str) -> dict[str, np.ndarray]:
    """pytorch-fid's ``.pth`` state dict as numpy arrays, read with ``weights_only=True``."""
    try:
        import torch
    except ImportError as e:
        raise InceptionWeightsError(
            f"{path} is a pickled PyTorch file and reading it needs torch, which is not "
            "installed. Either `pip install torch` (CPU wheels suffice), or convert it once on a "
            "machine that has torch with `python -c \"from unclip_jax.evaluate.inception import "
            f"convert_pth; convert_pth('{os.path.basename(path)}', 'inception_fid.safetensors')\"`"
            " and pass the .safetensors file.") from e
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable state dict"
        raise InceptionWeightsError(
            f"{path} could not be read as a PyTorch state dict with weights_only=True ({e}). "
            f"Pass pytorch-fid's {PTH_NAME} or a safetensors file with its tensor names.") from e
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise InceptionWeightsError(
            f"{path} does not hold a state dict (a mapping of names to tensors); pass "
            f"pytorch-fid's {PTH_NAME} or a safetensors file with its tensor names.")
    return {k: v.detach().to(torch.float32).numpy() for k, v in loaded.items()}


def _open(path: str):
    if not os.path.isfile(path):
        raise InceptionWeightsError(
            f"Inception weights file {path!r} does not exist (or is not a file). Nothing is "
            f"downloaded: fetch pytorch-fid's {PTH_NAME} (or a safetensors file with its tensor "
            "names) yourself and pass its path.")
    if path.endswith(".safetensors"):
        return safetensors.TensorFiles([path])
    if path.endswith((".pth", ".pt")):
        return _ArrayTensors(read_pth(path))
    raise InceptionWeightsError(
        f"Cannot tell the format of {path!r}: expected a .safetensors file with pytorch-fid's "
        f"tensor names, or pytorch-fid's {PTH_NAME}.")


def load_inception(path: str, *, input_size: int | None = INPUT_SIZE,
                   precision: Any = "highest") -> InceptionV3:
    """The FID Inception-v3 with weights from ``path`` (.safetensors or pytorch-fid's .pth).

    Raises :class:`InceptionWeightsError` for a file that cannot be read and
    ``CheckpointMismatchError`` (listing every missing, unexpected and misshapen tensor) for one
    that is not this network.
    """
    tensors = _open(path)
    abstract = abstract_init(lambda: InceptionV3(input_size=input_size, precision=precision,
                                                 rngs=nnx.Rngs(0)))
    return load_into(abstract, name_table(abstract), tensors, path=path,
                     what="FID Inception-v3 (pytorch-fid FIDInceptionV3)",
                     ignore=_ignored,
                     hint=f"Expected pytorch-fid's {PTH_NAME} or a safetensors copy of it.")


def state_dict(model: InceptionV3) -> dict[str, np.ndarray]:
    """Every variable of ``model`` under its pytorch-fid name, in torch layout (float32)."""
    table = name_table(model)
    return {table[p][0]: np.ascontiguousarray(to_theirs(np.asarray(v[...], np.float32),
                                                        table[p][1]))
            for p, v in nnx.state(model).flat_state()}


def convert_pth(pth_path: str, out_path: str) -> None:
    """Re-save pytorch-fid's ``.pth`` as safetensors (needs torch), so later runs need no torch.
    The classifier (``fc.*``) is kept so the file stays a complete copy."""
    arrays = {k: np.ascontiguousarray(v) for k, v in read_pth(pth_path).items()
              if not k.endswith(".num_batches_tracked")}
    safetensors.write(out_path, arrays, metadata=TORCH_METADATA)
