"""Schedules and respacing against diffusers' schedulers and the defining formulas."""
import numpy as np
import pytest
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UnCLIPScheduler

from unclip_jax import diffusion as D


def test_cosine_schedule_matches_diffusers_squaredcos_cap_v2():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    ours = D.get_schedule("cosine", 1000)
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=0, atol=1e-8)
    # diffusers accumulates the product in float32; ours in float64, hence rtol 3e-5.
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=3e-5)
    assert np.asarray(ours.betas).max() == pytest.approx(0.999)


def test_linear_schedule_matches_diffusers_linear():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    ours = D.get_schedule("linear", 1000)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=2e-6)
    # ADM's scaling for other lengths, and explicit endpoints.
    b = D.linear_betas(250)
    assert b[0] == pytest.approx(4e-4) and b[-1] == pytest.approx(0.08)
    b = D.linear_betas(100, start=1e-3, end=2e-2)
    assert b[0] == pytest.approx(1e-3) and b[-1] == pytest.approx(2e-2)


def test_schedule_derived_terms_are_consistent():
    s = D.get_schedule("cosine", 1000)
    acp = np.cumprod(1 - D.cosine_betas(1000))
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), acp, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod_prev)[1:], acp[:-1], rtol=1e-6)
    assert float(s.alphas_cumprod_prev[0]) == 1.0
    # Posterior mean coefficients reproduce x_t when x0 is consistent with a noiseless path:
    # coef1 * 1 + coef2 * sqrt(acp) == sqrt(acp_prev) for x0 = 1, x_t = sqrt(acp).
    lhs = np.asarray(s.posterior_mean_coef1) + np.asarray(s.posterior_mean_coef2) * np.sqrt(acp)
    np.testing.assert_allclose(lhs, np.sqrt(np.asarray(s.alphas_cumprod_prev)), rtol=1e-5)
    assert float(s.posterior_variance[0]) == 0.0
    assert float(s.posterior_log_variance_clipped[0]) == pytest.approx(np.log(float(s.posterior_variance[1])))
    np.testing.assert_array_equal(np.asarray(s.timesteps), np.arange(1000))


@pytest.mark.parametrize("n", [7, 25, 64])
def test_linspace_spacing_matches_unclip_scheduler(n):
    ref = UnCLIPScheduler()
    ref.set_timesteps(n)
    np.testing.assert_array_equal(D.space_timesteps(1000, f"linspace{n}")[::-1], ref.timesteps.numpy())


@pytest.mark.parametrize("n", [10, 50, 250])
def test_ddim_spacing_matches_ddim_scheduler(n):
    ref = DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    ref.set_timesteps(n)
    np.testing.assert_array_equal(D.space_timesteps(1000, f"ddim{n}")[::-1], ref.timesteps.numpy())


@pytest.mark.parametrize("n", [10, 20])
def test_dpmsolver_spacing_matches_dpm_solver_scheduler(n):
    ref = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2")
    ref.set_timesteps(n)
    np.testing.assert_array_equal(D.space_timesteps(1000, f"dpmsolver{n}")[::-1], ref.timesteps.numpy())


def test_section_spacing_adm_semantics():
    # One section: evenly spaced, both ends included.
    np.testing.assert_array_equal(D.space_timesteps(100, "5"), [0, 25, 50, 74, 99])
    # Three sections of sizes 34, 33, 33 with 4, 2, 1 steps.
    np.testing.assert_array_equal(D.space_timesteps(100, "4,2,1"), [0, 11, 22, 33, 34, 66, 67])
    assert len(D.space_timesteps(1000, "10,10,5")) == 25
    with pytest.raises(ValueError):
        D.space_timesteps(10, "11")
    with pytest.raises(ValueError):
        D.space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError):
        D.space_timesteps(1000, "fast")


def test_respace_keeps_cumulative_products_and_original_timesteps():
    base = D.get_schedule("cosine", 1000)
    use = D.space_timesteps(1000, "linspace25")
    sp = D.respace(base, use)
    np.testing.assert_array_equal(np.asarray(sp.timesteps), use)
    np.testing.assert_allclose(np.asarray(sp.alphas_cumprod), np.asarray(base.alphas_cumprod)[use], rtol=1e-5)
    acp = np.asarray(base.alphas_cumprod, np.float64)[use]
    np.testing.assert_allclose(np.asarray(sp.betas)[1:], 1 - acp[1:] / acp[:-1], rtol=1e-5)
    # Respacing composes: indices are into the given schedule, timesteps stay original.
    sp2 = D.respace(sp, [0, 12, 24])
    np.testing.assert_array_equal(np.asarray(sp2.timesteps), use[[0, 12, 24]])
    np.testing.assert_allclose(np.asarray(sp2.alphas_cumprod), acp[[0, 12, 24]], rtol=1e-5)
    # Identity respacing changes nothing.
    same = D.respace(base, np.arange(1000))
    np.testing.assert_allclose(np.asarray(same.betas), np.asarray(base.betas), rtol=1e-6)
