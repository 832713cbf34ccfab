"""Step-by-step parity with diffusers' schedulers, given the same model output and noise.

The reference schedulers run diffusers' own step code in float64 on the float64 version of
their beta schedule (`ours_from` installs it, `double` widens what set_timesteps made): in
float32, diffusers accumulates alphas_cumprod with ~1e-5 relative error and forms
1 - acp_t / acp_prev by cancellation (~1e-3 relative at small t), whereas our float32 constants
are derived in float64. That the schedules themselves agree is test_diffusion_schedules' job.
Inputs are drawn in float32 and widened, so both sides see identical values. diffusers is NCHW;
we are NHWC.
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UnCLIPScheduler

from unclip_jax import diffusion as D

SHAPE = (2, 3, 4, 4)  # NCHW
TOL = dict(rtol=1e-5, atol=1e-5)


def double(ref):
    """Switch a diffusers scheduler's float tensors to float64 (call after set_timesteps)."""
    for name, value in list(vars(ref).items()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(ref, name, value.double())
    return ref


def nhwc(a):
    return jnp.asarray(np.transpose(np.asarray(a), (0, 2, 3, 1)), dtype=jnp.float32)


def nchw(a):
    return np.transpose(np.asarray(a, dtype=np.float64), (0, 3, 1, 2))


def ours_from(ref):
    """Give `ref` the float64 version of its beta schedule; return our schedule for the same betas.

    Call before set_timesteps (DPM-Solver derives its sigmas there)."""
    cfg = ref.config
    if cfg.beta_schedule == "squaredcos_cap_v2":
        betas = D.cosine_betas(cfg.num_train_timesteps)
    else:
        betas = np.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=np.float64)
    b = torch.tensor(betas, dtype=torch.float64)
    ref.betas, ref.alphas, ref.alphas_cumprod = b, 1 - b, torch.cumprod(1 - b, dim=0)
    if hasattr(ref, "lambda_t"):  # DPM-Solver's per-step tables
        acp = ref.alphas_cumprod
        ref.alpha_t, ref.sigma_t = acp.sqrt(), (1 - acp).sqrt()
        ref.lambda_t = ref.alpha_t.log() - ref.sigma_t.log()
        ref.sigmas = ((1 - acp) / acp).sqrt()
    double(ref)
    return D.make_schedule(betas)


