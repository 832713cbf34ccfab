"""The ``unclip-jax`` command.

Subcommands (each has ``--help``):
  demo       the diffusion samplers on a distribution with a known answer, and a small CLIP trained
             contrastively from scratch (``make demo`` runs ``generate`` with the bundled model)
  embed      CLIP embeddings and similarities for captions and images, from a Hugging Face
             ``CLIPModel`` folder
  tokenize   CLIP token ids of captions
  config     print a config file's resolved values (``--config FILE.py:arg --config.key=value``)

Heavy imports (JAX, TensorFlow) happen inside the subcommands, so ``--help`` is instant. Errors
that a user can fix are printed as one line, without a traceback, and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from unclip_jax import config as config_lib

# The configs/ folder of the source tree (the package is installed editable by `make install`).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEMO_CONFIG = os.path.join(CONFIGS_DIR, "demo.py")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message tells the user what to fix (no traceback needed)."""
    from unclip_jax.clip.tokenizer import CaptionError
    from unclip_jax.errors import UserError
    from unclip_jax.torch_weights import CheckpointError
    return (UserError, config_lib.ConfigError, CaptionError, CheckpointError, FileNotFoundError)


def _cmd_config(args, overrides) -> int:
    config = config_lib.load_config(args.config, overrides)
    print(config)
    return 0


def _cmd_tokenize(args, overrides) -> int:
    from unclip_jax.clip.tokenizer import Tokenizer
    tok = Tokenizer(context_length=args.context_length)
    batch = tok(args.text, truncate=args.truncate)
    for text, ids, mask in zip(args.text, batch.ids, batch.mask):
        used = ids[mask].tolist()
        print(f"{text!r}: {len(used)} tokens (of {args.context_length})")
        print("  ids:   ", used)
        print("  pieces:", [tok.decoder[i] for i in used])
    return 0


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


def _cmd_embed(args, overrides) -> int:
    import numpy as np

    from unclip_jax import clip
    if not args.text and not args.image:
        raise config_lib.ConfigError("Nothing to embed: pass --text and/or --image.")
    images = _load_images(args.image)  # read (and refuse) inputs before the slow model load
    model = clip.from_pretrained(args.clip)
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
            cells = "  ".join(f"{t[:24]!r}: {s:+.3f} ({p:.1%})" for t, s, p in zip(args.text, row, prob))
            print(f"  {os.path.basename(path)}: {cells}")
    if args.out:
        np.savez(args.out, texts=np.asarray(args.text, dtype=str), images=np.asarray(args.image, dtype=str),
                 **result)
        print(f"wrote {args.out}")
    return 0


def _cmd_demo(args, overrides) -> int:
    from unclip_jax.demo import run_demo
    config = config_lib.load_config(args.config, overrides)
    run_demo(config, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unclip-jax", description="unCLIP (DALL-E 2) in JAX and Flax.",
        epilog="Config fields can be overridden after --config with --config.KEY=VALUE.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="The samplers and CLIP against known answers (see --help).",
                       description="Each diffusion sampler draws from a 2-D Gaussian "
                       "mixture through its exact denoiser (so every error is the sampler's), and a "
                       "tiny CLIP learns colour names contrastively from scratch. Writes PNGs.")
    p.add_argument("--config", default=DEMO_CONFIG,
                   help="Config file[:arg] (default: %(default)s; `:runlocal` makes it quicker).")
    p.add_argument("--out", default="out", help="Folder for the PNGs (default: %(default)s).")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("embed", help="CLIP embeddings of captions and images.",
                       description="Encode captions and images with a Hugging Face CLIPModel "
                       "folder (written by save_pretrained, safetensors) and print their cosine "
                       "similarities and zero-shot probabilities.")
    p.add_argument("--clip", required=True, metavar="DIR",
                   help="Folder with config.json and model.safetensors of a CLIPModel.")
    p.add_argument("--text", action="append", default=[], metavar="TEXT",
                   help="A caption (repeat the flag for several).")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="An image file (repeat the flag for several).")
    p.add_argument("--out", metavar="FILE.npz", help="Also write the embeddings to this file.")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("tokenize", help="Print CLIP token ids of captions.")
    p.add_argument("text", nargs="+", help="Captions to tokenize.")
    p.add_argument("--context-length", type=int, default=77,
                   help="Row length including start and end tokens (default: %(default)s).")
    p.add_argument("--truncate", action="store_true",
                   help="Cut captions that do not fit instead of refusing them.")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("config", help="Print a config with its overrides applied.")
    p.add_argument("--config", required=True, help="Config file[:arg], e.g. configs/clip.py:size=tiny.")
    p.set_defaults(func=_cmd_config)

    from unclip_jax.commands import COMMANDS
    for name in COMMANDS:
        importlib.import_module(f"unclip_jax.commands.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        overrides, rest = config_lib.split_overrides(argv)
    except config_lib.ConfigError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    if overrides and "config" not in vars(args):
        parser.error(f"'{args.command}' takes no config, so --config.* overrides do not apply.")
    try:
        return args.func(args, overrides)
    except _user_errors() as e:
        print(f"unclip-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
