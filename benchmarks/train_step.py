"""Training-step throughput: unclip-jax (jax.jit of the stage's train_step, AdamW) against the same
model as diffusers torch modules (torch.optim.AdamW), same weights, same batch, same loss.

    .venv/bin/python benchmarks/train_step.py                 # mid size, decoder and prior
    .venv/bin/python benchmarks/train_step.py --only decoder --repeats 10
    .venv/bin/python benchmarks/train_step.py --only decoder --torch-compile   # + a 3rd column

With ``--torch-compile`` the torch side is measured twice: eager, and with the modules wrapped
in ``torch.compile`` (inductor; the optimizer step stays eager, as in most training scripts);
its compile seconds are the first step's time less an eager step.

What each side runs per step:
  decoder  ours: unclip_jax.train.decoder_stage.build_train_step with epsilon MSE
           (learned_variance=False, a 3-channel output; Karlo's decoder has 6 output channels,
           which changes the FLOPs by well under 1%), z_i dropped 10% / caption 50% of the time,
           AdamW lr 1.2e-4 (no weight decay, no clipping, no EMA).
           torch: UnCLIPTextProjModel + UNet2DConditionModel (Karlo's layout) on the same
           dropped conditioning, epsilon MSE, torch.optim.AdamW with the same hyper-parameters.
  prior    ours: unclip_jax.train.diffusion_prior_stage.build_train_step (x0 MSE on mean/std-
           normalised z_i, text conditioning replaced by the null one 10% of the time), AdamW
           lr 1.1e-4, beta2 0.96, eps 1e-6, weight decay 6e-2 on kernels only, no EMA.
           torch: PriorTransformer on the same inputs, AdamW with weight decay on the Linear
           weights only (the same set).
Both draw t ~ U{0..999} and the noise per step (cosine schedule). The FLOP count is XLA's for our
compiled step (cost_analysis); torch's rate uses the same count. Timing excludes warm-up (and
compilation); figures are the median of --repeats steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

def decoder_batch(size: str, batch: int, seed: int = 0) -> dict:
    import numpy as np
    t = common.text_inputs(batch, seed)
    s = common.SIZES[size]["decoder"]["sample_size"]
    image = np.random.default_rng(seed + 1).uniform(-1, 1, (batch, s, s, 3)).astype(np.float32)
    return dict(image=image, image_embed=t["image_embed"], text_embed=t["text_embed"],
                text_hidden=t["text_hidden"], text_mask=t["text_mask"])


def prior_batch(batch: int, seed: int = 0) -> dict:
    return common.text_inputs(batch, seed)


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------

def jax_step(make, model, batch: dict, tx):
    """Compile ``make(model, stage, tx, ema_decay=None)``'s step; returns (step(), flops,
    compile seconds). ``step()`` runs one update on the fixed batch and waits for it."""
    import jax
    import jax.numpy as jnp
    train_step, state, _, _ = make(model, tx=tx, ema_decay=None)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    rng = jax.random.key(0)
    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def step():
        holder[0], metrics = compiled(holder[0], batch, rng)
        jax.block_until_ready(metrics["loss"])
        return float(metrics["loss"])

    return step, common.compiled_flops(compiled), compile_s


def _decoder_stage():
    """Our decoder step as this benchmark times it: (make(model, tx=..., ema_decay=...), tx)."""
    from unclip_jax.train import decoder_stage
    from unclip_jax.train.optimizer import OptimizerConfig, make_optimizer
    stage = decoder_stage.DecoderStageConfig(learned_variance=False)
    make = lambda m, **kw: decoder_stage.build_train_step(m, stage, **kw)  # noqa: E731
    return make, make_optimizer(OptimizerConfig(1.2e-4))


def ours_decoder_step(model, batch):
    make, tx = _decoder_stage()
    return jax_step(make, model, batch, tx)


def decoder_step_jaxpr(model, batch: dict):
    """The jaxpr of that same step on ``batch`` (traced, nothing compiled): for FLOP counts and
    for finding the step's operations."""
    import jax
    import jax.numpy as jnp
    make, tx = _decoder_stage()
    step, state, _, _ = make(model, tx=tx, ema_decay=None)
    return jax.make_jaxpr(step)(state, {k: jnp.asarray(v) for k, v in batch.items()},
                                jax.random.key(0))


