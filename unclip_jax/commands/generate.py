"""``unclip-jax generate``: text -> images with an unclip-jax pipeline folder.

    unclip-jax generate --checkpoint DIR --prompt "a red circle at the top left" \
        --num-images 4 --seed 0 --out out/generate

Writes one PNG per image (``{prompt index}_{image index}.png``, recording its prompt, seed,
settings and model folder as PNG text) and ``grid.png`` (one row per prompt). Stage settings default to the folder's manifest (for Karlo: diffusers' UnCLIPPipeline
defaults) and can be overridden with the flags below. Without ``--checkpoint`` the bundled Shapes
model (``unclip_jax/assets/shapes``) is used; ``make demo`` runs this command with it.
"""
from __future__ import annotations

import io

from unclip_jax.errors import UserError

from unclip_jax.assets import resolve_checkpoint


class GenerateError(UserError, ValueError):
    """A generate flag that cannot be used as given."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="Generate images from captions with a pipeline folder.",
        description="Caption -> CLIP text encoding -> prior -> decoder -> upsamplers. Writes one "
        "PNG per image and grid.png.")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="An unclip-jax pipeline folder (UnCLIPPipeline.save_pretrained or "
                   "`unclip-jax convert`). Default: the bundled Shapes model.")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", required=True,
                   help="A caption (repeat the flag for several).")
    p.add_argument("--num-images", type=int, default=1, help="Images per prompt.")
    p.add_argument("--seed", type=int, default=0, help="Same seed, same images.")
    p.add_argument("--out", default="out/generate", help="Output folder.")
    p.add_argument("--grid", metavar="FILE", help="Where to write the grid of all images "
                   "(default: OUT/grid.png).")
    p.add_argument("--prior", choices=("diffusion", "ar", "none"), default="diffusion",
                   help="Which prior makes z_i ('none': the decoder conditioned on z_t, the "
                   "paper's no-prior baseline).")
    p.add_argument("--prior-steps", type=int, help="Prior sampling steps (manifest default).")
    p.add_argument("--prior-guidance", type=float, help="Prior guidance scale.")
    p.add_argument("--best-of", type=int, help="Prior candidates per image (keep the best by "
                   "z_i . z_t).")
    p.add_argument("--decoder-steps", type=int, help="Decoder sampling steps.")
    p.add_argument("--decoder-guidance", type=float, help="Decoder guidance scale.")
    p.add_argument("--decoder-sampler", choices=("unclip", "ddpm", "ddim", "dpm++"),
                   help="Decoder sampler.")
    p.add_argument("--super-res-steps", type=int, help="Upsampler steps.")
    p.add_argument("--super-res-start", type=int, metavar="T",
                   help="Start each upsampler from its resized input noised to timestep T "
                   "(keeps the low-res content; the manifest's default, e.g. the Shapes "
                   "model's) instead of pure noise at T = 999.")
    p.add_argument("--upsample", type=int, help="How many upsampling stages to run "
                   "(default: all the folder has).")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="Compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU).")
    p.add_argument("--batch-size", type=int, metavar="N", help="At most N images per compiled "
                   "call (default: all at once); the images are the same as unbatched.")
    p.set_defaults(func=run)


def _grid(images, rows: int):
    n, h, w, c = images.shape
    cols = n // rows
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def run(args, overrides) -> int:
    prompts = list(args.prompt)
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise GenerateError(f"--prompt number {empty[0] + 1} is empty; give every --prompt a "
                            "caption.")
    if args.num_images < 1:
        raise GenerateError(f"--num-images must be at least 1, got {args.num_images}.")
    if args.batch_size is not None and args.batch_size < 1:
        raise GenerateError(f"--batch-size must be at least 1, got {args.batch_size}.")
    path = resolve_checkpoint(args.checkpoint)

    import time

    from PIL import Image

    from unclip_jax import compilation_cache
    from unclip_jax.io import paths
    from unclip_jax.pipeline import UnCLIPPipeline, default_dtype
    start = time.time()
    pipe = UnCLIPPipeline.from_pretrained(path, dtype=args.dtype or default_dtype())
    pick = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    from tqdm import tqdm
    bar = tqdm(desc="generate", unit="stage", leave=False)

    def progress(stage, total):
        bar.total = total
        bar.set_postfix_str(stage, refresh=False)
        bar.update(1)

    images = pipe.generate(
        prompts, num_images=args.num_images, seed=args.seed, prior=args.prior, progress=progress,
        upsample=args.upsample, batch_size=args.batch_size,
        prior_settings=pick(steps=args.prior_steps, guidance_scale=args.prior_guidance,
                            best_of=args.best_of) if args.prior == "diffusion" else
        pick(guidance_scale=args.prior_guidance, best_of=args.best_of),
        decoder_settings=pick(steps=args.decoder_steps, guidance_scale=args.decoder_guidance,
                              sampler=args.decoder_sampler),
        super_res_settings=pick(steps=args.super_res_steps, start_t=args.super_res_start))
    from unclip_jax.commands.apps import png_metadata
    settings = {"defaults": pipe.settings}

    def save_png(array, path, info):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", pnginfo=info)
        paths.write_bytes(path, buf.getvalue())

    paths.makedirs(args.out)
    for i, im in enumerate(images):
        info = png_metadata(args, path, prompt=prompts[i // args.num_images], settings=settings)
        save_png(im, paths.join(args.out, f"{i // args.num_images}_{i % args.num_images}.png"),
                 info)
    bar.close()
    grid = args.grid or paths.join(args.out, "grid.png")
    paths.makedirs(paths.dirname(paths.absolute(grid)))
    save_png(_grid(images, len(prompts)), grid,
             png_metadata(args, path, prompt=prompts, settings=settings))
    print(f"wrote {len(images)} images of {images.shape[1]}x{images.shape[2]} to {args.out} and "
          f"the grid to {grid} in {time.time() - start:.1f}s (traced: "
          + ", ".join(f"{k} {v}x" for k, v in sorted(pipe.trace_counts.items()))
          + (f"; {compilation_cache.summary()}" if compilation_cache.summary() else "") + ")")
    return 0
