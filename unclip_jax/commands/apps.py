"""``unclip-jax vary | interpolate | textdiff | probe``: the unCLIP applications (paper section 3)
from the command line. The work is done by :mod:`unclip_jax.applications`; this module reads
the inputs, loads the pipeline, shows progress and writes PNGs (one per result plus a strip).

    unclip-jax vary --image cat.png --checkpoint DIR --num-images 4 --eta 1 --out out/vary
    unclip-jax interpolate --image a.png --image b.png --frames 5 --mode slerp_latent
    unclip-jax textdiff --image cat.png --caption "a photo of a cat" \
        --target "an anime drawing of a cat" --thetas 0,0.25,0.5
    unclip-jax probe --image apple.png --label "an apple" --label "an iPod"

Without ``--checkpoint`` the bundled Shapes model (``unclip_jax/assets/shapes``) is used; without
``--out`` the PNGs go to ``out/COMMAND``. Each PNG records the command, its inputs, the seed, the
settings and the model folder as PNG text (see :func:`png_metadata`).
"""
from __future__ import annotations

import argparse
import os

from unclip_jax.errors import UserError

from unclip_jax.assets import resolve_checkpoint
_PIPELINES: dict = {}


class AppsCommandError(UserError, ValueError):
    """A flag of these commands that cannot be used as given."""


