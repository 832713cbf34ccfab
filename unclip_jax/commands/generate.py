"""``unclip-jax generate``: text -> images with an unclip-jax pipeline folder.

    unclip-jax generate --checkpoint DIR --prompt "a red circle at the top left" \
        --num-images 4 --seed 0 --out out/generate

Writes one PNG per image (``{prompt index}_{image index}.png``, recording its prompt, seed,
settings and model folder as PNG text) and ``grid.png`` (one row per prompt). Every flag, the
prompts and the output files are checked before the model is loaded: an existing output file is
refused unless ``--overwrite`` (which replaces only the files this command writes). Stage
settings default to the folder's manifest (for Karlo: diffusers' UnCLIPPipeline
defaults) and can be overridden with the flags below. Without ``--checkpoint`` the bundled Shapes
model (``unclip_jax/assets/shapes``) is used; ``make demo`` runs this command with it.
"""
from __future__ import annotations

from unclip_jax.commands.apps import (GUIDANCE, MAX_COUNT, SEED_HELP, add_output_flags,
                                      count_int, finite_float, positive_int, seed_int)
from unclip_jax.errors import UserError


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
    p.add_argument("--truncate", action="store_true",
                   help="Cut prompts longer than the text context instead of refusing them.")
    p.add_argument("--num-images", type=positive_int("--num-images", MAX_COUNT), default=1,
                   help="Images per prompt.")
    p.add_argument("--seed", type=seed_int(), default=0, help="Same seed, same images." + SEED_HELP)
    p.add_argument("--out", default="out/generate", help="Output folder.")
    p.add_argument("--grid", metavar="FILE", help="Where to write the grid of all images "
                   "(default: OUT/grid.png).")
    add_output_flags(p)
    p.add_argument("--prior", choices=("diffusion", "ar", "none"), default="diffusion",
                   help="Which prior makes z_i ('none': the decoder conditioned on z_t, the "
                   "paper's no-prior baseline).")
    p.add_argument("--prior-steps", type=positive_int("--prior-steps"),
                   help="Prior sampling steps (manifest default).")
    p.add_argument("--prior-guidance", type=finite_float("--prior-guidance", *GUIDANCE),
                   help="Prior guidance scale.")
    p.add_argument("--best-of", type=positive_int("--best-of", 1000), help="Prior candidates "
                   "per image (keep the best by z_i . z_t).")
    p.add_argument("--decoder-steps", type=positive_int("--decoder-steps"),
                   help="Decoder sampling steps.")
    p.add_argument("--decoder-guidance", type=finite_float("--decoder-guidance", *GUIDANCE),
                   help="Decoder guidance scale.")
    p.add_argument("--decoder-sampler", choices=("unclip", "ddpm", "ddim", "dpm++"),
                   help="Decoder sampler.")
    p.add_argument("--super-res-steps", type=positive_int("--super-res-steps"),
                   help="Upsampler steps.")
    p.add_argument("--super-res-start", type=count_int("--super-res-start"), metavar="T",
                   help="Start each upsampler from its resized input noised to timestep T "
                   "(keeps the low-res content; the manifest's default, e.g. the Shapes "
                   "model's) instead of pure noise at T = 999.")
    p.add_argument("--upsample", type=count_int("--upsample"), help="How many upsampling stages "
                   "to run (default: all the folder has).")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="Compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU).")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), metavar="N",
                   help="At most N images per compiled call (default: all at once up to 16 "
                   "images in all, else 16); the images are the same as unbatched.")
    p.set_defaults(func=run)


FLAG_NAMES = {"prompt": "--prompt", "num_images": "--num-images", "seed": "--seed",
              "upsample": "--upsample", "batch_size": "--batch-size", "truncate": "--truncate",
              "prior": "--prior"}


def _grid(images, rows: int):
    n, h, w, c = images.shape
    cols = n // rows
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def output_names(num_prompts: int, num_images: int) -> list[str]:
    """The image files generate writes in --out, in order."""
    return [f"{p}_{i}.png" for p in range(num_prompts) for i in range(num_images)]


