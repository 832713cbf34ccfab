"""PCA + bucket quantiser of the AR prior: streaming fit, energy kept, round trip, dot token."""
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models.pca_quantizer import (
    PCAAccumulator,
    PCAQuantizer,
    Reservoir,
    fit_quantizer,
)

D, RANK, K = 1024, 300, 319


def low_rank_set(n, seed):
    """1024-dim data: a decaying spectrum in 300 directions (e^{-i/100}) plus isotropic noise
    holding 0.3% of the variance, around a non-zero mean; the same basis for every seed."""
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((D, RANK)))[0].T  # [300, D]
    lam = np.exp(-np.arange(RANK) / 100.0)
    noise_var = 0.003 * lam.sum() / D
    rng = np.random.default_rng(seed)
    signal = (rng.standard_normal((n, RANK)) * np.sqrt(lam)) @ basis
    mean = np.linspace(-0.05, 0.05, D)
    return (mean + signal + np.sqrt(noise_var) * rng.standard_normal((n, D))).astype(np.float32)


@pytest.fixture(scope="module")
def fitted():
    train = low_rank_set(8192, seed=1)
    batches = [train[i:i + 1024] for i in range(0, len(train), 1024)]  # streamed, 8 batches
    fit = fit_quantizer(batches, K, num_buckets=1024, num_dot_buckets=64)
    q = PCAQuantizer(D, K, 1024, 64)
    q.load_fit(fit)
    return train, fit, q


def rel_mse(z, rec):
    """Reconstruction MSE as a fraction of the data's energy (variance about the mean)."""
    z, rec = np.asarray(z, np.float64), np.asarray(rec, np.float64)
    return np.sum((z - rec) ** 2) / np.sum((z - z.mean(0)) ** 2)


def test_round_trip_keeps_the_paper_error_with_319_components(fitted):
    train, fit, q = fitted
    kept = fit.energy_kept
    assert kept[K - 1] > 0.99 and kept[RANK - 1] > 0.99
    assert kept[99] < 0.9  # the spectrum really is spread over ~300 directions
    assert fit.components_for(0.99) <= K
    assert "319 components" in fit.energy_report()

    held_out = low_rank_set(2048, seed=2)
    for z in (train[:2048], held_out):
        tokens = np.asarray(q.encode(jnp.asarray(z)))
        assert tokens.shape == (len(z), K) and tokens.dtype == np.int32
        assert tokens.min() >= 0 and tokens.max() <= 1023
        pca_only = rel_mse(z, q.unproject(q.project(jnp.asarray(z))))
        full = rel_mse(z, q.decode(jnp.asarray(tokens)))
        # The paper: 319 components keep the reconstruction error under 1%.
        assert full < 0.01, full
        # 1024 buckets add little on top of the truncation itself.
        assert full - pca_only < 0.002, (full, pca_only)
        assert pca_only == pytest.approx(1 - kept[K - 1], rel=0.15)


def test_components_are_ordered_and_buckets_equiprobable(fitted):
    train, fit, q = fitted
    eig = np.asarray(q.eigenvalues[...])
    assert np.all(np.diff(eig) <= 0) and eig[0] == pytest.approx(1.0, rel=0.1)
    coeffs = np.asarray(q.project(jnp.asarray(train)))
    np.testing.assert_allclose(coeffs.var(0)[:50], eig[:50], rtol=1e-3)
    # Quantile edges: every bucket of every component holds 8192 / 1024 = 8 training points.
    tokens = np.asarray(q.encode(jnp.asarray(train)))
    for c in (0, 150, K - 1):
        counts = np.bincount(tokens[:, c], minlength=1024)
        assert counts.min() >= 7 and counts.max() <= 9, (c, counts.min(), counts.max())
    # A bucket decodes to a value inside it.
    edges, centres = np.asarray(q.edges[...]), np.asarray(q.centres[...])
    assert np.all((edges[:, :-1] <= centres) & (centres <= edges[:, 1:]))


def test_streaming_moments_match_one_batch_in_float64():
    rng = np.random.default_rng(3)
    # A large offset and small spread: E[zz^T] - mu mu^T would lose most digits here.
    z = 1e4 + 1e-2 * rng.standard_normal((3000, 16)) @ rng.standard_normal((16, 16))
    acc = PCAAccumulator(16)
    for part in np.array_split(z, 7):
        acc.update(part)
    np.testing.assert_allclose(acc.mean, z.mean(0), rtol=1e-14)
    np.testing.assert_allclose(acc.scatter / acc.count, np.cov(z.T, bias=True), rtol=1e-9,
                               atol=1e-14)
    values, vectors = acc.eigen()
    np.testing.assert_allclose(values, np.sort(np.linalg.eigvalsh(np.cov(z.T, bias=True)))[::-1],
                               rtol=1e-8)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(16), atol=1e-12)


def test_dot_token_percentiles():
    rng = np.random.default_rng(4)
    z_i = rng.standard_normal((4000, 8))
    z_t = z_i + 2.0 * rng.standard_normal((4000, 8))
    dots = np.sum(z_i * z_t, -1)
    fit = fit_quantizer([{"image_embed": z_i[:2000], "text_embed": z_t[:2000]},
                         {"image_embed": z_i[2000:], "text_embed": z_t[2000:]}],
                        num_components=4, num_buckets=16, num_dot_buckets=100)
    q = PCAQuantizer(8, 4, 16, 100)
    q.load_fit(fit)
    tokens = np.asarray(q.encode_dot(jnp.asarray(dots)))
    assert np.bincount(tokens, minlength=100).tolist() == [40] * 100
    for p in (50, 70, 85, 95):
        tok = q.percentile_dot_token(p)
        assert tok == p  # 100 equiprobable buckets
        value = float(q.decode_dot(jnp.asarray([tok]))[0])
        lo, hi = np.percentile(dots, [p - 1, p + 1])
        assert lo <= value <= hi and int(q.encode_dot(jnp.asarray([value]))[0]) == tok


def test_reservoir_is_exact_below_capacity_and_a_sample_above():
    x = np.arange(3000, dtype=np.float64)[:, None]
    small = Reservoir(5000, 1, seed=0)
    for part in np.array_split(x, 4):
        small.update(part)
    np.testing.assert_array_equal(small.rows, x)
    big = Reservoir(500, 1, seed=0)
    for part in np.array_split(x, 4):
        big.update(part)
    assert big.rows.shape == (500, 1) and big.seen == 3000
    assert len(np.unique(big.rows)) == 500
    assert big.rows.max() > 2500 and 1200 < big.rows.mean() < 1800  # drawn from the whole stream


def test_bad_input_is_refused_clearly():
    z = np.random.default_rng(0).standard_normal((64, 8))
    with pytest.raises(ValueError, match="two passes"):
        fit_quantizer(iter([z]), 4)
    with pytest.raises(ValueError, match="num_components"):
        fit_quantizer([z], 9)
    with pytest.raises(ValueError, match="NaN"):
        fit_quantizer([np.full((4, 8), np.nan)], 2)
    fit = fit_quantizer(lambda: iter([z]), 4, num_buckets=8, num_dot_buckets=8)  # callable: ok
    q = PCAQuantizer(8, 3, 8, 8)
    with pytest.raises(ValueError, match="refit"):
        q.load_fit(fit)
    with pytest.raises(ValueError, match="not been fitted"):
        q.require_fitted()
