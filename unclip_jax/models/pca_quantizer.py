"""PCA + per-component quantisation of CLIP image embeddings, for the autoregressive prior.

The AR prior of unCLIP (Ramesh et al. 2022, section 2.1) does not model the 1024-dim z_i
directly: it rotates z_i into its principal components, keeps the leading ones (319 of 1024 in
the paper, which keeps nearly all the information), orders them by decreasing eigenvalue and
quantises each into 1024 buckets. A z_i becomes a sequence of ``num_components`` bucket tokens.
A second quantiser turns the scalar z_i . z_t into a token of the prior's prefix.

Two parts:

* **Fitting** (host side, NumPy, float64): :func:`fit_quantizer` streams over batches twice.
  Pass 1 merges per-batch means and centred scatter matrices (Chan et al.'s pairwise update, so
  no ``E[zz^T] - mu mu^T`` cancellation) and eigendecomposes the covariance; pass 2 projects each
  batch and keeps a seeded reservoir sample of the projections and of the dot products, whose
  quantiles give the bucket edges (exact when the data fit in the reservoir). Buckets are
  equiprobable on the training distribution; a bucket decodes to its probability centre (the
  quantile halfway between its edges). The result is a :class:`QuantizerFit` that reports the
  energy kept per number of components.
* **Applying** (device side, JAX): :class:`PCAQuantizer` is an ``nnx.Module`` whose fitted state
  lives in :class:`QuantizerBuffer` variables (not ``nnx.Param``: the optimizer never sees them,
  ``train.step.split_model`` puts them in ``rest``), so the fit travels with the model's state
  and its checkpoint. ``encode`` / ``decode`` / ``encode_dot`` / ``decode_dot`` are jittable.

Bucket layout (both quantisers): ``n`` buckets have ``n + 1`` edges, ``edges[0]`` the training
minimum, ``edges[n]`` the maximum and ``edges[i]`` the ``i/n`` quantile. A value goes to the
bucket whose interior edges bracket it (values beyond the training range go to the end buckets).
Because the buckets are equiprobable, the ``p``-th percentile of the training distribution lies
in bucket ``floor(p/100 * n)`` (:meth:`PCAQuantizer.percentile_dot_token`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


class QuantizerBuffer(nnx.Variable):
    """Fitted, non-trainable state of a :class:`PCAQuantizer` (saved with the model)."""


# --------------------------------------------------------------------------------------------
# Fitting (NumPy, float64)
# --------------------------------------------------------------------------------------------

class PCAAccumulator:
    """Streaming mean and covariance in float64: ``update(batch)`` any number of times."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim, np.float64)
        self.scatter = np.zeros((dim, dim), np.float64)  # sum of centred outer products

    def update(self, z) -> None:
        z = np.asarray(z, np.float64)
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"PCA batches must be [batch, {self.dim}] embeddings, got shape "
                             f"{z.shape}.")
        if not np.all(np.isfinite(z)):
            raise ValueError("PCA batch contains NaN or infinite values; clean the embeddings "
                             "before fitting.")
        n = z.shape[0]
        if n == 0:
            return
        mean_b = z.mean(axis=0)
        centred = z - mean_b
        scatter_b = centred.T @ centred
        total = self.count + n
        delta = mean_b - self.mean
        self.scatter += scatter_b + np.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """(eigenvalues [D] decreasing, eigenvectors [D, D] as rows) of the covariance."""
        if self.count < 2:
            raise ValueError(f"PCA needs at least 2 embeddings, got {self.count}.")
        cov = self.scatter / self.count
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)
        order = np.argsort(values)[::-1]
        values = np.maximum(values[order], 0.0)
        vectors = vectors[:, order].T
        # A deterministic sign: the largest-magnitude entry of each component is positive.
        signs = np.sign(vectors[np.arange(len(vectors)), np.argmax(np.abs(vectors), axis=1)])
        return values, vectors * np.where(signs == 0, 1.0, signs)[:, None]


