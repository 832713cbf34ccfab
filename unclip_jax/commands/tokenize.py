"""``unclip-jax tokenize``: CLIP token ids of captions."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tokenize", help="Print CLIP token ids of captions.")
    p.add_argument("text", nargs="+", help="Captions to tokenize.")
    from unclip_jax.commands.apps import bounded_int
    p.add_argument("--context-length", type=bounded_int("--context-length", 3, 8192), default=77,
                   help="Row length including start and end tokens (3 to 8192).")
    p.add_argument("--truncate", action="store_true",
                   help="Cut captions that do not fit instead of refusing them.")
    p.set_defaults(func=run)
    return p


def run(args, overrides) -> int:
    from unclip_jax.clip.tokenizer import Tokenizer
    from unclip_jax.pipeline.pipeline import check_prompts
    tok = Tokenizer(context_length=args.context_length)
    batch = check_prompts(tok, args.text, truncate=args.truncate, what="caption",
                          hint="--truncate")
    for text, ids, mask in zip(args.text, batch.ids, batch.mask):
        used = ids[mask].tolist()
        print(f"{text!r}: {len(used)} tokens (of {args.context_length})")
        print("  ids:   ", used)
        print("  pieces:", [tok.decoder[i] for i in used])
    return 0
