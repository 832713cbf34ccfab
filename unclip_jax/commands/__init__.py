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
  tfrecord   webdataset tar shards converted once to TFRecord (read in parallel)
  precompute CLIP embeddings of a dataset for the prior / decoder stages
  apps       vary, interpolate, textdiff, probe
  generate   images from captions with a pipeline folder
  convert    a diffusers UnCLIPPipeline folder to ours
  export     a trainer workdir to a pipeline folder
  eval       the Shapes evaluation
  clip-retrieval  Shapes caption retrieval from a CLIP's image embeddings
"""

COMMANDS: tuple[str, ...] = (
    "demo",
    "embed",
    "tokenize",
    "config",
    "train",
    "shapes",
    "tfrecord",
    "precompute",
    "apps",
    "generate",
    "convert",
    "export",
    "eval",
    "clip_retrieval",
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
    traceback, status 2). Every error of ours that a user can cause is a ``UserError``."""
    from unclip_jax.errors import UserError
    return (UserError, FileNotFoundError)


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)[:200]


def one_line(e: BaseException, expected: tuple[type[BaseException], ...]) -> tuple[str, int]:
    """The line ``main`` prints for an exception, and the exit status: 2 for what a user can fix
    (``expected``, file-system errors, memory), 1 for a bug of ours."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    if isinstance(e, expected):
        return f"error: {text}", 2
    if _out_of_memory(e):
        return ("error: out of memory (" + text[:200] + "). Ask for less at once: fewer "
                "images or a smaller --batch-size.", 2)
    if isinstance(e, OSError):
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        why = e.strerror or text or type(e).__name__
        return f"error: cannot use{where}: {why}. Check the path, its permissions and free space.", 2
    return (f"internal error: {type(e).__name__}: {text[:300]}. This is a bug in unclip-jax: "
            "rerun with --debug for the traceback and report it.", 1)
