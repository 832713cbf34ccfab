"""Compile time of a 20-layer Transformer, its layers looped (Python) vs scanned (lax.scan).

    .venv/bin/python benchmarks/compile_time_layers.py                 # 20 layers
    .venv/bin/python benchmarks/compile_time_layers.py --layers 24 --width 1024

Two programs, each built with ``scan_layers`` False and True (the same parameters and ops):
  prior sampler   sample_prior (unCLIP sampler, 25 steps, guidance 4, learned null) on a
                  DiffusionPrior with ``--layers`` blocks
  decoder step    one training step of a Decoder whose GLIDE-style text Transformer has
                  ``--layers`` blocks: epsilon MSE, gradients, an AdamW update (with and
                  without remat)
Nothing is run, only traced, lowered and compiled (one fresh jax.jit each). Columns: trace +
lower seconds, XLA compile seconds, size of the lowered StableHLO text. It prints figures and
asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _compile(fn, *args) -> dict:
    import jax
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return dict(trace_lower_s=t1 - t0, compile_s=t2 - t1, hlo_chars=len(lowered.as_text()))


def prior_sampler(layers: int, width: int, scan: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unclip_jax.models.diffusion_prior import DiffusionPrior, PriorConfig, TextConditioning
    from unclip_jax.models.layers import abstract_init
    from unclip_jax.models.prior_sampling import PriorSamplingConfig, sample_prior
    cfg = PriorConfig(embed_dim=256, text_width=256, context_length=77, num_heads=width // 64,
                      head_dim=64, num_layers=layers, learned_null=True, scan_layers=scan)
    graphdef, state = nnx.split(abstract_init(lambda: DiffusionPrior(cfg, rngs=nnx.Rngs(0))))
    sampling = PriorSamplingConfig(sampler="unclip", steps=25, guidance_scale=4.0,
                                   best_of=1)
    b = 2
    cond = TextConditioning(jax.ShapeDtypeStruct((b, 256), jnp.float32),
                            jax.ShapeDtypeStruct((b, 77, 256), jnp.float32),
                            jax.ShapeDtypeStruct((b, 77), jnp.bool_))

    def fn(state, cond, rng):
        return sample_prior(nnx.merge(graphdef, state), cond, rng, sampling)["image_embed"]

    return _compile(fn, state, cond, jax.random.key(0))


def decoder_step(layers: int, width: int, scan: bool, remat: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from unclip_jax.models.decoder import Decoder, DecoderConfig
    from unclip_jax.models.layers import abstract_init
    # A one-level UNet, so that the text Transformer is most of the program.
    cfg = DecoderConfig(image_size=16, channels=32, channel_mult=(1,), num_res_blocks=1,
                        attention_levels=(0,), mid_attention=False, head_dim=32, groups=8,
                        clip_dim=256,
                        context_dim=256, text_encoder="transformer", xf_width=width,
                        xf_layers=layers, xf_heads=width // 64, xf_ctx=77, xf_vocab=1000,
                        remat=remat, scan_layers=scan)
    graphdef, params = nnx.split(abstract_init(lambda: Decoder(cfg, nnx.Rngs(0))))
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = jax.eval_shape(tx.init, params)
    b = 4
    batch = dict(x_t=jax.ShapeDtypeStruct((b, 16, 16, 3), jnp.float32),
                 noise=jax.ShapeDtypeStruct((b, 16, 16, 3), jnp.float32),
                 t=jax.ShapeDtypeStruct((b,), jnp.int32),
                 image_embed=jax.ShapeDtypeStruct((b, 256), jnp.float32),
                 text_embed=jax.ShapeDtypeStruct((b, 256), jnp.float32),
                 tokens=jax.ShapeDtypeStruct((b, 77), jnp.int32),
                 mask=jax.ShapeDtypeStruct((b, 77), jnp.bool_))

    def step(params, opt_state, batch):
        def loss_fn(p):
            out = nnx.merge(graphdef, p)(batch["x_t"], batch["t"], batch["image_embed"],
                                         batch["text_embed"], text_mask=batch["mask"],
                                         text_tokens=batch["tokens"])
            return jnp.mean(jnp.square(out[..., :3] - batch["noise"]))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return _compile(step, params, opt_state, batch)


HEADERS = ["program", "layers", "layers run", "trace+lower s", "compile s", "total s",
           "StableHLO kchars"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--width", type=int, default=512, help="Transformer width (heads of 64)")
    p.add_argument("--programs", default="prior,decoder,decoder_remat")
    args = p.parse_args(argv)
    programs = [s.strip() for s in args.programs.split(",") if s.strip()]
    common.preamble(f"compile time of {args.layers}-layer Transformers, looped vs scanned",
                    ["nothing is run, only traced, lowered and compiled; one fresh jax.jit "
                     "per row", f"Transformer width {args.width}"])
    rows = []
    for program in programs:
        for scan in (False, True):
            if program == "prior":
                c = prior_sampler(args.layers, args.width, scan)
            else:
                c = decoder_step(args.layers, args.width, scan, remat=program == "decoder_remat")
            name = {"prior": "prior sampler (unclip, 25 steps)", "decoder": "decoder train step",
                    "decoder_remat": "decoder train step, remat"}[program]
            rows.append([name, args.layers, "scanned" if scan else "looped",
                         c["trace_lower_s"], c["compile_s"], c["trace_lower_s"] + c["compile_s"],
                         c["hlo_chars"] // 1000])
            print(common.table(HEADERS, rows[-1:]), flush=True)
    print()
    print(common.table(HEADERS, rows))
    for looped, scanned in zip(rows[::2], rows[1::2]):
        print(f"{looped[0]}: scanned compiles in {scanned[5]:.1f} s vs {looped[5]:.1f} s looped "
              f"({looped[5] / scanned[5]:.1f}x faster); program {scanned[6]} vs {looped[6]} "
              "kchars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
