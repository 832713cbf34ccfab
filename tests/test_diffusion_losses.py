"""Forward process, parametrisations and training losses against closed forms and SciPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from unclip_jax import diffusion as D

SCH = D.get_schedule("cosine", 1000)
SHAPE = (6, 4, 4, 3)


def _data(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    # Images on the 256-level grid in [-1, 1], as the decoder NLL assumes.
    x0 = jnp.round((jax.random.uniform(k1, SHAPE) * 2 - 1) * 127.5) / 127.5
    x0 = jnp.clip(x0, -1, 1)
    noise = jax.random.normal(k2, SHAPE)
    return x0, noise


def test_parametrisations_round_trip():
    x0, eps = _data()
    t = jnp.array([0, 1, 10, 500, 900, 999])
    x_t = D.q_sample(SCH, x0, t, eps)
    a = np.sqrt(np.cumprod(1 - D.cosine_betas(1000))[np.asarray(t)]).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(np.asarray(x_t), a * np.asarray(x0) + np.sqrt(1 - a**2) * np.asarray(eps), atol=1e-6)
    v = D.v_from_x0_eps(SCH, x0, eps, t)
    np.testing.assert_allclose(np.asarray(v), a * np.asarray(eps) - np.sqrt(1 - a**2) * np.asarray(x0), atol=1e-6)
    tt = t[1:5]  # away from the float32-ill-conditioned ends
    sl = slice(1, 5)
    for ptype, out in [("epsilon", eps), ("sample", x0), ("v_prediction", v)]:
        np.testing.assert_allclose(np.asarray(D.predict_x0(SCH, out[sl], x_t[sl], tt, ptype)),
                                   np.asarray(x0[sl]), atol=2e-4)
        np.testing.assert_allclose(np.asarray(D.predict_eps(SCH, out[sl], x_t[sl], tt, ptype)),
                                   np.asarray(eps[sl]), atol=2e-4)
        np.testing.assert_array_equal(np.asarray(D.training_target(SCH, x0, eps, t, ptype)), np.asarray(out))
    with pytest.raises(ValueError, match="prediction_type"):
        D.predict_x0(SCH, eps, x_t, t, "score")


def test_posterior_matches_bayes_rule():
    # q(x_{t-1} | x_t, x0) from the product of q(x_t | x_{t-1}) and q(x_{t-1} | x0), in float64.
    x0, eps = _data(1)
    t = jnp.array([1, 2, 50, 400, 800, 999])
    x_t = D.q_sample(SCH, x0, t, eps)
    mean, var, logvar = D.q_posterior_mean_variance(SCH, x0, x_t, t)
    acp = np.cumprod(1 - D.cosine_betas(1000))
    tn = np.asarray(t)
    beta, a_prev = 1 - acp[tn] / acp[tn - 1], acp[tn - 1]
    prec = 1 / (1 - a_prev) + (1 - beta) / beta
    var_ref = 1 / prec
    mean_ref = var_ref.reshape(-1, 1, 1, 1) * (
        np.sqrt(a_prev).reshape(-1, 1, 1, 1) * np.asarray(x0) / (1 - a_prev).reshape(-1, 1, 1, 1)
        + np.sqrt(1 - beta).reshape(-1, 1, 1, 1) * np.asarray(x_t) / beta.reshape(-1, 1, 1, 1))
    np.testing.assert_allclose(np.asarray(var).ravel(), var_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logvar).ravel(), np.log(var_ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mean), mean_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("m1,lv1,m2,lv2", [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.2, 0.5), (1.0, 1.2, 0.5, -2.0)])
def test_normal_kl_matches_numerical_integral(m1, lv1, m2, lv2):
    p, q = stats.norm(m1, np.exp(0.5 * lv1)), stats.norm(m2, np.exp(0.5 * lv2))
    ref, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -30, 30, points=[m1, m2], limit=200)
    ours = float(D.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2), jnp.float32(lv2)))
    assert ours == pytest.approx(ref, abs=1e-5, rel=1e-4)


def test_discretized_log_likelihood_matches_scipy():
    x = np.array([-1.0, -1 + 2 / 255, -0.2, 0.0, 0.5, 1 - 2 / 255, 1.0, 0.9])
    means = np.array([-0.95, -1.0, -0.21, 0.3, 0.49, 0.99, 0.98, -0.5])
    log_scales = np.array([-3.0, -5.0, -4.0, -1.0, -6.0, -3.0, -2.0, -8.0])
    sd = np.exp(log_scales)
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
    # Survival functions for bins above the mean keep the reference accurate in the tails.
    ref = np.log(np.maximum(np.where(lower > means,
                                     stats.norm.sf(lower, means, sd) - stats.norm.sf(upper, means, sd),
                                     stats.norm.cdf(upper, means, sd) - stats.norm.cdf(lower, means, sd)), 1e-12))
    ours = np.asarray(D.discretized_gaussian_log_likelihood(jnp.asarray(x, jnp.float32), jnp.asarray(means, jnp.float32),
                                                            jnp.asarray(log_scales, jnp.float32)))
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4)
    assert ours[-1] == pytest.approx(np.log(1e-12))  # far outside: floored, finite


def _const_model(out):
    return lambda x_t, t: out


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_mse_loss_zero_at_exact_target_and_positive_elsewhere(prediction_type):
    x0, eps = _data(2)
    t = jnp.array([0, 5, 100, 500, 900, 999])
    target = D.training_target(SCH, x0, eps, t, prediction_type)
    loss, terms = D.training_losses(_const_model(target), SCH, x0, t, eps, prediction_type=prediction_type)
    assert float(jnp.max(jnp.abs(loss))) == 0.0 and loss.shape == (6,)
    loss, _ = D.training_losses(_const_model(target + 0.1), SCH, x0, t, eps, prediction_type=prediction_type)
    np.testing.assert_allclose(np.asarray(loss), 0.01, rtol=1e-4)
    w = jnp.arange(6.0)
    loss_w, _ = D.training_losses(_const_model(target + 0.1), SCH, x0, t, eps, prediction_type=prediction_type,
                                  weights=w)
    np.testing.assert_allclose(np.asarray(loss_w), 0.01 * np.arange(6.0), rtol=1e-4)


def test_vlb_is_zero_at_the_true_posterior_and_matches_decoder_nll_at_t0():
    x0, eps = _data(3)
    t = jnp.array([0, 1, 7, 250, 600, 998])
    # Exact noise => exact x0 and posterior mean; v = -1 => the (clipped) posterior variance.
    out = jnp.concatenate([eps, -jnp.ones_like(eps)], axis=-1)
    loss, terms = D.training_losses(_const_model(out), SCH, x0, t, eps, learned_variance=True)
    vb = np.asarray(terms["vb"])
    np.testing.assert_allclose(vb[1:], 0.0, atol=1e-8)
    assert float(terms["mse"].max()) == 0.0
    # At t = 0 the term is the decoder NLL in bits of x0 under N(x0^, posterior_variance[1]).
    sd = np.exp(0.5 * float(SCH.posterior_log_variance_clipped[0]))
    x = np.asarray(x0[0], np.float64)
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
    p = stats.norm.cdf(upper, x, sd) - stats.norm.cdf(lower, x, sd)
    assert vb[0] == pytest.approx(-np.mean(np.log(p)) / np.log(2), rel=1e-3)
    # A wrong mean and variance give a positive KL; the hybrid loss weights it by 0.001 * T = 1.
    out = jnp.concatenate([eps + 0.1, jnp.ones_like(eps)], axis=-1)
    loss, terms = D.training_losses(_const_model(out), SCH, x0, t, eps, learned_variance=True)
    assert np.all(np.asarray(terms["vb"])[1:] > 1e-5), terms["vb"]
    np.testing.assert_allclose(np.asarray(loss), np.asarray(terms["mse"] + terms["vb"]), rtol=1e-6)


def test_vlb_gradient_reaches_only_variance_channels():
    x0, eps = _data(4)
    t = jnp.array([0, 3, 80, 300, 700, 990])
    mean_p = eps + 0.3 * jax.random.normal(jax.random.PRNGKey(9), SHAPE)
    var_p = 0.4 * jnp.ones(SHAPE)

    def term(name, mean_p, var_p):
        model = lambda x_t, tt: jnp.concatenate([mean_p, var_p], axis=-1)  # noqa: E731
        return D.training_losses(model, SCH, x0, t, eps, learned_variance=True)[1][name].sum()

    g_mean, g_var = jax.grad(term, argnums=(1, 2))("vb", mean_p, var_p)
    assert float(jnp.max(jnp.abs(g_mean))) == 0.0
    assert float(jnp.max(jnp.abs(g_var))) > 1e-4
    g_mean, g_var = jax.grad(term, argnums=(1, 2))("mse", mean_p, var_p)
    assert float(jnp.max(jnp.abs(g_var))) == 0.0 and float(jnp.max(jnp.abs(g_mean))) > 1e-4
    assert np.all(np.isfinite(np.asarray(jax.grad(term, argnums=2)("loss", mean_p, var_p))))


def test_diffusion_loss_draws_t_and_noise():
    x0, _ = _data(5)
    seen = {}

    def model(x_t, t):
        seen["t"] = t
        return jnp.zeros_like(x_t)

    loss, terms = jax.jit(lambda x, k: D.diffusion_loss(model, SCH, x, k))(x0, jax.random.PRNGKey(0))
    t = np.asarray(terms["t"])
    assert t.shape == (6,) and t.min() >= 0 and t.max() < 1000 and len(set(t.tolist())) > 1
    # Zero prediction of standard-normal noise: the MSE is the noise's mean square, ~1.
    assert 0.7 < float(loss) < 1.3
    assert float(loss) == pytest.approx(float(terms["loss"].mean()), rel=1e-6)
    with pytest.raises(ValueError, match="learned_variance"):
        D.diffusion_loss(model, SCH, x0, jax.random.PRNGKey(0), learned_variance=True)


def test_respaced_training_feeds_original_timesteps():
    sch = D.respace(SCH, D.space_timesteps(1000, "10"))
    x0, eps = _data(6)
    got = {}

    def model(x_t, t):
        got["t"] = t
        return jnp.zeros_like(x_t)

    D.training_losses(model, sch, x0, jnp.array([0, 1, 2, 3, 9, 9]), eps)
    np.testing.assert_array_equal(np.asarray(got["t"]), np.asarray(sch.timesteps)[[0, 1, 2, 3, 9, 9]])