def _check_args(args, prompts, path):
    """Every check that needs no model: flags, prompts (against the folder's text context),
    the folder's stages, memory, and the output files. Returns the checked request (or None
    when the folder's manifest cannot say; loading it then reports why)."""
    from unclip_jax.io import paths
    from unclip_jax.io.outputs import OutputError, check_file, check_folder
    if args.prior != "diffusion":
        given = [f for f, v in (("--prior-steps", args.prior_steps),) if v is not None]
        if args.prior == "none":
            given += [f for f, v in (("--prior-guidance", args.prior_guidance),
                                     ("--best-of", args.best_of)) if v is not None]
        if given:
            raise GenerateError(f"{given[0]} does not apply to --prior {args.prior}; drop it "
                                "or use --prior diffusion.")
    from unclip_jax.pipeline.pipeline import PipelineInfo
    info = PipelineInfo.from_folder(path)
    request = None
    if info is not None:
        request = info.check_request(prompts, **_request_kwargs(args), names=FLAG_NAMES)
    else:
        from unclip_jax.clip.tokenizer import get_tokenizer
        from unclip_jax.pipeline.pipeline import check_prompts
        check_prompts(get_tokenizer(), prompts, truncate=True, what="--prompt")
    if len(prompts) * args.num_images > MAX_COUNT:
        raise GenerateError(f"{len(prompts)} prompts x {args.num_images} images is more than "
                            f"{MAX_COUNT} images; ask for fewer (run again with another seed).")
    names = output_names(len(prompts), args.num_images)
    if args.grid is not None:
        check_file(args.grid, overwrite=args.overwrite, flag="--grid")
        grid = paths.absolute(args.grid) if not paths.is_remote(args.grid) else args.grid
        if paths.dirname(grid) == paths.absolute(args.out) and paths.basename(grid) in names:
            raise OutputError(f"--grid {args.grid} is one of the images generate writes; give "
                              "the grid another name.")
    else:
        names.append("grid.png")
    check_folder(args.out, will_write=names, overwrite=args.overwrite)
    return request


def _request_kwargs(args) -> dict:
    pick = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    return dict(
        num_images=args.num_images, seed=args.seed, prior=args.prior, upsample=args.upsample,
        batch_size=args.batch_size, truncate=args.truncate,
        prior_settings=pick(steps=args.prior_steps, guidance_scale=args.prior_guidance,
                            best_of=args.best_of) if args.prior == "diffusion" else
        pick(guidance_scale=args.prior_guidance, best_of=args.best_of),
        decoder_settings=pick(steps=args.decoder_steps, guidance_scale=args.decoder_guidance,
                              sampler=args.decoder_sampler),
        super_res_settings=pick(steps=args.super_res_steps, start_t=args.super_res_start))


def run(args, overrides) -> int:
    if overrides:
        raise GenerateError("'generate' takes no --config.* overrides; use its flags.")
    prompts = list(args.prompt)
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise GenerateError(f"--prompt number {empty[0] + 1} is empty; give every --prompt a "
                            "caption.")
    from unclip_jax.commands.apps import checkpoint
    path = checkpoint(args)
    request = _check_args(args, prompts, path)

    import time

    from unclip_jax import compilation_cache
    from unclip_jax.commands.apps import png_metadata, shown, write_png
    from unclip_jax.io import paths
    from unclip_jax.pipeline import UnCLIPPipeline, default_dtype
    start = time.time()
    pipe = UnCLIPPipeline.from_pretrained(path, dtype=args.dtype or default_dtype())
    from tqdm import tqdm
    bar = tqdm(desc="generate", unit="stage", leave=False)

    def progress(stage, total):
        bar.total = total
        bar.set_postfix_str(stage, refresh=False)
        bar.update(1)

    if request is not None and request.batch_size < request.count and args.batch_size is None:
        print(f"generate: {request.count} images, in batches of {request.batch_size} "
              "(--batch-size sets another size).")
    images = pipe.generate(prompts, progress=progress, **_request_kwargs(args))
    settings = {"defaults": pipe.settings}
    paths.makedirs(args.out)
    names = output_names(len(prompts), args.num_images)
    for i, (name, im) in enumerate(zip(names, images)):
        info = png_metadata(args, path, prompt=prompts[i // args.num_images], settings=settings)
        write_png(paths.join(args.out, name), im, info)
    bar.close()
    grid = args.grid if args.grid is not None else paths.join(args.out, "grid.png")
    paths.makedirs(paths.dirname(paths.absolute(grid)))
    write_png(grid, _grid(images, len(prompts)),
              png_metadata(args, path, prompt=prompts, settings=settings))
    print(f"wrote {len(images)} images of {images.shape[1]}x{images.shape[2]} to "
          f"{shown(args.out)} and the grid to {shown(grid)} in {time.time() - start:.1f}s (traced: "
          + ", ".join(f"{k} {v}x" for k, v in sorted(pipe.trace_counts.items()))
          + (f"; {compilation_cache.summary()}" if compilation_cache.summary() else "") + ")")
    return 0
