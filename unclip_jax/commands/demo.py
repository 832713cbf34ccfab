"""``unclip-jax demo``: the diffusion samplers on a distribution with a known answer, and a small
CLIP trained contrastively from scratch (see :mod:`unclip_jax.demo`). ``make demo`` runs
``generate`` with the bundled model instead."""
from __future__ import annotations

import argparse
import os

# The configs/ folder of the source tree (the package is installed editable by `make install`).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
DEMO_CONFIG = os.path.join(CONFIGS_DIR, "demo.py")
OUTPUTS = ("demo_samplers.png", "demo_clip.png")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="The samplers and CLIP against known answers (see --help).",
        description="Each diffusion sampler draws from a 2-D Gaussian mixture through its exact "
        "denoiser (so every error is the sampler's), and a tiny CLIP learns colour names "
        "contrastively from scratch. Writes PNGs.")
    p.add_argument("--config", default=DEMO_CONFIG,
                   help="Config file[:arg] (default: configs/demo.py of the source tree; `:runlocal` makes "
                   "it quicker).")
    p.add_argument("--out", default="out", help="Folder for the PNGs (demo_samplers.png, "
                   "demo_clip.png).")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace demo_samplers.png and demo_clip.png in --out if they exist "
                   "(only those; without it they are refused).")
    p.set_defaults(func=run)
    return p


def run(args, overrides) -> int:
    from unclip_jax.config import load_config
    from unclip_jax.io.outputs import check_folder
    from unclip_jax.pipeline.settings import check_seed
    check_folder(args.out, will_write=OUTPUTS, overwrite=args.overwrite)
    config = load_config(args.config, overrides)
    if "seed" in config:
        check_seed(config.seed, "--config.seed")
    from unclip_jax.demo import run_demo
    run_demo(config, out_dir=args.out)
    return 0