def checkpoint(args, flag: str = "--checkpoint") -> str:
    """The pipeline folder of ``--checkpoint`` (the bundled model when not given); an empty
    value is refused rather than read as 'not given'."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if value is not None and not value.strip():
        raise AppsCommandError(f"{flag} is empty; give a pipeline folder, or leave the flag out "
                               "for the bundled Shapes model.")
    return resolve_checkpoint(value)


def load_pipeline(path: str, dtype: str | None = None):
    """``UnCLIPPipeline.from_pretrained(path, dtype=...)``, kept per folder (and manifest time)
    and dtype in this process, so repeated calls reuse the loaded weights and their compiled
    functions."""
    from unclip_jax.io import pipeline_folder
    from unclip_jax.pipeline import UnCLIPPipeline
    manifest = pipeline_folder.manifest_path(path)
    stamp = os.path.getmtime(manifest) if os.path.isfile(manifest) else None
    key = (os.path.realpath(path), stamp, dtype)
    if stamp is None or key not in _PIPELINES:
        pipe = UnCLIPPipeline.from_pretrained(path, dtype=dtype)  # a clear error when unusable
        _PIPELINES.clear()
        _PIPELINES[key] = pipe
    return _PIPELINES[key]


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------

def bounded_int(name, lo: int | None = None, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (a clear one-line error otherwise)."""
    def parse(text):
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if lo is not None and value < lo:
            raise argparse.ArgumentTypeError(
                f"{name} must be at least {lo}, got {value}" if hi is None else
                f"{name} must be in [{lo}, {hi}], got {value}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"{name} must be at most {hi}, got {value}")
        return value
    return parse


def positive_int(name, hi: int | None = None):
    return bounded_int(name, 1, hi)


def count_int(name):
    """An argparse type: an integer >= 0."""
    return bounded_int(name, 0)


SEED_HELP = " An integer in [0, 2**64)."


def seed_int(name="--seed"):
    """An argparse type: a seed in [0, 2**64)."""
    return bounded_int(name, 0, 2 ** 64 - 1)


def finite_float(name, lo: float | None = None, hi: float | None = None):
    """An argparse type: a finite number in [lo, hi] (nan and inf refused)."""
    import math

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            where = (f"in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else
                     f"at least {lo:g}" if lo is not None else f"at most {hi:g}")
            raise argparse.ArgumentTypeError(f"{name} must be {where}, got {text}")
        return value
    return parse


GUIDANCE = (0.0, 1000.0)
MAX_COUNT = 1_000_000
"""The most images one command makes (more: run again with another seed)."""


MAX_IMAGE_PIXELS_DEFAULT = 2 ** 26
"""The default --max-image-pixels (8192 x 8192): applications.MAX_IMAGE_PIXELS, kept here so
that --help needs no JAX."""


def add_image_flags(p) -> None:
    """--max-image-pixels, for commands that read images."""
    p.add_argument("--max-image-pixels", type=positive_int("--max-image-pixels"),
                   default=MAX_IMAGE_PIXELS_DEFAULT, metavar="N",
                   help="Refuse input images of more than N pixels (width x height) before "
                   "decoding them.")


def add_output_flags(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="Replace output files of these names that already exist (only those; "
                   "without it an existing one is refused before any work).")


def check_outputs(args, names: list[str]) -> None:
    """Refuse (before any work) an --out that cannot hold ``names`` or already has them."""
    from unclip_jax.io.outputs import check_folder
    check_folder(args.out, will_write=names, overwrite=args.overwrite)


def write_png(path: str, image, info=None) -> None:
    """A uint8 image as a PNG at ``path``, atomically (an interrupted write leaves no part)."""
    import io

    from PIL import Image

    from unclip_jax.io.atomic import atomic_write
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _common(p, *, ddim: bool = True, batch: str | None = None) -> None:
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="unclip-jax pipeline folder (UnCLIPPipeline.save_pretrained). Default: the "
                        "bundled Shapes model.")
    p.add_argument("--seed", type=seed_int(), default=0,
                   help="Random seed; the same seed gives the same images." + SEED_HELP)
    if ddim:
        p.add_argument("--decoder-steps", type=positive_int("--decoder-steps"), default=50,
                       help="DDIM steps of the decoder, used for the inversion and for "
                            "decoding.")
        p.add_argument("--refine-iters", type=bounded_int("--refine-iters", 0, 100), default=2,
                       help="Fixed-point iterations per DDIM inversion step (0 to 100); more "
                            "makes the inversion exact (eta 0 then reproduces the image), each "
                            "costs one model call per step.")
        p.add_argument("--decoder-caption", default=None, metavar="TEXT",
                       help="Caption for the decoder's text input while inverting and decoding "
                            "(default: the empty caption, as Karlo's image variations).")
    p.add_argument("--decoder-guidance", type=finite_float("--decoder-guidance", *GUIDANCE),
                   default=None,
                   help="Decoder classifier-free guidance (default: the pipeline's setting).")
    p.add_argument("--upsample", type=count_int("--upsample"), default=None, metavar="N",
                   help="How many upsampling stages to run (default: all the pipeline has; 0 keeps "
                        "the decoder's resolution).")
    p.add_argument("--truncate", action="store_true",
                   help="Cut captions longer than the text context instead of refusing them.")
    add_image_flags(p)
    p.add_argument("--out", default=os.path.join("out", p.prog.split()[-1]), metavar="DIR",
                   help="Folder for the PNGs (created if missing).")
    add_output_flags(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="Compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU).")
    if batch:
        p.add_argument("--batch-size", type=positive_int("--batch-size"), default=None,
                       metavar="N", help=f"At most N images per call (default: all at once up "
                       f"to 16, else 16); {batch}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "vary", help="Variations of an image (unCLIP section 3.1).",
        description="Encode the image with CLIP (z_i), DDIM-invert it through the decoder to "
        "its latent x_T, then decode from x_T with DDIM noise eta: each image keeps the "
        "input's gist and layout. eta 0 reconstructs the input. Writes variation_NN.png and "
        "variations.png (input, then the variations).")
    p.add_argument("--image", required=True, metavar="PATH", help="The image to vary.")
    p.add_argument("--num-images", type=positive_int("--num-images", MAX_COUNT), default=4,
                   metavar="N",
                   help="Number of variations.")
    p.add_argument("--eta", type=finite_float("--eta", 0.0, 10.0), default=1.0,
                   help="DDIM noise in [0, 10]: 0 reconstructs the image, 1 is DDPM-like, "
                        "larger strays further.")
    _common(p, batch="batch k (from 0) uses seed + k, so its images differ from the unbatched "
            "call's.")
    p.set_defaults(func=run_vary)

    p = subparsers.add_parser(
        "interpolate", help="Interpolate between two images (unCLIP section 3.2).",
        description="Spherically interpolate the two images' CLIP embeddings and decode each "
        "frame with DDIM (eta 0). The decoder's starting latent is one random draw for every "
        "frame (--mode fixed) or the slerp of the two images' DDIM-inverted latents (--mode "
        "slerp_latent: the end frames reconstruct the inputs). Writes frame_NN.png and "
        "interpolation.png (A, the frames, B).")
    p.add_argument("--image", action="append", default=[], metavar="PATH", required=True,
                   help="An end image; give the flag twice (A, then B).")
    p.add_argument("--frames", type=bounded_int("--frames", 2, MAX_COUNT), default=5, metavar="N",
                   help="Number of frames, both ends included (at least 2).")
    p.add_argument("--mode", choices=("fixed", "slerp_latent"), default="fixed",
                   help="Decoder latent: shared random noise, or slerp of the inverted latents.")
    _common(p, batch="frames are decoded and upsampled in batches; the frames are the unbatched "
            "ones.")
    p.set_defaults(func=run_interpolate)

    p = subparsers.add_parser(
        "textdiff", help="Edit an image towards a caption with a text diff (unCLIP section 3.3).",
        description="z_d = normalise(z_t(target) - z_t(caption)); each theta decodes "
        "slerp(z_i, z_d, theta) with DDIM (eta 0) from the image's inverted latent, so theta 0 "
        "reconstructs the image and larger thetas move it towards the target caption (the paper "
        "stays within about 0.25-0.5). Writes theta_N.NN.png and textdiff.png.")
    p.add_argument("--image", required=True, metavar="PATH", help="The image to edit.")
    p.add_argument("--caption", required=True, metavar="TEXT",
                   help="A caption describing the image as it is (e.g. 'a photo of a cat').")
    p.add_argument("--target", required=True, metavar="TEXT",
                   help="The caption to move towards (e.g. 'an anime drawing of a cat').")
    p.add_argument("--thetas", default="0,0.25,0.5,0.75,1", metavar="T,T,...",
                   help="Comma-separated interpolation weights in [0, 1].")
    _common(p, batch="each batch inverts the image again; the images are the unbatched ones.")
    p.set_defaults(func=run_textdiff)

    p = subparsers.add_parser(
        "probe", help="CLIP zero-shot labels beside decoder reconstructions (unCLIP section 3.4).",
        description="The typographic-attack probe: print CLIP's zero-shot probability of each "
        "label for the image, and sample the decoder from the image's CLIP embedding to show "
        "what that embedding encodes. Writes reconstruction_NN.png, probe.png (input, then the "
        "reconstructions) and probe.json (labels, probabilities, cosines).")
    p.add_argument("--image", required=True, metavar="PATH", help="The image to probe.")
    p.add_argument("--label", action="append", default=[], metavar="TEXT", required=True,
                   help="A candidate label, e.g. 'an apple' (give the flag once per label).")
    p.add_argument("--reconstructions", type=bounded_int("--reconstructions", 0, MAX_COUNT),
                   default=4,
                   metavar="N", help="Number of decoder samples from the image's z_i.")
    p.add_argument("--logit-scale", type=finite_float("--logit-scale", 0.0, 1000.0),
                   default=None,
                   help="Softmax temperature multiplier on the cosines (default: CLIP's learned "
                        "value, capped at 100).")
    p.add_argument("--decoder-steps", type=positive_int("--decoder-steps"), default=None,
                   help="Decoder sampling steps (default: the pipeline's setting).")
    _common(p, ddim=False, batch="batch k (from 0) uses seed + k, so its reconstructions "
            "differ from the unbatched call's.")
    p.set_defaults(func=run_probe)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

