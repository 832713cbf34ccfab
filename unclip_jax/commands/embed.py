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
    p.add_argument("--out", metavar="FILE.npz", help="Also write the embeddings to this file.")
    p.set_defaults(func=run)
    return p


def _load_images(paths: Sequence[str]) -> list:
    from PIL import Image, UnidentifiedImageError
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image '{path}' does not exist.")
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise FileNotFoundError(f"Image '{path}' cannot be read as an image ({e}). "
                                    "Pass a PNG, JPEG or another format Pillow reads.") from None
    return images


def run(args, overrides) -> int:
    import numpy as np

    from unclip_jax import clip
    from unclip_jax.config import ConfigError
    if not args.text and not args.image:
        raise ConfigError("Nothing to embed: pass --text and/or --image.")
    images = _load_images(args.image)  # read (and refuse) inputs before the slow model load
    model, _ = load_clip(args.clip)
    result = {}
    if args.text:
        tokens = clip.get_tokenizer(model.config.context_length)(args.text)
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
            print(f"  {os.path.basename(path)}: {cells}")
    if args.out:
        np.savez(args.out, texts=np.asarray(args.text, dtype=str),
                 images=np.asarray(args.image, dtype=str), **result)
        print(f"wrote {args.out}")
    return 0
