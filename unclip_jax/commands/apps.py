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

def positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {value}")
        return value
    return parse


def _common(p, *, ddim: bool = True, batch: str | None = None) -> None:
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="unclip-jax pipeline folder (UnCLIPPipeline.save_pretrained). Default: the "
                        "bundled Shapes model.")
    p.add_argument("--seed", type=int, default=0,
                   help="Random seed; the same seed gives the same images.")
    if ddim:
        p.add_argument("--decoder-steps", type=positive_int("--decoder-steps"), default=50,
                       help="DDIM steps of the decoder, used for the inversion and for "
                            "decoding.")
        p.add_argument("--refine-iters", type=int, default=2,
                       help="Fixed-point iterations per DDIM inversion step; more makes the "
                            "inversion exact (eta 0 then reproduces the image), each costs one "
                            "model call per step.")
        p.add_argument("--decoder-caption", default=None, metavar="TEXT",
                       help="Caption for the decoder's text input while inverting and decoding "
                            "(default: the empty caption, as Karlo's image variations).")
    p.add_argument("--decoder-guidance", type=float, default=None,
                   help="Decoder classifier-free guidance (default: the pipeline's setting).")
    p.add_argument("--upsample", type=int, default=None, metavar="N",
                   help="How many upsampling stages to run (default: all the pipeline has; 0 keeps "
                        "the decoder's resolution).")
    p.add_argument("--out", default=os.path.join("out", p.prog.split()[-1]), metavar="DIR",
                   help="Folder for the PNGs (created if missing; files in it are overwritten).")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="Compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU).")
    if batch:
        p.add_argument("--batch-size", type=positive_int("--batch-size"), default=None,
                       metavar="N", help=f"At most N images per call (default: all at once); "
                       f"{batch}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "vary", help="Variations of an image (unCLIP section 3.1).",
        description="Encode the image with CLIP (z_i), DDIM-invert it through the decoder to "
        "its latent x_T, then decode from x_T with DDIM noise eta: each image keeps the "
        "input's gist and layout. eta 0 reconstructs the input. Writes variation_NN.png and "
        "variations.png (input, then the variations).")
    p.add_argument("--image", required=True, metavar="PATH", help="The image to vary.")
    p.add_argument("--num-images", type=positive_int("--num-images"), default=4, metavar="N",
                   help="Number of variations.")
    p.add_argument("--eta", type=float, default=1.0,
                   help="DDIM noise: 0 reconstructs the image, 1 is DDPM-like, larger strays "
                        "further.")
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
    p.add_argument("--frames", type=positive_int("--frames"), default=5, metavar="N",
                   help="Number of frames, both ends included.")
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
    p.add_argument("--reconstructions", type=int, default=4, metavar="N",
                   help="Number of decoder samples from the image's z_i.")
    p.add_argument("--logit-scale", type=float, default=None,
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
            "model": os.path.abspath(model)}
    images = getattr(args, "image", None)
    if images:
        text["image"] = json.dumps(images) if isinstance(images, list) else images
    for key, value in fields.items():
        text[key] = value if isinstance(value, str) else json.dumps(value)
    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    return info


def _write(out_dir: str, named: list, info=None) -> list[str]:
    from PIL import Image
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, image in named:
        path = os.path.join(out_dir, name)
        Image.fromarray(image).save(path, pnginfo=info)
        paths.append(path)
    return paths


def _report(paths: list[str]) -> None:
    print(f"wrote {len(paths)} file(s):")
    for path in paths:
        print(f"  {path}")


def _setup(args, images: list[str]):
    """Read the inputs (refusing bad ones before the slow model load), then the pipeline."""
    from unclip_jax import applications as apps
    rgb = [apps.load_image(path) for path in images]
    if getattr(args, "decoder_caption", None) is not None and not args.decoder_caption.strip():
        args.decoder_caption = None
    if getattr(args, "refine_iters", 0) < 0:
        raise AppsCommandError(f"--refine-iters must be >= 0, got {args.refine_iters}.")
    if args.upsample is not None and args.upsample < 0:
        raise AppsCommandError(f"--upsample must be >= 0, got {args.upsample}.")
    args.model = resolve_checkpoint(args.checkpoint)
    from unclip_jax.pipeline import default_dtype
    return rgb, load_pipeline(args.model, args.dtype or default_dtype())


def _batches(n: int, batch_size: int | None) -> list[tuple[int, int]]:
    """(start, stop) of each batch of at most ``batch_size`` of ``n`` items (one: all)."""
    size = n if not batch_size else batch_size
    return [(lo, min(n, lo + size)) for lo in range(0, n, max(size, 1))] or [(0, 0)]


