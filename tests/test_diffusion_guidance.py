"""Classifier-free guidance on plain and learned-variance outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion as D


def _outs(channels=3):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return jax.random.normal(k1, (2, 4, 4, channels)), jax.random.normal(k2, (2, 4, 4, channels))


def test_cfg_formula_and_special_scales():
    cond, uncond = _outs()
    np.testing.assert_array_equal(np.asarray(D.cfg(cond, uncond, 1.0)), np.asarray(cond))
    np.testing.assert_allclose(np.asarray(D.cfg(cond, uncond, 0.0)), np.asarray(uncond), atol=1e-6)
    np.testing.assert_allclose(np.asarray(D.cfg(cond, uncond, 4.0)), np.asarray(uncond + 4.0 * (cond - uncond)),
                               rtol=1e-6)
    # Per-example scales [B].
    g = D.cfg(cond, uncond, jnp.array([1.0, 0.0]))
    np.testing.assert_array_equal(np.asarray(g[0]), np.asarray(cond[0]))
    np.testing.assert_allclose(np.asarray(g[1]), np.asarray(uncond[1]), atol=1e-6)


def test_cfg_keeps_conditional_variance_channels():
    cond, uncond = _outs(6)
    g = D.cfg(cond, uncond, 8.0, learned_variance=True)
    np.testing.assert_array_equal(np.asarray(g[..., 3:]), np.asarray(cond[..., 3:]))
    np.testing.assert_allclose(np.asarray(g[..., :3]),
                               np.asarray(uncond[..., :3] + 8.0 * (cond[..., :3] - uncond[..., :3])), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(D.cfg(cond, uncond, 1.0, learned_variance=True)), np.asarray(cond))
    with pytest.raises(ValueError):
        D.cfg(cond, uncond[..., :3], 2.0)


@pytest.mark.parametrize("learned", [False, True])
def test_guided_model_fn_runs_one_doubled_batch(learned):
    calls = []

    def both(x2, t2):
        calls.append((x2.shape, t2.shape))
        b = x2.shape[0] // 2
        # Conditional rows [:B] get +1, unconditional rows [B:] get -1 (a stand-in for text).
        sign = jnp.concatenate([jnp.ones((b, 1, 1, 1)), -jnp.ones((b, 1, 1, 1))])
        mean = x2 * 0.5 + sign + t2.reshape(-1, 1, 1, 1) * 1e-3
        return jnp.concatenate([mean, jnp.tanh(x2) * sign], axis=-1) if learned else mean

    x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 2))
    t = jnp.array([5, 6, 7], jnp.int32)
    out = D.guided_model_fn(both, 3.0)(x, t)
    assert calls == [((6, 4, 4, 2), (6,))]
    expected_mean = x * 0.5 + t.reshape(-1, 1, 1, 1) * 1e-3 + (-1 + 3.0 * 2)  # uncond + 3 (cond - uncond)
    np.testing.assert_allclose(np.asarray(out[..., :2]), np.asarray(expected_mean), rtol=1e-5, atol=1e-5)
    if learned:
        np.testing.assert_allclose(np.asarray(out[..., 2:]), np.asarray(jnp.tanh(x)), rtol=1e-6)
    else:
        assert out.shape == x.shape


def test_guided_model_fn_inside_a_jitted_sampler():
    base = D.get_schedule("cosine", 1000)
    sch = D.respace(base, D.space_timesteps(1000, "ddim10"))

    def both(x2, t2):
        b = x2.shape[0] // 2
        target = jnp.concatenate([jnp.full((b, 2), 0.5), jnp.full((b, 2), -0.5)])
        return jnp.broadcast_to(target, x2.shape)  # x0 prediction: cond -> 0.5, uncond -> -0.5

    x_T = jax.random.normal(jax.random.PRNGKey(2), (4, 2))
    run = jax.jit(lambda x, s: D.ddim_sample(D.guided_model_fn(both, s), sch, x, prediction_type="sample"))
    np.testing.assert_allclose(np.asarray(run(x_T, 1.0)), 0.5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(run(x_T, 2.0)), 1.5, atol=1e-5)
