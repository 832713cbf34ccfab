"""Sampling, stage by stage: unclip-jax's samplers (one lax.scan per stage, compiled once) against
the same diffusers components driven the way diffusers' UnCLIPPipeline drives them.

    .venv/bin/python benchmarks/sampling_stages.py           # mid size, batch 2
    .venv/bin/python benchmarks/sampling_stages.py --karlo   # Karlo's real sizes, batch 1,
                                                             # few steps (< 10 min on 2 cores)
    .venv/bin/python benchmarks/sampling_stages.py --karlo --prior-steps 25 --decoder-steps 25 \
        --sr-steps 7                                         # Karlo's defaults (slow on CPU)

Stages (settings of diffusers' UnCLIPPipeline and of Karlo's schedulers):
  prior      UnCLIPScheduler(fixed_small_log, x0 prediction, clip 5 in the normalised space),
             guidance 4 against the empty caption's conditioning; ours:
             unclip_jax.models.prior_sampling.sample_prior (sampler 'unclip', best_of=1).
  decoder    UnCLIPTextProjModel + UNet2DConditionModel, UnCLIPScheduler(learned_range,
             epsilon, clip 1), guidance 8 (null z_i + empty caption); ours:
             guided_decoder_fn + unclip_jax.diffusion.unclip_sample.
  super_res  bicubic 4x (mid: 2x) of the low-res image, UNet2DModel super_res_first for all steps
             but the last, super_res_last for the last; UnCLIPScheduler(fixed_small_log, epsilon,
             clip 1), no guidance; ours: resize_low_res + lax.scan of unclip_step + a last step.
Both sides get the same random weights (diffusers save_pretrained -> unclip_jax.convert.diffusers)
and the same random inputs per stage (each stage is timed on its own, not chained). Network
evaluations: diffusers' are counted at run time with forward pre-hooks; ours are counted when the
sampler is traced (network calls in the lax.scan body x its length, + calls outside it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PRIOR_CLAMP = 5.0  # Karlo's prior_scheduler: clip_sample_range 5
KARLO_STEPS = dict(prior=25, decoder=25, super_res=7)
GUIDANCE = dict(prior=4.0, decoder=8.0, super_res=1.0)


# --------------------------------------------------------------------------------------------
# Counting network evaluations
# --------------------------------------------------------------------------------------------

class TraceCounter:
    """Records (phase, rows) each time a module class's __call__ is traced."""

    def __init__(self):
        self.records, self.phase = [], "loop"

    @contextlib.contextmanager
    def patch(self, cls):
        original = cls.__call__

        def counted(module, x, *a, **kw):
            self.records.append((self.phase, int(x.shape[0])))
            return original(module, x, *a, **kw)

        cls.__call__ = counted
        try:
            yield self
        finally:
            cls.__call__ = original

    def totals(self, loop_len: int) -> tuple[int, int]:
        """(network calls, rows evaluated) of one run."""
        calls = rows = 0
        for phase, r in self.records:
            n = loop_len if phase == "loop" else 1
            calls, rows = calls + n, rows + n * r
        return calls, rows