def _ddim_kw(args) -> dict:
    return dict(steps=args.decoder_steps, guidance_scale=args.decoder_guidance,
                refine_iters=args.refine_iters, caption=args.decoder_caption,
                upsample=args.upsample)


def run_vary(args, overrides) -> int:
    from unclip_jax import applications as apps
    (image,), pipe = _setup(args, [args.image])
    images = []
    for k, (lo, hi) in enumerate(_batches(args.num_images, args.batch_size)):
        out = apps.variations(pipe, image, hi - lo, args.seed + k, eta=args.eta,
                              progress=_Bar("vary"), **_ddim_kw(args))
        images += list(out.images)
    named = [(f"variation_{i:02d}.png", im) for i, im in enumerate(images)]
    named.append(("variations.png", _strip([image] + images)))
    _report(_write(args.out, named, png_metadata(args, args.model)))
    return 0


def run_interpolate(args, overrides) -> int:
    from unclip_jax import applications as apps
    if len(args.image) != 2:
        raise AppsCommandError(f"interpolate takes exactly two images (--image A --image B), got "
                               f"{len(args.image)}.")
    if args.frames < 2:
        raise AppsCommandError(f"--frames must be at least 2 (the two ends), got {args.frames}.")
    (a, b), pipe = _setup(args, args.image)
    out = apps.interpolate(pipe, a, b, args.frames, args.seed, mode=args.mode,
                           progress=_Bar("interpolate"), batch_size=args.batch_size,
                           **_ddim_kw(args))
    named = [(f"frame_{i:02d}.png", im) for i, im in enumerate(out.frames)]
    named.append(("interpolation.png", _strip([a] + list(out.frames) + [b])))
    _report(_write(args.out, named, png_metadata(args, args.model)))
    return 0


def parse_thetas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AppsCommandError(f"--thetas must be comma-separated numbers in [0, 1] such as "
                               f"0,0.25,0.5; got {text!r}.") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise AppsCommandError(f"--thetas must be comma-separated numbers in [0, 1] such as "
                               f"0,0.25,0.5; got {text!r}.")
    return values


def run_textdiff(args, overrides) -> int:
    from unclip_jax import applications as apps
    thetas = parse_thetas(args.thetas)
    for flag, text in (("--caption", args.caption), ("--target", args.target)):
        if not text.strip():
            raise AppsCommandError(f"{flag} is empty; give a caption such as 'a photo of a cat'.")
    (image,), pipe = _setup(args, [args.image])
    images = []
    for lo, hi in _batches(len(thetas), args.batch_size):
        out = apps.textdiff(pipe, image, args.caption, args.target, thetas[lo:hi], args.seed,
                            progress=_Bar("textdiff"), **_ddim_kw(args))
        images += list(out.images)
    named = [(f"theta_{t:.2f}.png", im) for t, im in zip(thetas, images)]
    named.append(("textdiff.png", _strip([image] + images)))
    _report(_write(args.out, named, png_metadata(args, args.model,
                                                 prompt=[args.caption, args.target])))
    return 0


def run_probe(args, overrides) -> int:
    import json

    from unclip_jax import applications as apps
    empty = [i for i, label in enumerate(args.label) if not label.strip()]
    if empty:
        raise AppsCommandError(f"--label number {empty[0] + 1} is empty; give each label a "
                               "caption such as 'an apple'.")
    if args.reconstructions < 0:
        raise AppsCommandError(f"--reconstructions must be >= 0, got {args.reconstructions}.")
    (image,), pipe = _setup(args, [args.image])
    settings = {k: v for k, v in (("steps", args.decoder_steps),
                                  ("guidance_scale", args.decoder_guidance)) if v is not None}
    images = []
    for k, (lo, hi) in enumerate(_batches(args.reconstructions, args.batch_size)):
        out = apps.probe(pipe, image, args.label, hi - lo, args.seed + k,
                         logit_scale=args.logit_scale, upsample=args.upsample,
                         decoder_settings=settings, progress=_Bar("probe"))
        images += list(out.images)
    print("CLIP zero-shot probabilities:")
    for label, prob, cos in sorted(zip(out.labels, out.probs, out.cosine), key=lambda r: -r[1]):
        print(f"  {prob:7.2%}  (cosine {cos:+.3f})  {label}")
    named = [(f"reconstruction_{i:02d}.png", im) for i, im in enumerate(images)]
    named.append(("probe.png", _strip([image] + images)))
    paths = _write(args.out, named, png_metadata(args, args.model, prompt=list(args.label)))
    path = os.path.join(args.out, "probe.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"image": args.image, "labels": out.labels,
                   "probs": [float(p) for p in out.probs],
                   "cosine": [float(c) for c in out.cosine]}, f, indent=2)
    _report(paths + [path])
    return 0
