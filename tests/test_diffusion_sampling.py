"""Samplers with exact denoisers of known data distributions, inversion, and loop structure.

Data x0 ~ N(MU, S^2) per dimension has a closed-form denoiser at every noise level. S = 0.5:
with much narrower data (S = 0.3) the posterior mean saturates so close to t = 0 that no
20-step uniform-in-time grid resolves it (DPM-Solver++ then lands ~6% low in variance on
diffusers' own grid, and that is the method, not the code).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion as D

BASE = D.get_schedule("cosine", 1000)
ACP64 = np.cumprod(1 - D.cosine_betas(1000))
MU, S = 0.5, 0.5
N_SAMPLES, DIM = 20000, 4


def _acp_of(t, x):
    return D.extract(BASE.alphas_cumprod, t, x.ndim)


def gaussian_model(prediction_type="epsilon", variance_schedule=None):
    """The exact denoiser of x0 ~ N(MU, S^2) per dimension, in the requested parametrisation.

    With `variance_schedule` (the schedule the sampler steps through), it also outputs the
    learned-range channels that make the reverse step the EXACT reverse conditional:
    variance = posterior variance + coef1^2 Var[x0 | x_t].
    """

    def model_fn(x, t):
        a2 = _acp_of(t, x)
        a, sig = jnp.sqrt(a2), jnp.sqrt(1.0 - a2)
        den = a2 * S**2 + 1.0 - a2
        eps = sig * (x - a * MU) / den
        x0 = MU + a * S**2 * (x - a * MU) / den
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - sig * x0}[prediction_type]
        if variance_schedule is None:
            return out
        sch = variance_schedule
        i = jnp.searchsorted(sch.timesteps, t)
        var = D.extract(sch.posterior_variance, i, x.ndim) + D.extract(
            sch.posterior_mean_coef1, i, x.ndim) ** 2 * S**2 * (1.0 - a2) / den
        lo = D.extract(sch.posterior_log_variance_clipped, i, x.ndim)
        hi = D.extract(jnp.log(sch.betas), i, x.ndim)
        frac = jnp.clip((jnp.log(var) - lo) / (hi - lo), 0.0, 1.0)
        return jnp.concatenate([out, jnp.broadcast_to(2.0 * frac - 1.0, x.shape)], axis=-1)

    return model_fn


def check_moments(x, rel=0.02):
    x = np.asarray(x)
    assert np.all(np.isfinite(x))
    assert abs(x.mean() - MU) < rel * MU, x.mean()
    assert abs(x.var() - S**2) < rel * S**2, x.var()


@functools.lru_cache(maxsize=None)
def x_T():
    return jax.random.normal(jax.random.PRNGKey(0), (N_SAMPLES, DIM))


def test_ddpm_1000_steps_reaches_gaussian_moments():
    run = jax.jit(lambda x, key: D.ddpm_sample(gaussian_model(), BASE, x, key))
    check_moments(run(x_T(), jax.random.PRNGKey(1)))


def test_ddpm_learned_range_with_exact_variance_is_exact_in_25_steps():
    # With the exact mean and variance every ancestral step is the true reverse conditional,
    # so even 25 respaced steps give the data distribution; fixed_small does not (too narrow).
    sch = D.respace(BASE, D.space_timesteps(1000, "25"))
    model = gaussian_model("sample", variance_schedule=sch)
    run = jax.jit(lambda x, key, vt: D.ddpm_sample(model, sch, x, key, prediction_type="sample",
                                                   variance_type=vt), static_argnums=2)
    check_moments(run(x_T(), jax.random.PRNGKey(2), "learned_range"))
    small = run(x_T(), jax.random.PRNGKey(2), "fixed_small")
    assert float(small.var()) < 0.95 * S**2


def test_unclip_learned_range_with_exact_variance_is_exact_in_25_steps():
    ts = D.space_timesteps(1000, "linspace25")
    model = gaussian_model(variance_schedule=D.respace(BASE, ts))
    run = jax.jit(lambda x, key: D.unclip_sample(model, BASE, x, ts[::-1], key, variance_type="learned_range"))
    check_moments(run(x_T(), jax.random.PRNGKey(3)))


def test_dpm_solver_pp_20_steps_reaches_gaussian_moments():
    sch = D.respace(BASE, D.space_timesteps(1000, "dpmsolver20"))
    x = jax.jit(lambda x: D.dpm_solver_pp_sample(gaussian_model(), sch, x))(x_T())
    check_moments(x)
    # A first-order solver (DDIM) on the same grid is far less accurate.
    ddim = jax.jit(lambda x: D.ddim_sample(gaussian_model(), sch, x))(x_T())
    assert abs(float(ddim.var()) - S**2) > 5 * abs(float(x.var()) - S**2)


def ddim_closed_form(x_T, timesteps):
    """DDIM (eta 0) with the exact Gaussian denoiser is affine: each step from t to s multiplies
    x - sqrt(acp) MU by (a_s a_t S^2 + sig_s sig_t) / (a_t^2 S^2 + sig_t^2); float64."""
    a = np.sqrt(ACP64[timesteps[::-1]])
    sig = np.sqrt(1 - ACP64[timesteps[::-1]])
    a_next = np.append(a[1:], 1.0)
    sig_next = np.append(sig[1:], 0.0)
    gain = np.prod((a_next * a * S**2 + sig_next * sig) / (a**2 * S**2 + sig**2))
    return MU + gain * (np.asarray(x_T, np.float64) - a[0] * MU)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_ddim_50_steps_matches_closed_form(prediction_type):
    use = D.space_timesteps(1000, "ddim50")
    sch = D.respace(BASE, use)
    x = jax.jit(lambda x: D.ddim_sample(gaussian_model(prediction_type), sch, x,
                                        prediction_type=prediction_type))(x_T())
    np.testing.assert_allclose(np.asarray(x), ddim_closed_form(x_T(), use), atol=2e-5)
    # DDIM's known bias on Gaussian data: it contracts the variance (here by ~6%); mean is exact.
    check_moments(x, rel=0.08)
    assert abs(float(x.mean()) - MU) < 0.02 * MU


def test_ddim_eta1_matches_ddpm_moments():
    x = jax.jit(lambda x, k: D.ddim_sample(gaussian_model(), BASE, x, k, eta=1.0))(x_T(), jax.random.PRNGKey(4))
    check_moments(x)


def test_ddim_inversion_reconstructs_gaussian_images():
    x0 = MU + S * jax.random.normal(jax.random.PRNGKey(6), (4, 8, 8, 3))
    model = gaussian_model()

    def roundtrip_error(spec, refine_iters):
        sch = D.respace(BASE, D.space_timesteps(1000, spec))
        f = jax.jit(lambda x: D.ddim_sample(model, sch, D.ddim_invert(model, sch, x, refine_iters=refine_iters)))
        return float(jnp.max(jnp.abs(f(x0) - x0)))

    # Standard inversion: first-order error, halving when the steps double.
    e50, e100 = roundtrip_error("ddim50", 0), roundtrip_error("ddim100", 0)
    assert e50 < 0.1 and 1.7 < e50 / e100 < 2.3, (e50, e100)
    # With fixed-point refinement the sampler's step is inverted exactly. (A grid that reaches
    # t = 999, where acp = 2e-9, floors float32 round trips at ~3e-4; 'ddim50' stops at 980.)
    assert roundtrip_error("ddim50", 6) < 5e-5


# A 2-D Gaussian mixture: a nonlinear probability-flow ODE.
MEANS = jnp.array([[-0.6, 0.3], [0.5, 0.5], [0.1, -0.7]])
STDS = jnp.array([0.15, 0.25, 0.1])
WEIGHTS = jnp.array([0.3, 0.5, 0.2])


def mixture_eps(x, t):
    a2 = _acp_of(t, x)[:, :, None]  # [B, 1, 1]
    a, sig = jnp.sqrt(a2), jnp.sqrt(1.0 - a2)
    var = a2 * STDS[None, :, None] ** 2 + 1.0 - a2  # [B, K, 1]
    diff = x[:, None, :] - a * MEANS[None]  # [B, K, 2]
    logp = jnp.log(WEIGHTS) - jnp.sum(diff**2 / (2 * var), -1) - jnp.log(var[..., 0])
    r = jax.nn.softmax(logp, axis=-1)[..., None]
    return jnp.sum(r * sig * diff / var, axis=1)


def test_ddim_inversion_reconstructs_mixture_samples():
    k1, k2 = jax.random.split(jax.random.PRNGKey(5))
    comp = jax.random.choice(k1, 3, (256,), p=WEIGHTS)
    x0 = MEANS[comp] + STDS[comp, None] * jax.random.normal(k2, (256, 2))
    sch = D.respace(BASE, D.space_timesteps(1000, "ddim200"))

    @functools.partial(jax.jit, static_argnums=1)
    def roundtrip(x0, refine_iters):
        xT = D.ddim_invert(mixture_eps, sch, x0, refine_iters=refine_iters)
        return xT, D.ddim_sample(mixture_eps, sch, xT)

    xT, rec = roundtrip(x0, 3)
    err = np.asarray(jnp.max(jnp.abs(rec - x0), axis=-1))
    assert err.max() < 1e-3, err.max()
    _, rec0 = roundtrip(x0, 0)
    err0 = np.asarray(jnp.max(jnp.abs(rec0 - x0), axis=-1))
    assert np.median(err0) < 2e-2 and np.median(err0) > 100 * np.median(err)
    # The latent is a genuinely noised version (near standard normal), not a copy of x0, and
    # sampling from a different latent does not land on the same points.
    assert 0.7 < float(jnp.std(xT)) < 1.3
    assert float(jnp.mean(jnp.abs(xT - x0))) > 0.3
    other = jax.jit(lambda z: D.ddim_sample(mixture_eps, sch, z))(xT + 0.5)
    assert float(jnp.max(jnp.abs(other - x0))) > 0.1


def test_explicit_noise_replaces_rng():
    sch = D.respace(BASE, D.space_timesteps(1000, "10"))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2))
    noise = jax.random.normal(jax.random.PRNGKey(1), (10, 3, 2))
    a = D.ddpm_sample(gaussian_model(), sch, x, jax.random.PRNGKey(7), noise=noise)
    b = D.ddpm_sample(gaussian_model(), sch, x, jax.random.PRNGKey(8), noise=noise)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The same as stepping by hand with those draws, entry k at the k-th step.
    y = x
    for k, i in enumerate(range(9, -1, -1)):
        out = gaussian_model()(y, jnp.full((3,), sch.timesteps[i]))
        y, _ = D.ddpm_step(sch, out, y, i, noise[k])
    np.testing.assert_allclose(np.asarray(a), np.asarray(y), rtol=1e-4, atol=1e-5)
    c = D.ddpm_sample(gaussian_model(), sch, x, jax.random.PRNGKey(7))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match="noise must have shape"):
        D.ddpm_sample(gaussian_model(), sch, x, noise=noise[:5])
    with pytest.raises(ValueError, match="rng"):
        D.ddpm_sample(gaussian_model(), sch, x)


def _count_eqns(jaxpr):
    """Equations in a jaxpr, including those of nested jaxprs (scan / while bodies, pjit calls)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for v in eqn.params.values():
            for j in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
                    n += _count_eqns(j.jaxpr)
                elif hasattr(j, "eqns"):
                    n += _count_eqns(j)
    return n


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm", "unclip", "invert"])
def test_loop_program_size_does_not_grow_with_steps(sampler):
    def program(steps):
        sch = D.respace(BASE, D.space_timesteps(1000, f"linspace{steps}"))
        ts = jnp.asarray(D.space_timesteps(1000, f"linspace{steps}")[::-1])
        model = gaussian_model()

        def f(sch, ts, x, key):
            if sampler == "ddpm":
                return D.ddpm_sample(model, sch, x, key)
            if sampler == "ddim":
                return D.ddim_sample(model, sch, x, key, eta=0.5, clip="dynamic")
            if sampler == "dpm":
                return D.dpm_solver_pp_sample(model, sch, x, clip="static")
            if sampler == "unclip":
                return D.unclip_sample(model, BASE, x, ts, key, clip="static")
            return D.ddim_invert(model, sch, x, refine_iters=2)

        jaxpr = jax.make_jaxpr(f)(sch, ts, jnp.zeros((2, 4, 4, 3)), jax.random.PRNGKey(0))
        return _count_eqns(jaxpr.jaxpr)

    small, large = program(10), program(100)
    assert small == large
    assert small > 40, small  # the loop body (model + step) was counted, not just the scan
