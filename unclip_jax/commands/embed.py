"""``unclip-jax embed``: CLIP embeddings and similarities of captions and images.

    unclip-jax embed --text "a red circle" --text "a blue square" --image in.png

The CLIP comes from ``--clip DIR``: a Hugging Face ``CLIPModel`` folder, or an unclip-jax
pipeline folder with a CLIP component; without it, the bundled Shapes model's CLIP
(:func:`load_clip`, which ``unclip-jax precompute`` shares)."""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from unclip_jax.assets import resolve_checkpoint
from unclip_jax.errors import UserError

CLIP_HELP = ("A Hugging Face CLIPModel folder (config.json + model.safetensors), or an unclip-jax "
             "pipeline folder with a 'clip' component (both towers). Default: the bundled Shapes "
             "model's CLIP.")


class ClipFolderError(UserError, ValueError):
    """A --clip folder that holds no usable CLIP."""


def load_clip(path: str | None):
    """The CLIP of ``path`` (a Hugging Face CLIPModel folder or a pipeline folder), or of the
    bundled Shapes model when ``path`` is None; returns ``(model, folder)``."""
    if path and not os.path.isfile(os.path.join(path, "unclip.json")):
        from unclip_jax.convert import hf_clip
        if not os.path.isdir(path):
            raise ClipFolderError(f"--clip {path} is not a folder; pass a Hugging Face "
                                  "CLIPModel folder or an unclip-jax pipeline folder.")
        return hf_clip.from_pretrained(path), path
    folder = resolve_checkpoint(path)
    from unclip_jax.io import pipeline_folder
    manifest = pipeline_folder.read_manifest(folder)
    names = [n for n, c in manifest["components"].items() if c["class"] == "CLIP"]
    if not names:
        raise ClipFolderError(f"{folder} has no CLIP with both towers (its components: "
                              f"{', '.join(sorted(manifest['components']))}); pass a Hugging "
                              "Face CLIPModel folder with --clip.")
    return pipeline_folder.load_component(folder, names[0], manifest), folder


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "embed", help="CLIP embeddings of captions and images.",
        description="Encode captions and images with a CLIP (a Hugging Face CLIPModel folder, a "
        "pipeline folder, or the bundled Shapes model's) and print their cosine similarities and "
        "zero-shot probabilities.")
    p.add_argument("--clip", metavar="DIR", help=CLIP_HELP)
    p.add_argument("--text", action="append", default=[], metavar="TEXT",
                   help="A caption (repeat the flag for several).")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="An image file (repeat the flag for several).")
    p.add_argument("--truncate", action="store_true",
                   help="Cut captions longer than the text context instead of refusing them.")
    p.add_argument("--out", metavar="FILE.npz", help="Also write the embeddings to this file "
                   "(.npz is added to a name without it).")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace the --out file if it exists (without it, it is refused).")
    from unclip_jax.commands.apps import add_image_flags
    add_image_flags(p)
    p.set_defaults(func=run)
    return p


def _context_length(path: str | None) -> int | None:
    """The CLIP text context of ``path`` from its config files, without loading weights (None
    when they do not say; loading then reports what is wrong)."""
    import json
    try:
        if path and not os.path.isfile(os.path.join(path, "unclip.json")):
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
            return int((config.get("text_config") or {}).get("max_position_embeddings", 77))
        from unclip_jax.io import pipeline_folder
        manifest = pipeline_folder.read_manifest(resolve_checkpoint(path))
        names = [n for n, c in manifest["components"].items() if c["class"] == "CLIP"]
        return int(manifest["components"][names[0]]["config"]["context_length"])
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - the load says what is wrong
        return None


def _load_images(paths: Sequence[str], max_pixels: int | None = None) -> list:
    """The images as uint8 RGB (see unclip_jax.applications.load_image: 16-bit PNGs scaled as
    in training, a size limit checked before decoding)."""
    from unclip_jax.applications import MAX_IMAGE_PIXELS, load_image
    return [load_image(path, max_pixels=max_pixels or MAX_IMAGE_PIXELS) for path in paths]


def run(args, overrides) -> int:
    import numpy as np

    from unclip_jax import clip
    from unclip_jax.config import ConfigError
    from unclip_jax.commands.apps import shown
    from unclip_jax.io.atomic import atomic_write
    from unclip_jax.io.outputs import check_file
    from unclip_jax.pipeline.pipeline import check_prompts
    if not args.text and not args.image:
        raise ConfigError("Nothing to embed: pass --text and/or --image.")
    if args.clip is not None and not args.clip.strip():
        raise ClipFolderError("--clip is empty; give a CLIP folder, or leave the flag out for "
                              "the bundled Shapes model's CLIP.")
    out = args.out
    if out is not None:
        if not out.strip():
            raise ClipFolderError("--out is empty; give a file name such as emb.npz.")
        if os.path.isdir(out):
            raise ClipFolderError(f"--out {out} is a folder; give a file name such as "
                                  "emb.npz.")
        out = out if out.endswith(".npz") else out + ".npz"   # what numpy would write
        check_file(out, overwrite=args.overwrite, flag="--out")
    if args.text:   # refuse empty, undecodable and (without --truncate) too long captions
        ctx = _context_length(args.clip)
        check_prompts(clip.get_tokenizer(ctx or 77), args.text, truncate=args.truncate or not ctx,
                      what="--text", hint="--truncate")
    images = _load_images(args.image, args.max_image_pixels)  # refused before the model loads
    model, _ = load_clip(args.clip)
    result = {}
    if args.text:
        tokens = check_prompts(clip.get_tokenizer(model.config.context_length), args.text,
                               truncate=args.truncate, what="--text", hint="--truncate")
        result["text_embeds"] = np.asarray(model.encode_text(tokens.ids)[0])
    if images:
        pixels = clip.preprocess(images, image_size=model.config.image_size)
        result["image_embeds"] = np.asarray(model.encode_image(pixels))

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    for key, names in (("text_embeds", args.text), ("image_embeds", args.image)):
        if key in result:
            print(f"{key}: {result[key].shape}, norms "
                  f"{np.round(np.linalg.norm(result[key], axis=-1), 3).tolist()}")
    if args.text and images:
        sims = unit(result["image_embeds"]) @ unit(result["text_embeds"]).T
        logits = float(np.exp(np.asarray(model.logit_scale[...]))) * sims
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        print("cosine similarity (rows: images, columns: texts) and zero-shot probabilities:")
        for path, row, prob in zip(args.image, sims, probs):
            cells = "  ".join(f"{t[:24]!r}: {s:+.3f} ({p:.1%})"
                              for t, s, p in zip(args.text, row, prob))
            print(f"  {shown(os.path.basename(path))}: {cells}")
    if out:
        import io
        buf = io.BytesIO()
        np.savez(buf, texts=np.asarray([shown(t) for t in args.text], dtype=str),
                 images=np.asarray([shown(i) for i in args.image], dtype=str), **result)
        folder = os.path.dirname(os.path.abspath(out))
        os.makedirs(folder, exist_ok=True)
        atomic_write(out, lambda f: f.write(buf.getvalue()))
        print(f"wrote {shown(out)}")
    return 0