class _Bar:
    """A tqdm progress bar over an application's stages (see applications._Progress)."""

    def __init__(self, name: str):
        self.name, self.bar = name, None

    def __call__(self, done: int, total: int, stage: str) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=self.name, unit="stage", leave=False)
        self.bar.n = done
        self.bar.set_postfix_str(stage)
        self.bar.refresh()
        if done >= total:
            self.bar.close()


def _strip(images, gap: int = 2):
    """uint8 images (resized to the last one's height if needed) side by side, white gaps."""
    import numpy as np
    from PIL import Image
    h = images[-1].shape[0]
    tiles = []
    for im in images:
        if im.shape[0] != h:
            w = max(1, round(im.shape[1] * h / im.shape[0]))
            im = np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC))
        tiles.append(im)
        tiles.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=1)


PNG_KEYS = ("Software", "command", "prompt", "image", "seed", "settings", "model")
"""The PNG text fields the commands write (those that apply): prompt (a caption, or JSON of
several), image (the input files), settings (JSON of the sampling settings)."""

_NOT_SETTINGS = ("func", "command", "no_compilation_cache", "out", "grid", "checkpoint", "model",
                 "seed", "image", "prompt")


def png_metadata(args, model: str, **fields):
    """``PngInfo`` recording how an image was made: the command, the seed, the settings (every
    flag of ``args`` that is not an input or an output, plus ``fields['settings']``), the model
    folder and the given ``fields`` (e.g. prompt)."""
    import json

    from PIL.PngImagePlugin import PngInfo

    from unclip_jax import __version__
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS}
    settings.update(fields.pop("settings", {}))
    text = {"Software": f"unclip-jax {__version__}", "command": args.command,
            "seed": str(args.seed), "settings": json.dumps(settings, sort_keys=True,
                                                           default=str),
            "model": model if "://" in model else os.path.abspath(model)}
    images = getattr(args, "image", None)
    if images:
        text["image"] = json.dumps(images) if isinstance(images, list) else images
    for key, value in fields.items():
        text[key] = value if isinstance(value, str) else json.dumps(value)
    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, shown(value))
    return info


