"""``unclip-jax config``: print a config file's resolved values
(``--config FILE.py:arg --config.key=value``)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("config", help="Print a config with its overrides applied.")
    p.add_argument("--config", required=True,
                   help="Config file[:arg], e.g. configs/clip.py:size=tiny.")
    p.set_defaults(func=run)
    return p


def run(args, overrides) -> int:
    from unclip_jax.config import load_config
    print(load_config(args.config, overrides))
    return 0
