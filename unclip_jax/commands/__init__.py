"""Subcommands of ``unclip-jax`` that live outside cli.py.

Each module named in ``COMMANDS`` defines ``add_parser(subparsers)``, which creates its parser and
sets ``func=run`` with ``run(args, overrides) -> int``. Modules import only argparse-level code at
the top (JAX and TensorFlow inside ``run``), so ``unclip-jax --help`` stays instant.
"""

COMMANDS: tuple[str, ...] = (
    "train",
    "shapes",
    "precompute",
    "apps",
    "generate",
    "convert",
    "export",
    "eval",
)
