"""The subcommands of ``unclip-jax``, one module each (``apps`` holds the four applications).

Each module named in ``COMMANDS`` defines ``add_parser(subparsers)``, which creates its parser and
sets ``func=run`` with ``run(args, overrides) -> int``. Modules import only argparse-level code at
the top (JAX and TensorFlow inside ``run``), so ``unclip-jax --help`` stays instant.

  demo       the samplers and a small CLIP against known answers
  embed      CLIP embeddings and similarities of captions and images
  tokenize   CLIP token ids of captions
  config     a config file's resolved values
  train      train (or resume) any stage from a config
  shapes     build the Shapes dataset
  precompute CLIP embeddings of a dataset for the prior / decoder stages
  apps       vary, interpolate, textdiff, probe
  generate   images from captions with a pipeline folder
  convert    a diffusers UnCLIPPipeline folder to ours
  export     a trainer workdir to a pipeline folder
  eval       the Shapes evaluation
"""

COMMANDS: tuple[str, ...] = (
    "demo",
    "embed",
    "tokenize",
    "config",
    "train",
    "shapes",
    "precompute",
    "apps",
    "generate",
    "convert",
    "export",
    "eval",
)

NO_JAX: frozenset[str] = frozenset({"config"})
"""Commands that never compile: they skip the compilation cache (and the JAX import it needs)."""


def enable_compilation_cache(args) -> None:
    """Turn on JAX's persistent compilation cache for a command that compiles (see
    :mod:`unclip_jax.compilation_cache`), unless ``--no-compilation-cache`` was given."""
    if args.command in NO_JAX:
        return
    from unclip_jax import compilation_cache
    compilation_cache.enable(disabled=args.no_compilation_cache)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message tells the user what to fix (printed as one line, no
    traceback). Imported only when a command fails: the tokenizer's package imports JAX."""
    from unclip_jax import config as config_lib
    from unclip_jax.clip.tokenizer import CaptionError
    from unclip_jax.errors import UserError
    from unclip_jax.torch_weights import CheckpointError
    return (UserError, config_lib.ConfigError, CaptionError, CheckpointError, FileNotFoundError)
