"""The one sampling entry point: diffusion.sample(model_fn, SamplerSpec, ...) runs each sampler's
loop exactly as a direct call would; invalid specs say what to change; start_t bounds the grid."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion
from unclip_jax.diffusion import SAMPLERS, SamplerSpec, SamplerSpecError, sample


def toy_model_fn(x, t):
    """A smooth x0-like output depending on t, with 2C channels (for 'learned_range')."""
    s = (t.astype(jnp.float32) / 1000.0)[:, None]
    mean = jnp.tanh(x) * (1.0 - s) + 0.1 * s
    return jnp.concatenate([mean, jnp.cos(x + s) * 0.5], axis=-1)


def mean_only(x, t):
    return toy_model_fn(x, t)[..., : x.shape[-1]]


X_T = jax.random.normal(jax.random.key(0), (4, 3))
KEY = jax.random.key(1)


def _clip(spec):
    return dict(clip="none" if spec.clip_range is None else "static",
                clip_range=1.0 if spec.clip_range is None else spec.clip_range)


@pytest.mark.parametrize("float32_cumprod", [False, True])
def test_each_sampler_equals_its_direct_loop(float32_cumprod):
    base = dict(steps=6, prediction_type="sample", float32_cumprod=float32_cumprod,
                clip_range=1.5)
    full = SamplerSpec(**base).full_schedule()

    def respaced(spacing):
        return diffusion.respace(full, diffusion.space_timesteps(1000, spacing))

    cases = [
        (SamplerSpec(sampler="unclip", variance="fixed_small_log", **base),
         lambda s: diffusion.unclip_sample(
             mean_only, full, X_T, diffusion.space_timesteps(1000, "linspace6")[::-1].copy(),
             KEY, prediction_type="sample", variance_type="fixed_small_log", **_clip(s))),
        (SamplerSpec(sampler="unclip", variance="learned_range", **base),
         lambda s: diffusion.unclip_sample(
             toy_model_fn, full, X_T, diffusion.space_timesteps(1000, "linspace6")[::-1].copy(),
             KEY, prediction_type="sample", variance_type="learned_range", **_clip(s))),
        (SamplerSpec(sampler="ddpm", **base),
         lambda s: diffusion.ddpm_sample(mean_only, respaced("6"), X_T, KEY,
                                         prediction_type="sample", variance_type="fixed_small",
                                         **_clip(s))),
        (SamplerSpec(sampler="ddpm", learned_variance=True, **base),
         lambda s: diffusion.ddpm_sample(toy_model_fn, respaced("6"), X_T, KEY,
                                         prediction_type="sample", variance_type="learned_range",
                                         **_clip(s))),
        (SamplerSpec(sampler="ddim", **base),
         lambda s: diffusion.ddim_sample(mean_only, respaced("6"), X_T, None,
                                         prediction_type="sample", **_clip(s))),
        (SamplerSpec(sampler="ddim", eta=0.7, spacing="ddim6", **base),
         lambda s: diffusion.ddim_sample(mean_only, respaced("ddim6"), X_T, KEY, eta=0.7,
                                         prediction_type="sample", **_clip(s))),
        (SamplerSpec(sampler="dpm++", **base),
         lambda s: diffusion.dpm_solver_pp_sample(mean_only, respaced("dpmsolver6"), X_T,
                                                  prediction_type="sample", **_clip(s))),
    ]
    assert {s.sampler for s, _ in cases} == set(SAMPLERS)
    for spec, direct in cases:
        learned = spec.learned_variance or spec.variance == "learned_range"
        fn = toy_model_fn if learned else mean_only
        got = jax.jit(lambda x: sample(fn, spec, x, KEY))(X_T)  # noqa: B023
        want = jax.jit(lambda x: direct(spec))(X_T)  # noqa: B023
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(spec))


def test_explicit_noise_replaces_the_draws():
    spec = SamplerSpec(sampler="ddpm", steps=5, prediction_type="sample")
    noise = jax.random.normal(jax.random.key(2), (5,) + X_T.shape)
    got = sample(mean_only, spec, X_T, noise=noise)
    want = diffusion.ddpm_sample(mean_only, spec.sampling_schedule(), X_T, noise=noise,
                                 prediction_type="sample")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_spec_is_a_static_argument():
    a = SamplerSpec(sampler="ddim", steps=np.int64(8), eta=0)
    b = SamplerSpec(sampler="ddim", steps=8, eta=0.0)
    assert a == b and hash(a) == hash(b) and isinstance(a.steps, int)
    f = jax.jit(lambda x, spec: sample(mean_only, spec, x), static_argnums=1)
    np.testing.assert_array_equal(np.asarray(f(X_T, a)), np.asarray(f(X_T, b)))


@pytest.mark.parametrize("kw, match", [
    (dict(sampler="dpm_solver_pp"), "sampler must be one of"),
    (dict(steps=0), r"steps must be in \[1, 1000\]"),
    (dict(steps=1001), r"steps must be in \[1, 1000\]"),
    (dict(variance="fixed_small"), "variance must be one of"),
    (dict(prediction_type="x0"), "prediction_type must be one of"),
    (dict(schedule="sigmoid"), "schedule must be one of"),
    (dict(clip_range=0.0), "clip_range must be positive or None"),
    (dict(eta=-1.0), "eta must be >= 0"),
    (dict(steps=10, start_t=5), r"start_t must be in \[9, 999\]"),
    (dict(start_t=1000), r"start_t must be in \[24, 999\]"),
    (dict(sampler="ddim", steps=300, spacing="ddim300"), "change steps, spacing or start_t"),
    (dict(sampler="dpm++", steps=6, start_t=5), "change steps, spacing or start_t"),
])
def test_invalid_specs_say_what_to_change(kw, match):
    with pytest.raises(SamplerSpecError, match=match) as info:
        SamplerSpec(**kw)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_start_t_restricts_the_grid():
    for sampler, n in (("unclip", 4), ("ddpm", 4), ("ddim", 4), ("dpm++", 4)):
        spec = SamplerSpec(sampler=sampler, steps=n, start_t=60)
        grid = spec.timesteps()
        assert len(grid) == n and grid.min() >= 0 and grid.max() <= 60, (sampler, grid)
        assert np.all(np.diff(grid) > 0)
    np.testing.assert_array_equal(SamplerSpec(sampler="unclip", steps=4, start_t=60).timesteps(),
                                  [0, 20, 40, 60])
    np.testing.assert_array_equal(SamplerSpec(sampler="dpm++", steps=4, start_t=60).timesteps(),
                                  [15, 30, 45, 60])
    # without start_t: the sampler's grid over all training steps
    np.testing.assert_array_equal(SamplerSpec(sampler="unclip", steps=3).timesteps(),
                                  [0, 500, 999])
    # the respaced samplers run on the grid; 'unclip' on the full schedule
    assert SamplerSpec(sampler="ddim", steps=4, start_t=60).sampling_schedule().num_steps == 4
    assert SamplerSpec(sampler="unclip", steps=4).sampling_schedule().num_steps == 1000


def test_float32_cumprod_is_torchs_float32_product():
    acp = SamplerSpec(float32_cumprod=True).full_schedule().alphas_cumprod
    betas = diffusion.cosine_betas(1000).astype(np.float32)
    want = np.cumprod((np.float32(1.0) - betas).astype(np.float32), dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(acp), want)


def test_spec_from_settings_takes_the_spec_keys():
    s = dict(sampler="ddim", steps=8, guidance_scale=3.0, best_of=2, models=["sr64"], size=64,
             clip_range=None)
    assert diffusion.spec_from_settings(s, prediction_type="sample") == SamplerSpec(
        sampler="ddim", steps=8, prediction_type="sample")


def test_the_commands_offer_the_samplers():
    """The CLI spells the sampler list (its --help imports no JAX): it must be SAMPLERS."""
    import argparse

    from unclip_jax.commands import eval as eval_cmd, generate
    from unclip_jax.evaluate import shapes_eval
    for mod in (generate, eval_cmd):
        sub = argparse.ArgumentParser().add_subparsers()
        mod.add_parser(sub)
        choices = [a.choices for p in sub.choices.values() for a in p._actions
                   if a.dest == "decoder_sampler"]
        assert choices and tuple(choices[0]) == SAMPLERS, mod.__name__
    assert set(shapes_eval.TABLE_SAMPLERS) == set(SAMPLERS) - {"unclip"}