def shown(text: str) -> str:
    """``text`` printable on any terminal (bytes that are not UTF-8 shown as \\xNN)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _write(out_dir: str, named: list, info=None) -> list[str]:
    """Write each (name, uint8 image) of ``named`` in ``out_dir`` (checked beforehand by
    check_outputs), each atomically."""
    from unclip_jax.io import paths as io_paths
    io_paths.makedirs(out_dir)
    written = []
    for name, image in named:
        path = io_paths.join(out_dir, name)
        write_png(path, image, info)
        written.append(path)
    return written


def _report(paths: list[str]) -> None:
    print(f"wrote {len(paths)} file(s):")
    for path in paths:
        print(f"  {shown(path)}")


def _check_texts(args, info, groups) -> None:
    """Refuse empty, undecodable or (without --truncate) too long captions of each (flag,
    texts) of ``groups`` before the model loads."""
    from unclip_jax.clip.tokenizer import get_tokenizer
    from unclip_jax.pipeline.pipeline import check_prompts
    tok = get_tokenizer(info.context_length if info is not None else 77)
    for flag, texts in groups:
        if texts:
            check_prompts(tok, texts, truncate=args.truncate or info is None, what=flag,
                          hint="--truncate")


def _check_memory(info, count: int, upsample) -> None:
    from unclip_jax.pipeline.pipeline import _gb, available_memory
    if info is None:
        return
    size = info.size_after(len(info.upsample_stages) if upsample is None else upsample)
    memory = count * size * size * 3 * 13
    free = available_memory()
    if free is not None and memory > free:
        raise AppsCommandError(f"{count} images of {size}x{size} need about {_gb(memory)} of "
                               f"memory, but {_gb(free)} is available; ask for fewer at once.")


def _setup(args, images: list[str], outputs, count: int, texts=()):
    """Every check that needs no model (flags, captions, the folder's stages, memory, the
    output files ``outputs()`` names, the input images), then the pipeline: returns (images as
    uint8 RGB, pipeline)."""
    from unclip_jax import applications as apps
    from unclip_jax.pipeline.pipeline import PipelineInfo
    from unclip_jax.pipeline.settings import check_stage
    caption = getattr(args, "decoder_caption", None)
    if caption is not None and not caption.strip():
        args.decoder_caption = caption = None
    args.model = checkpoint(args)
    info = PipelineInfo.from_folder(args.model)
    if info is not None:
        n_up = len(info.upsample_stages)
        if args.upsample is not None and args.upsample > n_up:
            raise AppsCommandError(f"--upsample {args.upsample}, but this pipeline has {n_up} "
                                   f"upsampling stage(s) with their models; give 0 to {n_up}.")
        over = {"guidance_scale": args.decoder_guidance, "steps": args.decoder_steps}
        if hasattr(args, "refine_iters"):
            over["sampler"] = "ddim"
        check_stage("decoder", {**info.settings["decoder"],
                                **{k: v for k, v in over.items() if v is not None}})
    _check_texts(args, info, [("--decoder-caption", [caption] if caption else []), *texts])
    _check_memory(info, count, args.upsample)
    check_outputs(args, outputs())
    rgb = [apps.load_image(path, max_pixels=args.max_image_pixels) for path in images]
    from unclip_jax.pipeline import default_dtype
    return rgb, load_pipeline(args.model, args.dtype or default_dtype())


def _batches(n: int, batch_size: int | None) -> list[tuple[int, int]]:
    """(start, stop) of each batch of at most ``batch_size`` of ``n`` items (default: all, up
    to AUTO_BATCH_SIZE, else batches of that many)."""
    from unclip_jax.pipeline.pipeline import AUTO_BATCH_SIZE
    size = batch_size or (n if n <= AUTO_BATCH_SIZE else AUTO_BATCH_SIZE)
    return [(lo, min(n, lo + size)) for lo in range(0, n, max(size, 1))] or [(0, 0)]


def _ddim_kw(args) -> dict:
    return dict(steps=args.decoder_steps, guidance_scale=args.decoder_guidance,
                refine_iters=args.refine_iters, caption=args.decoder_caption,
                upsample=args.upsample, truncate=args.truncate)


def _seed(seed: int, k: int) -> int:
    """Batch k's seed: seed + k, wrapped into [0, 2**64)."""
    return (seed + k) % 2 ** 64