class HookCounter:
    """Counts forward calls and rows of torch modules at run time."""

    def __init__(self, *modules):
        self.calls = self.rows = 0
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True)
                        for m in modules]

    def _hook(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.calls += 1
        self.rows += int(x.shape[0])

    def reset(self):
        self.calls = self.rows = 0


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------

LAST_COMPILE: dict = {}
"""Details of the latest compile: trace_lower_s, compile_s, hlo_chars (read by compile_time.py)."""


def _compile(fn, *args):
    """(compiled, seconds to trace + lower + compile)."""
    import jax
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    mid = time.perf_counter()
    compiled = lowered.compile()
    end = time.perf_counter()
    LAST_COMPILE.update(trace_lower_s=mid - start, compile_s=end - mid,
                        hlo_chars=len(lowered.as_text()))
    return compiled, end - start


def ours_prior(model, inputs, batch, steps, guidance):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unclip_jax.models.diffusion_prior import DiffusionPrior, TextConditioning
    from unclip_jax.diffusion import SamplerSpec
    from unclip_jax.models.prior_sampling import make_sample_fn
    spec = SamplerSpec(sampler="unclip", steps=steps, clip_range=PRIOR_CLAMP,
                       prediction_type="sample")
    graphdef, state = nnx.split(model)
    sample = make_sample_fn(graphdef, spec, guidance_scale=guidance, best_of=1)
    cond = TextConditioning(*(jnp.asarray(inputs[k][:batch]) for k in
                              ("text_embed", "text_hidden", "text_mask")))
    uncond = TextConditioning(*(jnp.asarray(inputs[k][:batch]) for k in
                                ("null_text_embed", "null_text_hidden", "null_text_mask")))
    fn = lambda s, c, r, u: sample(s, c, r, u)["image_embed"]  # noqa: E731
    counter = TraceCounter()
    with counter.patch(DiffusionPrior):
        compiled, compile_s = _compile(fn, state, cond, jax.random.key(0), uncond)
    def run():
        return jax.block_until_ready(compiled(state, cond, jax.random.key(1), uncond))
    return run, compile_s, counter.totals(steps)


def ours_decoder(model, inputs, batch, steps, guidance):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unclip_jax import diffusion
    from unclip_jax.models.decoder import Decoder, guided_decoder_fn
    graphdef, state = nnx.split(model)
    size = model.config.image_size
    a = {k: jnp.asarray(v[:batch]) for k, v in inputs.items()}
    with jax.ensure_compile_time_eval():
        full = diffusion.get_schedule("cosine", 1000)
    timesteps = diffusion.space_timesteps(1000, f"linspace{steps}")[::-1].copy()

    def fn(state, a, rng):
        dec = nnx.merge(graphdef, state)
        uncond = dict(text_embed=a["null_text_embed"], text_hidden=a["null_text_hidden"],
                      text_mask=a["null_text_mask"])
        model_fn = guided_decoder_fn(dec, a["image_embed"], a["text_embed"], a["text_hidden"],
                                     a["text_mask"], guidance_scale=guidance, uncond=uncond)
        k0, k1 = jax.random.split(rng)
        x_T = jax.random.normal(k0, (batch, size, size, 3), jnp.float32)
        x = diffusion.unclip_sample(model_fn, full, x_T, timesteps, k1,
                                    prediction_type="epsilon", variance_type="learned_range",
                                    clip="static", clip_range=1.0)
        return jnp.clip(x, -1.0, 1.0)

    counter = TraceCounter()
    with counter.patch(Decoder):
        compiled, compile_s = _compile(fn, state, a, jax.random.key(0))
    run = lambda: jax.block_until_ready(compiled(state, a, jax.random.key(1)))  # noqa: E731
    return run, compile_s, counter.totals(steps)


def ours_super_res(first, last, low_res, steps, size):
    """super_res_first for steps 1..n-1 (one lax.scan), super_res_last for the last step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unclip_jax import diffusion
    from unclip_jax.models.upsampler import SuperRes, resize_low_res
    g_first, s_first = nnx.split(first)
    g_last, s_last = nnx.split(last)
    b = low_res.shape[0]
    with jax.ensure_compile_time_eval():
        full = diffusion.get_schedule("cosine", 1000)
    ts = diffusion.space_timesteps(1000, f"linspace{steps}")[::-1].copy()
    prev = list(ts[1:]) + [-1]
    step_kw = dict(prediction_type="epsilon", variance_type="fixed_small_log", clip="static",
                   clip_range=1.0)
    counter = TraceCounter()

    def fn(s_first, s_last, low, rng):
        sr_first, sr_last = nnx.merge(g_first, s_first), nnx.merge(g_last, s_last)
        up = resize_low_res(low, size)
        keys = jax.random.split(rng, steps + 1)
        x_T = jax.random.normal(keys[-1], (b, size, size, 3), jnp.float32)

        def body(x, xs):
            t, p, key = xs
            out = sr_first(x, jnp.full((b,), t, jnp.int32), up)
            x, _ = diffusion.unclip_step(full, out, x, t, p, jax.random.normal(key, x.shape),
                                         **step_kw)
            return x, None

        counter.phase = "loop"
        x, _ = jax.lax.scan(body, x_T, (jnp.asarray(ts[:-1], jnp.int32),
                                        jnp.asarray(prev[:-1], jnp.int32), keys[:steps - 1]))
        counter.phase = "final"
        out = sr_last(x, jnp.full((b,), ts[-1], jnp.int32), up)
        x, _ = diffusion.unclip_step(full, out, x, int(ts[-1]), -1,
                                     jax.random.normal(keys[steps - 1], x.shape), **step_kw)
        return x

    low = jnp.asarray(low_res)
    with counter.patch(SuperRes):
        compiled, compile_s = _compile(fn, s_first, s_last, low, jax.random.key(0))
    def run():
        return jax.block_until_ready(compiled(s_first, s_last, low, jax.random.key(1)))
    return run, compile_s, counter.totals(steps - 1)


# --------------------------------------------------------------------------------------------
# diffusers: the UnCLIPPipeline's loops, stage by stage
# --------------------------------------------------------------------------------------------

def _torch_text(inputs, batch, device):
    """[uncond, cond] as the pipeline concatenates them."""
    import torch
    cat = lambda u, c: torch.cat([torch.from_numpy(inputs[u][:batch]),  # noqa: E731
                                  torch.from_numpy(inputs[c][:batch])]).to(device)
    return (cat("null_text_embed", "text_embed"), cat("null_text_hidden", "text_hidden"),
            cat("null_text_mask", "text_mask"))


def diffusers_prior(prior, inputs, batch, steps, guidance, device="cpu", dtype=None):
    import torch
    from diffusers import UnCLIPScheduler
    sched = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                            clip_sample=True, clip_sample_range=PRIOR_CLAMP)
    embeds, hidden, mask = _torch_text(inputs, batch, device)
    prior.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    counter = HookCounter(prior)

    @torch.no_grad()
    def run():
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            sched.set_timesteps(steps, device=device)
            ts = sched.timesteps
            latents = torch.randn((batch, prior.config.embedding_dim), generator=gen,
                                  device=device) * sched.init_noise_sigma
            for i, t in enumerate(ts):
                pred = prior(torch.cat([latents] * 2), timestep=t, proj_embedding=embeds,
                             encoder_hidden_states=hidden,
                             attention_mask=mask).predicted_image_embedding
                u, c = pred.chunk(2)
                pred = u + guidance * (c - u)
                prev = None if i + 1 == len(ts) else ts[i + 1]
                latents = sched.step(pred, timestep=t, sample=latents, generator=gen,
                                     prev_timestep=prev).prev_sample
            out = prior.post_process_latents(latents)
        _sync(device)
        return out

    return run, counter


def diffusers_decoder(unet, proj, inputs, batch, steps, guidance, device="cpu", dtype=None):
    import torch
    import torch.nn.functional as F
    from diffusers import UnCLIPScheduler
    sched = UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon")
    embeds, hidden, mask = _torch_text(inputs, batch, device)
    z_i = torch.from_numpy(inputs["image_embed"][:batch]).to(device)
    unet.to(device)
    proj.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    size = unet.config.sample_size
    counter = HookCounter(unet)

    @torch.no_grad()
    def run():
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            context, emb_add = proj(image_embeddings=z_i, prompt_embeds=embeds,
                                    text_encoder_hidden_states=hidden,
                                    do_classifier_free_guidance=True)
            dmask = F.pad(mask, (proj.clip_extra_context_tokens, 0), value=True)
            sched.set_timesteps(steps, device=device)
            ts = sched.timesteps
            latents = torch.randn((batch, 3, size, size), generator=gen,
                                  device=device) * sched.init_noise_sigma
            for i, t in enumerate(ts):
                inp = torch.cat([latents] * 2)
                out = unet(sample=inp, timestep=t, encoder_hidden_states=context,
                           class_labels=emb_add, attention_mask=dmask).sample
                u, c = out.chunk(2)
                u, _ = u.split(3, dim=1)
                c, var = c.split(3, dim=1)
                out = torch.cat([u + guidance * (c - u), var], dim=1)
                prev = None if i + 1 == len(ts) else ts[i + 1]
                latents = sched.step(out, t, latents, prev_timestep=prev,
                                     generator=gen).prev_sample
            out = latents.clamp(-1, 1)
        _sync(device)
        return out

    return run, counter


def diffusers_super_res(first, last, low_res_nhwc, steps, device="cpu", dtype=None):
    import torch
    import torch.nn.functional as F
    from diffusers import UnCLIPScheduler
    sched = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon")
    small = torch.from_numpy(low_res_nhwc.transpose(0, 3, 1, 2).copy()).to(device)
    first.to(device)
    last.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    size = first.config.sample_size
    counter = HookCounter(*{id(m): m for m in (first, last)}.values())

    @torch.no_grad()
    def run():
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            sched.set_timesteps(steps, device=device)
            ts = sched.timesteps
            latents = torch.randn((small.shape[0], 3, size, size), generator=gen,
                                  device=device) * sched.init_noise_sigma
            up = F.interpolate(small, size=[size, size], mode="bicubic", align_corners=False,
                               antialias=True)
            for i, t in enumerate(ts):
                unet = last if i == len(ts) - 1 else first
                out = unet(sample=torch.cat([latents, up], dim=1), timestep=t).sample
                prev = None if i + 1 == len(ts) else ts[i + 1]
                latents = sched.step(out, t, latents, prev_timestep=prev,
                                     generator=gen).prev_sample
        _sync(device)
        return latents

    return run, counter


def _sync(device):
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------

HEADERS = ["stage", "params", "steps", "guidance", "batch", "net calls ours/diffusers",
           "rows evaluated ours/diffusers", "output (both)", "ours s/image", "diffusers s/image",
           "diffusers/ours time", "ours s/image at Karlo's steps", "ours compile s"]


def compare(stage, n_params, steps, batch, ours, theirs, repeats, warmup=1) -> list:
    run_ours, compile_s, (calls_o, rows_o) = ours
    run_theirs, counter = theirs
    t_ours = common.time_calls(run_ours, warmup=warmup, repeats=repeats)
    counter.reset()
    out_t = run_theirs()  # one untimed run, counted (and a warm-up)
    calls_t, rows_t = counter.calls, counter.rows
    shape = common.same_work(stage, run_ours(), out_t)
    t_theirs = common.time_calls(run_theirs, warmup=max(0, warmup - 1), repeats=repeats)
    m_o, m_t = common.median(t_ours) / batch, common.median(t_theirs) / batch
    projected = m_o * KARLO_STEPS[stage] / steps
    return [stage, f"{n_params / 1e6:.1f}M", steps, GUIDANCE[stage], batch,
            f"{calls_o}/{calls_t}", f"{rows_o}/{rows_t}", "x".join(map(str, shape)), m_o, m_t,
            m_t / m_o, projected, compile_s]


def run_stages(size, batch, steps, stages, repeats, folder, device="cpu", dtype="float32",
               autocast_dtype=None, distinct_last=True) -> list:
    import gc

    import numpy as np
    inputs = common.text_inputs(batch, seed=3)
    rows = []
    if "prior" in stages:
        prior = common.diffusers_prior(size, seed=10)
        ours = common.ours_prior(prior, folder, dtype=dtype)
        n = common.param_count(prior)
        o = ours_prior(ours, inputs, batch, steps["prior"], GUIDANCE["prior"])
        t = diffusers_prior(prior, inputs, batch, steps["prior"], GUIDANCE["prior"], device,
                            autocast_dtype)
        rows.append(compare("prior", n, steps["prior"], batch, o, t, repeats))
        print(common.table(HEADERS, rows[-1:]), flush=True)
        del prior, ours, o, t
        gc.collect()
    if "decoder" in stages:
        unet, proj = common.diffusers_decoder(size, seed=20)
        ours = common.ours_decoder(unet, proj, folder, dtype=dtype)
        n = common.param_count(unet) + common.param_count(proj)
        o = ours_decoder(ours, inputs, batch, steps["decoder"], GUIDANCE["decoder"])
        t = diffusers_decoder(unet, proj, inputs, batch, steps["decoder"], GUIDANCE["decoder"],
                              device, autocast_dtype)
        rows.append(compare("decoder", n, steps["decoder"], batch, o, t, repeats))
        print(common.table(HEADERS, rows[-1:]), flush=True)
        del unet, proj, ours, o, t
        gc.collect()
    if "super_res" in stages:
        first = common.diffusers_super_res(size, seed=30)
        last = common.diffusers_super_res(size, seed=31) if distinct_last else first
        ours_first = common.ours_super_res(first, folder, "super_res_first", dtype=dtype)
        ours_last = (common.ours_super_res(last, folder, "super_res_last", dtype=dtype)
                     if distinct_last else ours_first)
        n = common.param_count(first) * (2 if distinct_last else 1)
        low_size = common.SIZES[size]["decoder"]["sample_size"]
        low = np.random.default_rng(4).uniform(-1, 1, (batch, low_size, low_size, 3))
        low = low.astype(np.float32)
        o = ours_super_res(ours_first, ours_last, low, steps["super_res"],
                           common.SIZES[size]["super_res"]["sample_size"])
        t = diffusers_super_res(first, last, low, steps["super_res"], device, autocast_dtype)
        rows.append(compare("super_res", n, steps["super_res"], batch, o, t, repeats))
        print(common.table(HEADERS, rows[-1:]), flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# The whole pipeline: diffusers' UnCLIPPipeline against unclip_jax.pipeline on its conversion
# --------------------------------------------------------------------------------------------

def _clip_tokenizer(folder):
    """A transformers CLIPTokenizer with CLIP's BPE vocabulary, written from ours (no download)."""
    from transformers import CLIPTokenizer

    from unclip_jax.clip.tokenizer import Tokenizer
    return CLIPTokenizer(*Tokenizer().write_vocab_files(folder), model_max_length=common.TEXT_LEN)


def diffusers_pipeline(size, folder, text_layers=4):
    """A random diffusers UnCLIPPipeline of ``size`` (CLIP text tower: width 768,
    ``text_layers`` layers; Karlo's has 12), saved to ``folder``."""
    from diffusers import UnCLIPPipeline, UnCLIPScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=common.CLIP_DIM, intermediate_size=4 * common.CLIP_DIM,
        num_hidden_layers=text_layers, num_attention_heads=12,
        max_position_embeddings=common.TEXT_LEN, projection_dim=common.CLIP_DIM,
        eos_token_id=49407, bos_token_id=49406, pad_token_id=49407)).eval()
    common.randomize_(text_encoder, 40)
    unet, proj = common.diffusers_decoder(size, seed=20)
    with common._quiet():
        pipe = UnCLIPPipeline(
            prior=common.diffusers_prior(size, seed=10), decoder=unet, text_proj=proj,
            text_encoder=text_encoder, tokenizer=_clip_tokenizer(os.path.join(folder, "_tok")),
            super_res_first=common.diffusers_super_res(size, seed=30),
            super_res_last=common.diffusers_super_res(size, seed=31),
            prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log",
                                            prediction_type="sample", clip_sample=True,
                                            clip_sample_range=PRIOR_CLAMP),
            decoder_scheduler=UnCLIPScheduler(variance_type="learned_range",
                                              prediction_type="epsilon"),
            super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log",
                                                prediction_type="epsilon"))
        pipe.save_pretrained(os.path.join(folder, "diffusers"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(size, batch, steps, repeats, folder) -> list:
    """One row: prompt -> image through both whole pipelines (text encoder included)."""
    from unclip_jax.convert.diffusers_pipeline import convert_diffusers_pipeline
    from unclip_jax.pipeline import UnCLIPPipeline
    pipe = diffusers_pipeline(size, folder)
    convert_diffusers_pipeline(os.path.join(folder, "diffusers"), os.path.join(folder, "ours"))
    ours = UnCLIPPipeline.from_pretrained(os.path.join(folder, "ours"))
    prompts = [f"a red circle at the top left, take {i}" for i in range(batch)]
    kw = dict(prior_settings=dict(steps=steps["prior"]),
              decoder_settings=dict(steps=steps["decoder"]),
              super_res_settings=dict(steps=steps["super_res"]), return_float=True)
    start = time.perf_counter()
    out_o = ours.generate(prompts, seed=0, **kw)  # compiles every stage once
    first_s = time.perf_counter() - start
    t_ours = common.time_calls(lambda: ours.generate(prompts, seed=1, **kw), 0, repeats)
    counter = HookCounter(pipe.prior, pipe.decoder, pipe.super_res_first, pipe.super_res_last)
    call = lambda: pipe(prompts, prior_num_inference_steps=steps["prior"],  # noqa: E731
                        decoder_num_inference_steps=steps["decoder"],
                        super_res_num_inference_steps=steps["super_res"], output_type="np")
    out_t = call().images
    calls_t, rows_t = counter.calls, counter.rows
    shape = common.same_work("full pipeline", out_o, out_t, theirs_layout="NHWC")
    t_theirs = common.time_calls(call, 0, repeats)
    n = sum(common.param_count(m) for m in (pipe.prior, pipe.decoder, pipe.text_proj,
                                            pipe.super_res_first, pipe.super_res_last,
                                            pipe.text_encoder))
    m_o, m_t = common.median(t_ours) / batch, common.median(t_theirs) / batch
    return ["full pipeline", f"{n / 1e6:.1f}M",
            f"{steps['prior']}/{steps['decoder']}/{steps['super_res']}", "4/8/-", batch,
            f"-/{calls_t}", f"-/{rows_t}", "x".join(map(str, shape)), m_o, m_t, m_t / m_o, None,
            f"{first_s - common.median(t_ours):.1f} (1st call - later)"]


def pipeline_available() -> bool:
    try:
        import unclip_jax.pipeline  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--karlo", action="store_true",
                   help="Karlo's real sizes (prior 1.0B, decoder 0.89B, super-res 0.69B x 2)")
    p.add_argument("--batch", type=int, help="images per run (default: 2 mid, 1 --karlo)")
    p.add_argument("--prior-steps", type=int, help="default 25 (--karlo: 5)")
    p.add_argument("--decoder-steps", type=int, help="default 25 (--karlo: 3)")
    p.add_argument("--sr-steps", type=int, help="default 7 (--karlo: 2)")
    p.add_argument("--stages", help="comma-separated subset of prior,decoder,super_res,pipeline "
                   "(pipeline: the whole pipeline, prompt to image, when unclip_jax.pipeline "
                   "exists); default all four, --karlo: the three stages (memory)")
    p.add_argument("--repeats", type=int, help="timed runs per side (default 2, --karlo 1)")
    p.add_argument("--shared-last", action="store_true",
                   help="super_res_last = super_res_first (half the memory; default with --karlo)")
    args = p.parse_args(argv)
    size = "karlo" if args.karlo else "mid"
    fast = dict(prior=5, decoder=3, super_res=2) if args.karlo else KARLO_STEPS
    steps = dict(prior=args.prior_steps or fast["prior"],
                 decoder=args.decoder_steps or fast["decoder"],
                 super_res=args.sr_steps or fast["super_res"])
    if min(steps.values()) < 1:
        p.error("step counts must be at least 1")
    batch = args.batch or (1 if args.karlo else 2)
    stages = args.stages or ("prior,decoder,super_res" if args.karlo else
                             "prior,decoder,super_res,pipeline")
    stages = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = set(stages) - set(KARLO_STEPS) - {"pipeline"}
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; choose from prior, decoder, super_res, "
                "pipeline")
    repeats = args.repeats or (1 if args.karlo else 2)
    threads = common.match_torch_threads()
    notes = [f"torch intra-op threads = {threads} (the usable cores); denormals flushed",
             "each stage timed on its own, fixed random inputs; warm-up and compile excluded; "
             f"median of {repeats} runs; s/image = run time / batch",
             "'ours s/image at Karlo's steps' scales our time per step to 25 / 25 / 7 steps"]
    if "pipeline" in stages and not pipeline_available():
        stages.remove("pipeline")
        notes.append("unclip_jax.pipeline does not exist: stage level only, no full-pipeline row")
    elif "pipeline" in stages:
        notes.append("full pipeline: diffusers UnCLIPPipeline(prompts) vs unclip_jax.pipeline."
                     "UnCLIPPipeline (converted with convert_diffusers_pipeline).generate, text "
                     "encoder (CLIP text width 768, 4 layers) included; ours' network calls are "
                     "not counted there (-)")
    common.preamble(f"sampling per stage, {size} size: unclip-jax vs diffusers UnCLIPPipeline "
                    "loops (float32)", notes)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_stages(size, batch, steps, stages, repeats, tmp,
                          distinct_last=not (args.karlo or args.shared_last))
        if "pipeline" in stages:
            rows.append(run_pipeline(size, batch, steps, repeats, os.path.join(tmp, "pipe")))
            print(common.table(HEADERS, rows[-1:]), flush=True)
    print()
    print(common.table(HEADERS, rows))
    print("\n'diffusers/ours time' > 1 means ours is faster.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