def ours_prior_step(model, batch):
    from unclip_jax.train import diffusion_prior_stage
    from unclip_jax.train.optimizer import OptimizerConfig, make_optimizer
    tx = make_optimizer(OptimizerConfig(1.1e-4, b2=0.96, eps=1e-6, weight_decay=6e-2))
    make = lambda m, **kw: diffusion_prior_stage.build_train_step(m, **kw)  # noqa: E731
    return jax_step(make, model, batch, tx)


# --------------------------------------------------------------------------------------------
# diffusers + torch
# --------------------------------------------------------------------------------------------

def _alphas_cumprod(device):
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return sched.alphas_cumprod.to(device)


def _q_sample(acp, x0, t, noise):
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a = acp[t].reshape(shape).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _adamw(named_params, lr, b2, eps, weight_decay, device):
    import torch
    decay = [p for n, p in named_params if p.requires_grad and p.ndim >= 2
             and n.endswith("weight")]
    ids = {id(p) for p in decay}
    rest = [p for _, p in named_params if p.requires_grad and id(p) not in ids]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, b2), eps=eps)


def torch_decoder_step(unet, proj, batch: dict, device="cpu", autocast_dtype=None):
    """step() of the decoder in torch; NHWC NumPy batch converted once, NCHW on device."""
    import torch
    import torch.nn.functional as F
    dev = torch.device(device)
    unet.to(dev).train()
    proj.to(dev).train()
    x0 = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(dev)
    zi, zt = (torch.from_numpy(batch[k]).to(dev) for k in ("image_embed", "text_embed"))
    hid = torch.from_numpy(batch["text_hidden"]).to(dev)
    mask = torch.from_numpy(batch["text_mask"]).to(dev)
    acp = _alphas_cumprod(dev)
    params = list(unet.named_parameters()) + list(proj.named_parameters())
    opt = _adamw(params, 1.2e-4, 0.999, 1e-8, 0.0, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    b = x0.shape[0]
    null = proj.learned_classifier_free_guidance_embeddings

    def step():
        t = torch.randint(0, 1000, (b,), generator=gen, device=dev)
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        drop_image = torch.rand(b, generator=gen, device=dev) < 0.1
        drop_text = torch.rand(b, generator=gen, device=dev) < 0.5
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            x_t = _q_sample(acp, x0, t, noise)
            z_img = torch.where(drop_image[:, None], null[None].expand_as(zi), zi)
            z_txt = torch.where(drop_text[:, None], torch.zeros_like(zt), zt)
            keep = mask & ~drop_text[:, None]
            context, emb_add = proj(image_embeddings=z_img, prompt_embeds=z_txt,
                                    text_encoder_hidden_states=hid,
                                    do_classifier_free_guidance=False)
            keep = F.pad(keep, (proj.clip_extra_context_tokens, 0), value=True)
            out = unet(x_t, t, encoder_hidden_states=context, class_labels=emb_add,
                       attention_mask=keep).sample
            loss = F.mse_loss(out[:, :3].float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def torch_prior_step(prior, batch: dict, device="cpu", autocast_dtype=None):
    import torch
    import torch.nn.functional as F
    dev = torch.device(device)
    prior.to(dev).train()
    for name in ("clip_mean", "clip_std"):  # statistics, not trained (ours: buffers)
        getattr(prior, name).requires_grad_(False)
    tb = {k: torch.from_numpy(v).to(dev) for k, v in batch.items()}
    acp = _alphas_cumprod(dev)
    opt = _adamw(list(prior.named_parameters()), 1.1e-4, 0.96, 1e-6, 6e-2, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    b = tb["image_embed"].shape[0]

    def step():
        with torch.no_grad():
            z0 = (tb["image_embed"] - prior.clip_mean) / prior.clip_std
        t = torch.randint(0, 1000, (b,), generator=gen, device=dev)
        noise = torch.randn(z0.shape, generator=gen, device=dev)
        drop = torch.rand(b, generator=gen, device=dev) < 0.1
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            x_t = _q_sample(acp, z0, t, noise)
            zt = torch.where(drop[:, None], tb["null_text_embed"], tb["text_embed"])
            hid = torch.where(drop[:, None, None], tb["null_text_hidden"], tb["text_hidden"])
            mask = torch.where(drop[:, None], tb["null_text_mask"], tb["text_mask"])
            pred = prior(x_t, timestep=t, proj_embedding=zt, encoder_hidden_states=hid,
                         attention_mask=mask).predicted_image_embedding
            loss = F.mse_loss(pred.float().reshape(z0.shape), z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------

def compare(name: str, batch_size: int, ours: tuple, theirs, repeats: int, warmup: int,
            n_params: int, peak_flops: float | None = None, compiled=None) -> dict:
    """Time both steps (and ``compiled``, torch.compile's step, if given); one result row."""
    step_ours, flops, compile_s = ours
    t_ours = common.time_calls(step_ours, warmup=warmup, repeats=repeats)
    t_theirs = common.time_calls(theirs, warmup=warmup, repeats=repeats)
    extra = {}
    if compiled is not None:
        start = time.perf_counter()
        compiled()                                     # inductor compiles here
        first = time.perf_counter() - start
        t_comp = common.time_calls(compiled, warmup=max(warmup, 1), repeats=repeats)
        m_comp = common.median(t_comp)
        extra = dict(compiled_s=common.spread(t_comp), compiled_speedup=m_comp / common.median(t_ours),
                     compiled_compile_s=max(first - m_comp, 0.0))
    m_ours, m_theirs = common.median(t_ours), common.median(t_theirs)
    row = dict(stage=name, params=f"{n_params / 1e6:.1f}M", batch=batch_size,
               ours_s=common.spread(t_ours), torch_s=common.spread(t_theirs),
               ours_ex_s=batch_size / m_ours, torch_ex_s=batch_size / m_theirs,
               speedup=m_theirs / m_ours, gflop_step=None if flops is None else flops / 1e9,
               ours_tflops=None if flops is None else flops / m_ours / 1e12,
               torch_tflops=None if flops is None else flops / m_theirs / 1e12,
               compile_s=compile_s, **extra)
    if peak_flops and flops:
        row["ours_mfu"] = flops / m_ours / peak_flops
        row["torch_mfu"] = flops / m_theirs / peak_flops
    return row


HEADERS = ["stage", "params", "batch", "ours s/step med (min-max)",
           "torch s/step med (min-max)", "ours ex/s", "torch ex/s", "torch/ours time",
           "GFLOP/step (XLA)", "ours TFLOP/s", "torch TFLOP/s", "ours compile s"]
KEYS = ["stage", "params", "batch", "ours_s", "torch_s", "ours_ex_s", "torch_ex_s", "speedup",
        "gflop_step", "ours_tflops", "torch_tflops", "compile_s"]
COMPILED_HEADERS = ["torch.compile s/step med (min-max)", "torch.compile/ours time",
                    "torch.compile compile s"]
COMPILED_KEYS = ["compiled_s", "compiled_speedup", "compiled_compile_s"]


def compiled_modules(*modules):
    """Copies of the modules wrapped in torch.compile (inductor, default mode)."""
    import copy

    import torch
    return [torch.compile(copy.deepcopy(m)) for m in modules]


def run_decoder(size, batch_size, repeats, warmup, folder, device="cpu", dtype="float32",
                autocast_dtype=None, peak_flops=None, remat=False, torch_compile=False,
                **overrides):
    """One decoder row; ``overrides`` go to our DecoderConfig (e.g. remat_policy,
    attention_impl)."""
    # Training compares epsilon MSE: a 3-channel head (see the module docstring).
    unet, proj = common.diffusers_decoder(size, seed=0, out_channels=3)
    spec = common.SIZES[size]["decoder"]
    ours = common.ours_decoder(unet, proj, folder, dtype=dtype, remat=remat, **overrides)
    n = common.param_count(unet) + common.param_count(proj)
    batch = decoder_batch(size, batch_size)
    mine = ours_decoder_step(ours, batch)
    del ours
    theirs = torch_decoder_step(unet, proj, batch, device, autocast_dtype)
    compiled = None
    if torch_compile:   # copies: the eager modules' weights keep their own optimizer
        unet_c, proj_c = compiled_modules(unet, proj)
        compiled = torch_decoder_step(unet_c, proj_c, batch, device, autocast_dtype)
    return compare(f"decoder {spec['sample_size']}x{spec['sample_size']}", batch_size, mine,
                   theirs, repeats, warmup, n, peak_flops, compiled)


def run_prior(size, batch_size, repeats, warmup, folder, device="cpu", dtype="float32",
              autocast_dtype=None, peak_flops=None, remat=False, torch_compile=False):
    prior = common.diffusers_prior(size, seed=2)
    ours = common.ours_prior(prior, folder, dtype=dtype, remat=remat)
    n = common.param_count(prior) - 2 * common.CLIP_DIM  # clip_mean / clip_std are not trained
    batch = prior_batch(batch_size)
    mine = ours_prior_step(ours, batch)
    del ours
    theirs = torch_prior_step(prior, batch, device, autocast_dtype)
    compiled = None
    if torch_compile:
        compiled = torch_prior_step(compiled_modules(prior)[0], batch, device, autocast_dtype)
    c = prior.config
    return compare(f"prior {c.num_attention_heads * c.attention_head_dim}w x {c.num_layers}L",
                   batch_size, mine, theirs, repeats, warmup, n, peak_flops, compiled)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="mid", choices=list(common.SIZES))
    p.add_argument("--only", choices=["decoder", "prior"], help="one stage only")
    p.add_argument("--decoder-batch", type=int, default=8)
    p.add_argument("--prior-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch-compile", action="store_true",
                   help="also time torch.compile'd modules (a second torch peer)")
    args = p.parse_args(argv)
    headers, keys = HEADERS, KEYS
    if args.torch_compile:
        headers, keys = HEADERS + COMPILED_HEADERS, KEYS + COMPILED_KEYS
    threads = common.match_torch_threads()
    common.preamble(
        f"train step, {args.size} size: unclip-jax vs diffusers + torch (CPU, float32)",
        [f"torch intra-op threads set to {threads} = the usable cores, which XLA's CPU backend "
         "uses; torch flushes denormals to zero (XLA's CPU default)",
         "weights random, identical on both sides (diffusers save_pretrained -> "
         "unclip_jax.convert.diffusers); same batch; warm-up excluded; medians"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "decoder"):
            rows.append(run_decoder(args.size, args.decoder_batch, args.repeats, args.warmup,
                                    os.path.join(tmp, "dec"), torch_compile=args.torch_compile))
            print(common.table(headers, [[rows[-1].get(k) for k in keys]]), flush=True)
        if args.only in (None, "prior"):
            rows.append(run_prior(args.size, args.prior_batch, args.repeats, args.warmup,
                                  os.path.join(tmp, "prior"), torch_compile=args.torch_compile))
    print()
    print(common.table(headers, [[r.get(k) for k in keys] for r in rows]))
    print("\n'torch/ours time' > 1 means ours is faster. TFLOP/s: XLA's FLOP count of our step "
          "over each side's median step time.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
