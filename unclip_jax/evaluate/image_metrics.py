"""Image-set metrics: FID, FD-CLIP and CLIP score.

Definitions used here:

* **Frechet distance** between Gaussians N(mu1, S1), N(mu2, S2) fitted to two feature sets:
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. The square root is scipy's
  ``sqrtm``; as in pytorch-fid, a non-finite result is retried with ``eps * I`` added to both
  covariances (feature sets smaller than the feature dimension give singular covariances), and
  an imaginary part left by rounding is dropped (refused if a diagonal entry's exceeds 1e-3).
  Covariances are unbiased (``np.cov``, divisor N - 1), as pytorch-fid's. :func:`fid` and
  :func:`fd_clip` go through :func:`frechet_distance_features`, which for sets no larger than
  the feature dimension computes the same value exactly and far faster in sample space.
* **FID**: the Frechet distance of pool3 features of pytorch-fid's Inception-v3
  (:mod:`unclip_jax.evaluate.inception`). Numbers are comparable with published ones only with
  pytorch-fid's weights, 299 x 299 inputs, and the usual sample counts (FID is biased upward
  for small sets: 10K-50K images per side is the norm; MS-COCO zero-shot FID uses 30K).
* **FD-CLIP**: the same distance in a CLIP's image-embedding space (``CLIP.encode_image``: the
  projected embedding, not L2-normalised unless ``normalize=True``), after the on-device CLIP
  preprocessing (``preprocess_jax``: shorter side to the CLIP resolution, bicubic, centre crop).
  Kynkaenniemi et al. (2023) argue for it because it is less swayed than FID by how well the
  images match ImageNet class features.
* **CLIP score**: per image ``100 * max(cos(E_img, E_txt), 0)`` with its caption, averaged over
  the set (CLIPScore of Hessel et al. 2021 with weight 100 instead of 2.5, the form most
  text-to-image papers report). torchmetrics' ``CLIPScore`` clips the *mean* instead; the two
  agree whenever no cosine is negative.

Images are uint8 ``[N, H, W, 3]`` arrays (or an iterable of such batches, so large sets need not
sit in memory at once). Networks run under ``jax.jit`` on a fixed batch shape: the last batch is
padded and the padding's outputs dropped, so every set size compiles once per image size.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from scipy import linalg

from unclip_jax.clip.preprocess import preprocess_jax
from unclip_jax.errors import UserError

DEFAULT_BATCH = 50


class ImageMetricsError(UserError, ValueError):
    """Inputs a metric cannot use (wrong dtype or shape, too few images, mismatched counts)."""


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------

def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mean [D], unbiased covariance [D, D]), float64."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ImageMetricsError(f"features must be [num_samples, dim], got shape {x.shape}.")
    if x.shape[0] < 2:
        raise ImageMetricsError(f"A covariance needs at least 2 samples, got {x.shape[0]}; "
                                "pass more images.")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (see the module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ImageMetricsError(
            f"Means must be [D] and covariances [D, D] of one D; got mu1 {mu1.shape}, sigma1 "
            f"{s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape} (statistics of different feature "
            "extractors?).")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is expected and handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        worst = np.max(np.abs(np.diagonal(covmean).imag))
        if worst > 1e-3:
            raise FloatingPointError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary diagonal part of {worst:.3g}: the "
                "covariances are too ill-conditioned. Use more samples than feature dimensions.")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance_features(features_a, features_b, eps: float = 1e-6) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N, D].

    When neither set has more samples than dimensions, the covariances have rank < N and the
    trace term is computed exactly in sample space: with centred, scaled features
    A = (X - mu) / sqrt(N - 1) (so S1 = A^T A, S2 = B^T B), tr((S1 S2)^(1/2)) is the sum of the
    singular values of A B^T, an N_a x N_b matrix, which costs O(N^2 D) instead of a D x D
    ``sqrtm`` (tens of seconds at D = 2048) and needs no ``eps``. Larger sets go through
    :func:`frechet_distance` (pytorch-fid's ``sqrtm`` computation). Both give the same value up
    to rounding (and pytorch-fid's ``eps`` retry, when it fires).
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    for x in (a, b):
        if x.ndim != 2:
            raise ImageMetricsError(f"features must be [num_samples, dim], got shape {x.shape}.")
        if x.shape[0] < 2:
            raise ImageMetricsError(f"A covariance needs at least 2 samples, got {x.shape[0]}; "
                                    "pass more images.")
    if a.shape[1] != b.shape[1]:
        raise ImageMetricsError(f"The two feature sets have different dimensions, {a.shape[1]} "
                                f"and {b.shape[1]} (different feature extractors?).")
    if max(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_stats(a), *feature_stats(b), eps=eps)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ca = (a - mu_a) / np.sqrt(len(a) - 1)
    cb = (b - mu_b) / np.sqrt(len(b) - 1)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.sum(ca * ca) + np.sum(cb * cb) - 2.0 * cross)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------

def _check_batch(x: Any, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ImageMetricsError(
            f"{where} must be uint8 RGB images [N, height, width, 3], got dtype {x.dtype} and "
            f"shape {x.shape}. Convert [-1, 1] floats with "
            "np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8).")
    return x


def fixed_batches(images: Any, batch_size: int, where: str = "images"
                  ) -> Iterator[tuple[np.ndarray, int]]:
    """(batch [batch_size, H, W, 3], number of real rows) over a uint8 array [N, H, W, 3] or an
    iterable of such arrays; the last batch is padded with copies of its first image."""
    if batch_size < 1:
        raise ImageMetricsError(f"batch_size must be positive, got {batch_size}.")
    chunks = [images] if isinstance(images, np.ndarray) else images
    pending: list[np.ndarray] = []  # views into the caller's arrays; copied once per batch
    count = 0
    shape = None
    for chunk in chunks:
        chunk = _check_batch(chunk, where)
        if shape is None:
            shape = chunk.shape[1:]
        elif chunk.shape[1:] != shape:
            raise ImageMetricsError(f"All {where} must share one size; got {shape[:2]} and "
                                    f"{chunk.shape[1:3]}. Resize them first.")
        start = 0
        while start < len(chunk):
            take = min(batch_size - count, len(chunk) - start)
            pending.append(chunk[start:start + take])
            count, start = count + take, start + take
            if count == batch_size:
                yield np.concatenate(pending), batch_size
                pending, count = [], 0
    if count:
        rest = np.concatenate(pending)
        pad = np.repeat(rest[:1], batch_size - count, axis=0)
        yield np.concatenate([rest, pad]), count


def _run_batched(fn, images, batch_size: int, where: str) -> np.ndarray:
    outs = [np.asarray(fn(batch))[:n] for batch, n in fixed_batches(images, batch_size, where)]
    if not outs:
        raise ImageMetricsError(f"No {where} were given.")
    return np.concatenate(outs).astype(np.float32)


# Jitted applications of a split model: the graphdef is static (hashable), so each model
# structure and batch shape compiles once per process.

@functools.lru_cache(maxsize=None)
def _jitted(kind: str):

    def inception_features(graphdef, state, batch):
        return nnx.merge(graphdef, state).features(batch)

    def clip_image(graphdef, state, batch, normalize):
        model = nnx.merge(graphdef, state)
        pixels = preprocess_jax(batch, model.config.image_size, value_range=(0.0, 255.0))
        emb = model.encode_image(pixels).astype(jax.numpy.float32)
        if normalize:
            emb = emb / jax.numpy.linalg.norm(emb, axis=-1, keepdims=True)
        return emb

    def clip_text(graphdef, state, ids, mask):
        emb, _ = nnx.merge(graphdef, state).encode_text(ids, mask)
        return emb.astype(jax.numpy.float32)

    fns = {"inception": (inception_features, (0,)), "clip_image": (clip_image, (0, 3)),
           "clip_text": (clip_text, (0,))}
    fn, static = fns[kind]
    return jax.jit(fn, static_argnums=static)


def _split(model):
    return nnx.split(model)


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------

def inception_features(images, inception, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """uint8 images [N, H, W, 3] (or an iterable of batches) -> pool3 features [N, 2048]."""
    graphdef, state = _split(inception)
    fn = _jitted("inception")
    return _run_batched(lambda b: fn(graphdef, state, b), images, batch_size, "images")


def fid(images_a, images_b, inception, batch_size: int = DEFAULT_BATCH) -> float:
    """FID between two image sets (uint8 [N, H, W, 3] arrays or iterables of batches).

    ``inception``: :func:`unclip_jax.evaluate.inception.load_inception`'s model. To compare many
    sample sets against one reference set, compute the reference's :func:`feature_stats` of
    :func:`inception_features` once and call :func:`frechet_distance` directly.
    """
    return frechet_distance_features(inception_features(images_a, inception, batch_size),
                                     inception_features(images_b, inception, batch_size))


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------

def clip_image_embeddings(images, clip_model, batch_size: int = DEFAULT_BATCH,
                          normalize: bool = False) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> CLIP image embeddings [N, D] (``preprocess_jax`` then
    ``encode_image``; L2-normalised if ``normalize``)."""
    graphdef, state = _split(clip_model)
    fn = _jitted("clip_image")
    return _run_batched(lambda b: fn(graphdef, state, b, normalize), images, batch_size, "images")