def run_vary(args, overrides) -> int:
    from unclip_jax import applications as apps
    names = lambda: [f"variation_{i:02d}.png" for i in range(args.num_images)]  # noqa: E731
    (image,), pipe = _setup(args, [args.image], lambda: names() + ["variations.png"],
                            args.num_images)
    images = []
    for k, (lo, hi) in enumerate(_batches(args.num_images, args.batch_size)):
        out = apps.variations(pipe, image, hi - lo, _seed(args.seed, k), eta=args.eta,
                              progress=_Bar("vary"), **_ddim_kw(args))
        images += list(out.images)
    named = list(zip(names(), images))
    named.append(("variations.png", _strip([image] + images)))
    _report(_write(args.out, named, png_metadata(args, args.model)))
    return 0


def run_interpolate(args, overrides) -> int:
    from unclip_jax import applications as apps
    if len(args.image) != 2:
        raise AppsCommandError(f"interpolate takes exactly two images (--image A --image B), got "
                               f"{len(args.image)}.")
    names = lambda: [f"frame_{i:02d}.png" for i in range(args.frames)]  # noqa: E731
    (a, b), pipe = _setup(args, args.image, lambda: names() + ["interpolation.png"], args.frames)
    batch = args.batch_size or _batches(args.frames, None)[0][1]
    out = apps.interpolate(pipe, a, b, args.frames, args.seed, mode=args.mode,
                           progress=_Bar("interpolate"), batch_size=batch, **_ddim_kw(args))
    named = list(zip(names(), out.frames))
    named.append(("interpolation.png", _strip([a] + list(out.frames) + [b])))
    _report(_write(args.out, named, png_metadata(args, args.model)))
    return 0


