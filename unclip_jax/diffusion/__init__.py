"""Gaussian diffusion core: schedules, forward process, losses, samplers, guidance.

Everything here is a pure JAX function of arrays (no modules, no state, no files): usable
under `jit`, inside `lax.scan`, and on sharded arrays. Data are channels-last arrays [B, ...]
of any rank; timesteps are int arrays [B]. Models are plain callables
`model_fn(x [B, ...], t int32 [B]) -> output`, always fed ORIGINAL training timesteps.

Schedules (schedules.py, respacing.py)
  Schedule                      pytree of float32 per-step constants + `timesteps` (int32)
  cosine_betas(n, s, max_beta), linear_betas(n, start, end)   float64 NumPy betas
  make_schedule(betas, timesteps=None), make_schedule_from_alphas_cumprod(acp, timesteps=None)
  get_schedule(name='cosine'|'linear', num_steps=1000, **kw)
  space_timesteps(num_train_steps, spec)   spec: '25', '10,10,5', 'ddim50', 'linspace25',
                                           'dpmsolver20'
  respace(schedule, use_timesteps) -> Schedule
  extract(values, idx, ndim), extract_prev(values, idx, ndim, first)

Forward process and parametrisations (process.py); prediction_type in
'epsilon' | 'sample' (x0) | 'v_prediction'
  q_sample(schedule, x0, t, noise), q_posterior_mean_variance(schedule, x0, x_t, t)
  x0_from_eps, eps_from_x0, v_from_x0_eps, x0_from_v, eps_from_v
  predict_x0(schedule, model_output, x_t, t, prediction_type), predict_eps(...)
  training_target(schedule, x0, noise, t, prediction_type), split_model_output(out, x)

Clipping (clipping.py)
  clip_x0(x0, mode='none'|'static'|'dynamic', clip_range=1.0, dynamic_percentile=0.995)

Losses (losses.py)
  normal_kl, discretized_gaussian_log_likelihood, mean_flat
  vlb_terms(schedule, model_output, x0, x_t, t, prediction_type=...)
  training_losses(model_fn, schedule, x0, t, noise, prediction_type, learned_variance,
                  vlb_weight=0.001, weights=None) -> (loss [B], terms)
  diffusion_loss(model_fn, schedule, x0, rng, **kw) -> (scalar, terms)

Sampling entry point (sampling.py): one settings type, one call
  SamplerSpec(sampler='unclip'|'ddpm'|'ddim'|'dpm++', steps, eta, clip_range, variance,
              prediction_type, schedule, num_train_steps, float32_cumprod, start_t, spacing,
              learned_variance)   frozen (a jit static arg); .timesteps(), .full_schedule(),
                                  .sampling_schedule(); invalid settings raise SamplerSpecError
  sample(model_fn, spec, x_T, rng=None, noise=None) -> x0
  spec_from_settings(mapping, **fixed)   the spec of a flat settings dict (pipeline, configs)

Samplers: a standalone step and a `lax.scan` loop each. Loops return the final x0 and take
x_T from the caller, plus `rng` or an explicit `noise` [num_steps, *x.shape] where noise is used.
  ddpm_step / ddpm_sample          ancestral; variance 'fixed_small'|'fixed_large'|'learned_range'
  p_mean_variance, model_log_variance
  unclip_step / unclip_sample      diffusers UnCLIPScheduler semantics (Karlo)
  ddim_step / ddim_sample          any eta
  ddim_invert_step / ddim_invert   x0 -> x_T, deterministic (refine_iters: exact inverse)
  dpm_solver_pp_step / dpm_solver_pp_sample   DPM-Solver++(2M)

Guidance (guidance.py)
  cfg(cond_out, uncond_out, scale, learned_variance=False)
  guided_model_fn(model_fn_cond_uncond, scale, learned_variance=None)  rows [:B] cond, [B:] uncond
"""
from .clipping import CLIP_MODES, clip_x0
from .ddim import ddim_invert, ddim_invert_step, ddim_sample, ddim_step
from .ddpm import VARIANCE_TYPES, ddpm_sample, ddpm_step, model_log_variance, p_mean_variance
from .dpm_solver import dpm_solver_pp_sample, dpm_solver_pp_step
from .guidance import cfg, guided_model_fn
from .losses import (
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    training_losses,
    vlb_terms,
)
from .process import (
    PREDICTION_TYPES,
    eps_from_v,
    eps_from_x0,
    predict_eps,
    predict_x0,
    q_posterior_mean_variance,
    q_sample,
    split_model_output,
    training_target,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from .respacing import respace, space_timesteps
from .sampling import SAMPLERS, SamplerSpec, SamplerSpecError, sample, spec_from_settings
from .schedules import (
    Schedule,
    cosine_betas,
    extract,
    extract_prev,
    get_schedule,
    linear_betas,
    make_schedule,
    make_schedule_from_alphas_cumprod,
)
from .unclip import UNCLIP_VARIANCE_TYPES, unclip_sample, unclip_step

__all__ = [
    "CLIP_MODES", "PREDICTION_TYPES", "SAMPLERS", "UNCLIP_VARIANCE_TYPES", "VARIANCE_TYPES",
    "SamplerSpec", "SamplerSpecError", "Schedule", "cfg", "clip_x0", "cosine_betas", "ddim_invert", "ddim_invert_step", "ddim_sample",
    "ddim_step", "ddpm_sample", "ddpm_step", "diffusion_loss", "discretized_gaussian_log_likelihood",
    "dpm_solver_pp_sample", "dpm_solver_pp_step", "eps_from_v", "eps_from_x0", "extract", "extract_prev",
    "get_schedule", "guided_model_fn", "linear_betas", "make_schedule",
    "make_schedule_from_alphas_cumprod", "mean_flat", "model_log_variance", "normal_kl",
    "p_mean_variance", "predict_eps", "predict_x0", "q_posterior_mean_variance", "q_sample",
    "respace", "sample", "space_timesteps", "spec_from_settings", "split_model_output", "training_losses", "training_target",
    "unclip_sample", "unclip_step", "v_from_x0_eps", "vlb_terms", "x0_from_eps", "x0_from_v",
]