class Reservoir:
    """A seeded uniform sample of at most ``capacity`` rows from a stream (Algorithm R, batched)."""

    def __init__(self, capacity: int, width: int, seed: int = 0):
        self.capacity = capacity
        self.rows = np.zeros((0, width), np.float64)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        room = self.capacity - len(self.rows)
        if room > 0:
            self.rows = np.concatenate([self.rows, x[:room]])
            self.seen += min(room, len(x))
            x = x[room:]
        for row in x:  # only runs once the reservoir is full
            self.seen += 1
            j = self.rng.integers(self.seen)
            if j < self.capacity:
                self.rows[j] = row


def quantile_buckets(values: np.ndarray, num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Equiprobable buckets of ``values`` [N, C] per column: (edges [C, n+1], centres [C, n])."""
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    if n == 0:
        raise ValueError("No values to place bucket edges on.")
    # Linear-interpolated quantiles (NumPy's default method) from one sort per column: much
    # faster than np.quantile's partitioning at 2n+1 levels.
    srt = np.sort(values, axis=0)
    pos = np.linspace(0.0, 1.0, 2 * num_buckets + 1) * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = (pos - lo)[:, None]
    q = (srt[lo] * (1 - frac) + srt[hi] * frac).T  # [C, 2n+1]
    return q[:, 0::2], q[:, 1::2]


@dataclasses.dataclass
class QuantizerFit:
    """The result of :func:`fit_quantizer` (float64 NumPy)."""
    mean: np.ndarray          # [D]
    eigenvalues: np.ndarray   # [D] the whole spectrum, decreasing
    components: np.ndarray    # [K, D] unit rows, by decreasing eigenvalue
    edges: np.ndarray         # [K, n+1]
    centres: np.ndarray       # [K, n]
    dot_edges: np.ndarray     # [m+1]
    dot_centres: np.ndarray   # [m]
    count: int

    @property
    def num_components(self) -> int:
        return self.components.shape[0]

    @property
    def energy_kept(self) -> np.ndarray:
        """[D]: fraction of the variance (about the mean) kept by the first k+1 components."""
        total = self.eigenvalues.sum()
        return np.cumsum(self.eigenvalues) / (total if total > 0 else 1.0)

    def components_for(self, energy: float) -> int:
        """The fewest components that keep at least ``energy`` (e.g. 0.99) of the variance."""
        return int(np.searchsorted(self.energy_kept, energy - 1e-12) + 1)

    def energy_report(self, ks: Sequence[int] = ()) -> str:
        ks = list(ks) or sorted({1, 8, 32, 64, 128, 256, 319, 512, self.num_components})
        kept = self.energy_kept
        rows = [f"{k:5d} components: {100 * kept[k - 1]:7.3f}% of the variance"
                for k in ks if 0 < k <= len(kept)]
        return "\n".join(rows)


def _as_pairs(batch) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(batch, dict):
        if "image_embed" not in batch:
            raise ValueError("fit_quantizer batches that are dicts need an 'image_embed' entry "
                             f"(and 'text_embed' for the dot-product token); got {sorted(batch)}.")
        return np.asarray(batch["image_embed"]), (
            np.asarray(batch["text_embed"]) if "text_embed" in batch else None)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return np.asarray(batch[0]), np.asarray(batch[1])
    return np.asarray(batch), None


def fit_quantizer(batches: Iterable | Callable[[], Iterable], num_components: int,
                  num_buckets: int = 1024, num_dot_buckets: int = 1024,
                  max_quantile_samples: int = 1 << 17, seed: int = 0) -> QuantizerFit:
    """Fit the PCA and both quantisers on a stream of batches, in two passes.

    Args:
      batches: a re-iterable (list, or a zero-argument callable returning a fresh iterable) of
        batches, each a dict with ``image_embed`` [B, D] and ``text_embed`` [B, D], a pair
        ``(image_embed, text_embed)``, or an ``image_embed`` array alone (then the dot-product
        quantiser is left as a single bucket around 0).
      num_components: how many principal components to keep (the paper: 319 of 1024).
      num_buckets / num_dot_buckets: buckets per component / for z_i . z_t (the paper: 1024).
      max_quantile_samples: the reservoir size used for bucket edges (exact below it).
    """
    make = batches if callable(batches) else (lambda: batches)
    first = make()
    if iter(first) is first and not callable(batches):
        raise ValueError("fit_quantizer makes two passes over the data: pass a list or a "
                         "zero-argument function that returns a fresh iterator, not an iterator.")

    acc = None
    for batch in first:
        z, _ = _as_pairs(batch)
        acc = acc or PCAAccumulator(z.shape[-1])
        acc.update(z)
    if acc is None:
        raise ValueError("fit_quantizer got no batches.")
    if not 0 < num_components <= acc.dim:
        raise ValueError(f"num_components must be in 1..{acc.dim} (the embedding width), got "
                         f"{num_components}.")
    eigenvalues, vectors = acc.eigen()
    components = vectors[:num_components]

    coeffs = Reservoir(max_quantile_samples, num_components, seed)
    dots = Reservoir(max_quantile_samples, 1, seed + 1)
    have_dots = True
    for batch in make():
        z, t = _as_pairs(batch)
        coeffs.update((np.asarray(z, np.float64) - acc.mean) @ components.T)
        if t is None:
            have_dots = False
        else:
            if t.shape != z.shape:
                raise ValueError(f"text_embed {t.shape} and image_embed {z.shape} must have the "
                                 "same shape.")
            dots.update(np.sum(np.asarray(z, np.float64) * t, axis=-1, keepdims=True))
    edges, centres = quantile_buckets(coeffs.rows, num_buckets)
    if have_dots and len(dots.rows):
        dot_edges, dot_centres = quantile_buckets(dots.rows, num_dot_buckets)
        dot_edges, dot_centres = dot_edges[0], dot_centres[0]
    else:
        dot_edges = np.linspace(-1.0, 1.0, num_dot_buckets + 1)
        dot_centres = (dot_edges[1:] + dot_edges[:-1]) / 2
    return QuantizerFit(mean=acc.mean, eigenvalues=eigenvalues, components=components,
                        edges=edges, centres=centres, dot_edges=dot_edges,
                        dot_centres=dot_centres, count=acc.count)


# --------------------------------------------------------------------------------------------
# Applying (JAX)
# --------------------------------------------------------------------------------------------

def _bucketize(x: Array, edges: Array) -> Array:
    """Bucket index of each ``x[..., c]`` against ``edges[c]`` [C, n+1] (or [n+1] for scalars)."""
    interior = edges[..., 1:-1]
    if interior.ndim == 1:
        return jnp.searchsorted(interior, x, side="right").astype(jnp.int32)
    # Per component: vmap over the component axis (the last axis of x).
    per = jax.vmap(lambda e, v: jnp.searchsorted(e, v, side="right"), in_axes=(0, -1),
                   out_axes=-1)
    return per(interior, x).astype(jnp.int32)


class PCAQuantizer(nnx.Module):
    """Embeddings [B, D] <-> bucket tokens [B, K]; dot products [B] <-> dot tokens [B].

    Built unfitted (zeros); :meth:`load_fit` copies a :class:`QuantizerFit` into its buffers.
    All buffers are float32 :class:`QuantizerBuffer` variables.
    """

    def __init__(self, dim: int, num_components: int, num_buckets: int = 1024,
                 num_dot_buckets: int = 1024):
        if not 0 < num_components <= dim:
            raise ValueError(f"num_components must be in 1..{dim} (the embedding width), got "
                             f"{num_components}.")
        if num_buckets < 2 or num_dot_buckets < 2:
            raise ValueError(f"num_buckets ({num_buckets}) and num_dot_buckets "
                             f"({num_dot_buckets}) must be at least 2.")
        self.dim, self.num_components = dim, num_components
        self.num_buckets, self.num_dot_buckets = num_buckets, num_dot_buckets
        z = lambda *shape: QuantizerBuffer(jnp.zeros(shape, jnp.float32))
        self.mean = z(dim)
        self.components = z(num_components, dim)
        self.eigenvalues = z(num_components)
        self.edges = z(num_components, num_buckets + 1)
        self.centres = z(num_components, num_buckets)
        self.dot_edges = z(num_dot_buckets + 1)
        self.dot_centres = z(num_dot_buckets)
        self.fitted = QuantizerBuffer(jnp.zeros((), jnp.int32))

    # -- state --------------------------------------------------------------------------------

    def load_fit(self, fit: QuantizerFit) -> None:
        """Copy a fit into the buffers; refuses a fit of another shape."""
        want = {"components": (self.num_components, self.dim),
                "edges": (self.num_components, self.num_buckets + 1),
                "dot_edges": (self.num_dot_buckets + 1,)}
        for name, shape in want.items():
            got = np.shape(getattr(fit, name))
            if got != shape:
                raise ValueError(
                    f"The fit's {name} has shape {got} but this quantizer needs {shape} "
                    f"(dim {self.dim}, {self.num_components} components, {self.num_buckets} "
                    f"buckets, {self.num_dot_buckets} dot buckets); refit with matching "
                    "num_components / num_buckets / num_dot_buckets.")
        f32 = lambda a: jnp.asarray(np.asarray(a, np.float64), jnp.float32)
        self.mean[...] = f32(fit.mean)
        self.components[...] = f32(fit.components)
        self.eigenvalues[...] = f32(fit.eigenvalues[:self.num_components])
        self.edges[...] = f32(fit.edges)
        self.centres[...] = f32(fit.centres)
        self.dot_edges[...] = f32(fit.dot_edges)
        self.dot_centres[...] = f32(fit.dot_centres)
        self.fitted[...] = jnp.ones((), jnp.int32)

    def is_fitted(self) -> bool:
        """Host-side check (not under jit)."""
        return bool(np.asarray(self.fitted[...]))

    def require_fitted(self) -> None:
        if not self.is_fitted():
            raise ValueError("The PCA quantizer has not been fitted: call "
                             "fit_quantizer(batches, num_components) and load_fit(fit) (or "
                             "restore a checkpoint that holds the fit) before training or "
                             "sampling the AR prior.")

    # -- maps ---------------------------------------------------------------------------------

    def project(self, z: Array) -> Array:
        """[B, D] -> principal coefficients [B, K] (float32)."""
        z = jnp.asarray(z, jnp.float32)
        return (z - self.mean[...]) @ self.components[...].T

    def unproject(self, coeffs: Array) -> Array:
        return coeffs @ self.components[...] + self.mean[...]

    def encode(self, z: Array) -> Array:
        """Embeddings [B, D] -> tokens [B, K] int32, component 0 the largest eigenvalue."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"Embeddings must have width {self.dim}, got shape {z.shape}.")
        return _bucketize(self.project(z), self.edges[...])

    def decode(self, tokens: Array) -> Array:
        """Tokens [B, K] -> embeddings [B, D] (each component at its bucket's centre)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.shape[-1] != self.num_components:
            raise ValueError(f"Tokens must be [batch, {self.num_components}], got shape "
                             f"{tokens.shape}.")
        coeffs = self.centres[...][jnp.arange(self.num_components), tokens]
        return self.unproject(coeffs)

    def encode_dot(self, dot: Array) -> Array:
        """z_i . z_t [B] -> dot tokens [B] int32."""
        return _bucketize(jnp.asarray(dot, jnp.float32), self.dot_edges[...])

    def decode_dot(self, tokens: Array) -> Array:
        return jnp.take(self.dot_centres[...], jnp.asarray(tokens, jnp.int32))

    def percentile_dot_token(self, percentile: float) -> int:
        """The dot token at the ``percentile`` (0-100) of the training z_i . z_t distribution."""
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
        return min(int(percentile / 100 * self.num_dot_buckets), self.num_dot_buckets - 1)