def parse_thetas(text: str) -> list[float]:
    import math
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AppsCommandError(f"--thetas must be comma-separated numbers in [0, 1] such as "
                               f"0,0.25,0.5; got {text!r}.") from None
    if not values or any(not (math.isfinite(v) and 0.0 <= v <= 1.0) for v in values):
        raise AppsCommandError(f"--thetas must be comma-separated numbers in [0, 1] such as "
                               f"0,0.25,0.5; got {text!r}.")
    names = [f"theta_{t:.2f}.png" for t in values]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise AppsCommandError(f"--thetas {text}: two thetas write the same file {twice[0]} "
                               "(names keep two decimals); give thetas that differ in them.")
    return values


def run_textdiff(args, overrides) -> int:
    from unclip_jax import applications as apps
    thetas = parse_thetas(args.thetas)
    for flag, text in (("--caption", args.caption), ("--target", args.target)):
        if not text.strip():
            raise AppsCommandError(f"{flag} is empty; give a caption such as 'a photo of a cat'.")
    names = [f"theta_{t:.2f}.png" for t in thetas]
    (image,), pipe = _setup(args, [args.image], lambda: names + ["textdiff.png"], len(thetas),
                            texts=[("--caption", [args.caption]), ("--target", [args.target])])
    images = []
    for lo, hi in _batches(len(thetas), args.batch_size):
        out = apps.textdiff(pipe, image, args.caption, args.target, thetas[lo:hi], args.seed,
                            progress=_Bar("textdiff"), **_ddim_kw(args))
        images += list(out.images)
    named = list(zip(names, images))
    named.append(("textdiff.png", _strip([image] + images)))
    _report(_write(args.out, named, png_metadata(args, args.model,
                                                 prompt=[args.caption, args.target])))
    return 0


def run_probe(args, overrides) -> int:
    import json

    from unclip_jax import applications as apps
    from unclip_jax.io import paths as io_paths
    from unclip_jax.io.atomic import atomic_write
    empty = [i for i, label in enumerate(args.label) if not label.strip()]
    if empty:
        raise AppsCommandError(f"--label number {empty[0] + 1} is empty; give each label a "
                               "caption such as 'an apple'.")
    names = lambda: [f"reconstruction_{i:02d}.png"  # noqa: E731
                     for i in range(args.reconstructions)]
    (image,), pipe = _setup(args, [args.image], lambda: names() + ["probe.png", "probe.json"],
                            args.reconstructions, texts=[("--label", list(args.label))])
    settings = {k: v for k, v in (("steps", args.decoder_steps),
                                  ("guidance_scale", args.decoder_guidance)) if v is not None}
    images = []
    for k, (lo, hi) in enumerate(_batches(args.reconstructions, args.batch_size)):
        out = apps.probe(pipe, image, args.label, hi - lo, _seed(args.seed, k),
                         logit_scale=args.logit_scale, upsample=args.upsample,
                         decoder_settings=settings, progress=_Bar("probe"),
                         truncate=args.truncate)
        images += list(out.images)
    print("CLIP zero-shot probabilities:")
    for label, prob, cos in sorted(zip(out.labels, out.probs, out.cosine), key=lambda r: -r[1]):
        print(f"  {prob:7.2%}  (cosine {cos:+.3f})  {shown(label)}")
    named = list(zip(names(), images))
    named.append(("probe.png", _strip([image] + images)))
    written = _write(args.out, named, png_metadata(args, args.model, prompt=list(args.label)))
    path = io_paths.join(args.out, "probe.json")
    text = json.dumps({"image": args.image, "labels": out.labels,
                       "probs": [float(p) for p in out.probs],
                       "cosine": [float(c) for c in out.cosine]}, indent=2)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    _report(written + [path])
    return 0
