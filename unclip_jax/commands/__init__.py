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