def inputs(seed, learned=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    out = torch.randn(SHAPE, generator=g)
    if learned:
        v = torch.rand(SHAPE, generator=g) * 2 - 1
        out = torch.cat([out, v], dim=1)
    return x.double(), out.double()


def torch_noise(seed, n=1, shape=SHAPE):
    """The draws diffusers makes from a generator seeded with `seed` for float64 model outputs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def mixed_tol(ref, ours):
    # Unclipped x0 at t ~ 999 is ~1e4 in size; compare relative to the magnitude there.
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_ddpm_scheduler(prediction_type, variance_type, clip):
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type=variance_type,
                        prediction_type=prediction_type, clip_sample=clip, clip_sample_range=1.0)
    sch = ours_from(ref)
    double(ref)
    for k, t in enumerate([999, 640, 1, 0]):
        x, out = inputs(k, learned=variance_type == "learned_range")
        res = ref.step(out, t, x, generator=torch.Generator().manual_seed(100 + k))
        (z,) = torch_noise(100 + k)
        prev, x0 = D.ddpm_step(sch, nhwc(out), nhwc(x), t, nhwc(z), prediction_type=prediction_type,
                               variance_type=variance_type, clip="static" if clip else "none")
        mixed_tol(res.pred_original_sample.numpy(), nchw(x0))
        mixed_tol(res.prev_sample.numpy(), nchw(prev))


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_step_respaced_matches_ddpm_scheduler_custom_timesteps(variance_type):
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type=variance_type, clip_sample=True)
    use = D.space_timesteps(1000, "linspace25")
    ref.set_timesteps(timesteps=[int(t) for t in use[::-1]])
    sch = D.respace(ours_from(ref), use)
    double(ref)
    for k, i in enumerate([24, 13, 1, 0]):
        t = int(use[i])
        x, out = inputs(k, learned=variance_type == "learned_range")
        res = ref.step(out, t, x, generator=torch.Generator().manual_seed(k))
        (z,) = torch_noise(k)
        prev, x0 = D.ddpm_step(sch, nhwc(out), nhwc(x), i, nhwc(z), variance_type=variance_type, clip="static")
        np.testing.assert_allclose(nchw(x0), res.pred_original_sample.numpy(), **TOL)
        np.testing.assert_allclose(nchw(prev), res.prev_sample.numpy(), **TOL)


def test_ddpm_step_batched_index_and_fixed_large():
    # Per-example indices [B] give each row the scheduler's result for its own timestep.
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", clip_sample=False)
    sch = ours_from(ref)
    double(ref)
    x, out = inputs(0)
    ts = [500, 3]
    rows, zs = [], []
    for b, t in enumerate(ts):
        rows.append(ref.step(out[b:b + 1], t, x[b:b + 1], generator=torch.Generator().manual_seed(10 + b)))
        zs += torch_noise(10 + b, shape=(1,) + SHAPE[1:])
    z = torch.cat(zs)
    prev, _ = D.ddpm_step(sch, nhwc(out), nhwc(x), jnp.array(ts), nhwc(z), variance_type="fixed_large")
    for b, res in enumerate(rows):
        np.testing.assert_allclose(nchw(prev)[b:b + 1], res.prev_sample.numpy(), **TOL)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clipped_eps", [False, True])
def test_ddim_step_matches_ddim_scheduler(prediction_type, eta, clipped_eps):
    ref = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, clip_sample=True,
                        set_alpha_to_one=True)
    ref.set_timesteps(50)
    sch = D.respace(ours_from(ref), D.space_timesteps(1000, "ddim50"))
    double(ref)
    for k, i in enumerate([49, 30, 1, 0]):
        t = int(sch.timesteps[i])
        x, out = inputs(k)
        (z,) = torch_noise(50 + k)
        res = ref.step(out, t, x, eta=eta, use_clipped_model_output=clipped_eps,
                       variance_noise=z if eta > 0 else None)
        prev, x0 = D.ddim_step(sch, nhwc(out), nhwc(x), i, nhwc(z), eta=eta, prediction_type=prediction_type,
                               clip="static", eps_from_clipped_x0=clipped_eps)
        np.testing.assert_allclose(nchw(x0), res.pred_original_sample.numpy(), **TOL)
        np.testing.assert_allclose(nchw(prev), res.prev_sample.numpy(), **TOL)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small_log", "learned_range"])
@pytest.mark.parametrize("clip_range", [None, 1.5])
def test_unclip_step_matches_unclip_scheduler(prediction_type, variance_type, clip_range):
    ref = UnCLIPScheduler(variance_type=variance_type, prediction_type=prediction_type,
                          clip_sample=clip_range is not None, clip_sample_range=clip_range or 1.0)
    ref.set_timesteps(25)
    sch = ours_from(ref)
    double(ref)
    ts = [int(t) for t in ref.timesteps]
    for k in [0, 5, 23, 24]:  # first, middle, last two (the last has prev_timestep=None, t=0)
        t = ts[k]
        prev = ts[k + 1] if k + 1 < len(ts) else None
        x, out = inputs(k, learned=variance_type == "learned_range")
        res = ref.step(out, t, x, prev_timestep=prev, generator=torch.Generator().manual_seed(k))
        (z,) = torch_noise(k)
        x_prev, x0 = D.unclip_step(
            sch, nhwc(out), nhwc(x), t, -1 if prev is None else prev, nhwc(z), prediction_type=prediction_type,
            variance_type=variance_type, clip="none" if clip_range is None else "static", clip_range=clip_range or 1.0)
        mixed_tol(res.pred_original_sample.numpy(), nchw(x0))
        mixed_tol(res.prev_sample.numpy(), nchw(x_prev))


def test_unclip_step_on_embeddings_with_consecutive_prev():
    # [B, D] data (the prior), learned range split on the last axis, prev_timestep = t - 1 path.
    ref = UnCLIPScheduler(variance_type="learned_range", clip_sample=False)
    sch = ours_from(ref)
    double(ref)
    g = torch.Generator().manual_seed(3)
    x, out = torch.randn(4, 6, generator=g).double(), torch.randn(4, 12, generator=g).clamp(-1, 1).double()
    res = ref.step(out, 300, x, prev_timestep=299, generator=torch.Generator().manual_seed(9))
    (z,) = torch_noise(9, shape=(4, 6))
    x_prev, _ = D.unclip_step(sch, jnp.asarray(out.numpy()), jnp.asarray(x.numpy()), 300, 299,
                              jnp.asarray(z.numpy()), variance_type="learned_range")
    np.testing.assert_allclose(np.asarray(x_prev), res.prev_sample.numpy(), **TOL)


def _torch_model(x, t):
    # A fixed smooth model: depends nonlinearly on x and on t.
    return 0.8 * torch.tanh(x) + 0.05 * np.cos(float(t) / 150.0) * x


def _jax_model(x, t):
    tt = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.8 * jnp.tanh(x) + 0.05 * jnp.cos(tt / 150.0) * x


@pytest.mark.parametrize("variance_type", ["fixed_small_log", "learned_range"])
def test_unclip_sample_loop_replays_diffusers_noise(variance_type):
    ref = UnCLIPScheduler(variance_type=variance_type, prediction_type="epsilon", clip_sample=True)
    n = 25
    ref.set_timesteps(n)
    ts = ref.timesteps
    sch = ours_from(ref)
    double(ref)

    def tmodel(x, t):
        out = _torch_model(x, t)
        return torch.cat([out, torch.tanh(x)], dim=1) if variance_type == "learned_range" else out

    def jmodel(x, t):
        out = _jax_model(x, t)
        return jnp.concatenate([out, jnp.tanh(x)], axis=-1) if variance_type == "learned_range" else out

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).double()
    x_T = nhwc(x)
    g = torch.Generator().manual_seed(42)
    for k, t in enumerate(ts):
        prev = None if k == n - 1 else int(ts[k + 1])
        x = ref.step(tmodel(x, int(t)), int(t), x, prev_timestep=prev, generator=g).prev_sample
    # diffusers draws one noise per step with t > 0 (all but the last), in order.
    draws = torch_noise(42, n - 1)
    noise = jnp.stack([nhwc(z) for z in draws] + [jnp.zeros_like(x_T)])
    ours = D.unclip_sample(jmodel, sch, x_T, np.asarray(ts), prediction_type="epsilon",
                           variance_type=variance_type, clip="static", noise=noise)
    np.testing.assert_allclose(nchw(ours), x.numpy(), **TOL)


@pytest.mark.parametrize("prediction_type,schedule", [
    ("epsilon", "linear"), ("sample", "squaredcos_cap_v2"), ("v_prediction", "squaredcos_cap_v2")])
@pytest.mark.parametrize("steps", [6, 10])
def test_dpm_solver_pp_loop_matches_diffusers(prediction_type, schedule, steps):
    ref = DPMSolverMultistepScheduler(beta_schedule=schedule, algorithm_type="dpmsolver++", solver_order=2,
                                      prediction_type=prediction_type)
    base = ours_from(ref)
    ref.set_timesteps(steps)
    sch = D.respace(base, np.asarray(ref.timesteps))
    double(ref)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).double()
    x_T = nhwc(x)
    for t in ref.timesteps:
        x = ref.step(_torch_model(x, int(t)), t, x).prev_sample
    ours = D.dpm_solver_pp_sample(_jax_model, sch, x_T, prediction_type=prediction_type)
    np.testing.assert_allclose(nchw(ours), x.numpy(), **TOL)


def test_dynamic_threshold_matches_diffusers():
    ref = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1e9)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * torch.tensor([0.3, 2.0]).view(2, 1, 1, 1)
    x = x.double()
    ours = D.clip_x0(nhwc(x), "dynamic", clip_range=1.0, dynamic_percentile=0.9)
    np.testing.assert_allclose(nchw(ours), ref._threshold_sample(x).numpy(), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(ours[1]).max()) <= 1.0 + 1e-6 and float(jnp.abs(ours[1]).max()) > 0.99
    np.testing.assert_array_equal(np.asarray(ours[0]), np.clip(np.asarray(nhwc(x)[0]), -1, 1))
    # clip_range rescales the output range.
    wide = D.clip_x0(nhwc(x) * 5, "dynamic", clip_range=5.0, dynamic_percentile=0.9)
    np.testing.assert_allclose(np.asarray(wide), np.asarray(ours) * 5, rtol=1e-5, atol=1e-5)