def clip_text_embeddings(captions: Sequence[str], clip_model, tokenizer,
                         batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """Captions -> CLIP text embeddings [N, D] (projected, not normalised). Captions longer
    than the context are truncated (end-of-text kept), as torchmetrics' CLIPScore does."""
    if isinstance(captions, str):
        raise ImageMetricsError("captions must be a list of strings (one per image), not one "
                                "string.")
    captions = list(captions)
    if not captions:
        raise ImageMetricsError("No captions were given.")
    graphdef, state = _split(clip_model)
    fn = _jitted("clip_text")
    context = clip_model.config.context_length
    outs = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        n = len(chunk)
        tokens = tokenizer(chunk + [chunk[0]] * (batch_size - n), context_length=context,
                           truncate=True)
        outs.append(np.asarray(fn(graphdef, state, tokens.ids, tokens.mask))[:n])
    return np.concatenate(outs)


def fd_clip(images_a, images_b, clip_model, batch_size: int = DEFAULT_BATCH,
            normalize: bool = False) -> float:
    """Frechet distance between two image sets in ``clip_model``'s image-embedding space."""
    return frechet_distance_features(
        clip_image_embeddings(images_a, clip_model, batch_size, normalize),
        clip_image_embeddings(images_b, clip_model, batch_size, normalize))


def clip_scores(images, captions: Sequence[str], clip_model, tokenizer,
                batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """Per-image CLIP scores ``100 * max(cos(image, its caption), 0)`` -> [N] float32."""
    img = clip_image_embeddings(images, clip_model, batch_size, normalize=False)
    txt = clip_text_embeddings(captions, clip_model, tokenizer, batch_size)
    if len(img) != len(txt):
        raise ImageMetricsError(f"clip_score needs one caption per image; got {len(img)} images "
                                f"and {len(txt)} captions.")
    img = img / np.maximum(np.linalg.norm(img, axis=-1, keepdims=True), 1e-12)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=-1, keepdims=True), 1e-12)
    return np.maximum(100.0 * np.sum(img * txt, axis=-1), 0.0).astype(np.float32)


def clip_score(images, captions: Sequence[str], clip_model, tokenizer,
               batch_size: int = DEFAULT_BATCH) -> float:
    """Mean CLIP score of images with their captions (definition in the module docstring)."""
    return float(np.mean(clip_scores(images, captions, clip_model, tokenizer, batch_size)))
