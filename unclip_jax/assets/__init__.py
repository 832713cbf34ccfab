"""Files that ship with the package: the bundled Shapes model (an unclip-jax pipeline folder).

``resolve_checkpoint(path)`` is how every command that loads a pipeline picks its folder: the
``--checkpoint`` the user gave, else the bundled Shapes model. Kept free of JAX imports, so the
commands' ``--help`` stays instant.
"""
from __future__ import annotations

import os

from unclip_jax.errors import UserError

SHAPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes")


class CheckpointNotFound(UserError, FileNotFoundError):
    """No pipeline folder where one was asked for."""


def resolve_checkpoint(path: str | None) -> str:
    """The pipeline folder to load: ``path`` if given, else the bundled Shapes model."""
    if path:
        if "://" in path:   # remote (gs://): checked when read, by unclip_jax.io.pipeline_folder
            return path
        if not os.path.isfile(os.path.join(path, "unclip.json")):
            what = ("does not exist" if not os.path.exists(path)
                    else "is a file, not a folder" if not os.path.isdir(path)
                    else "has no unclip.json")
            raise CheckpointNotFound(
                f"--checkpoint {path} {what}; pass a pipeline folder written by "
                "UnCLIPPipeline.save_pretrained, `unclip-jax export` or `unclip-jax convert`.")
        return path
    if os.path.isfile(os.path.join(SHAPES, "unclip.json")):
        return SHAPES
    raise CheckpointNotFound(
        f"No --checkpoint given, and the bundled Shapes model is missing from {SHAPES} (an "
        "install without package data? reinstall, or rebuild it with configs/shapes.py); pass "
        "--checkpoint DIR, "
        "a pipeline folder from `unclip-jax export`, `unclip-jax convert` or save_pretrained.")
