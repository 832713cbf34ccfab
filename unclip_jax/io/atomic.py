"""Atomic file writes: a temporary file beside the target, renamed over it once complete.

Remote paths (unclip_jax.io.paths) get the same protocol, the rename being a copy there."""
from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any, Callable

from unclip_jax.io import paths


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(file)`` to a temp file beside ``path``, then rename over it: an
    interrupted write leaves the previous file (or none) and no partial one."""
    if paths.is_remote(path):
        _atomic_write_remote(os.fspath(path), write, mode)
        return
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; a saved model is for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _atomic_write_remote(path: str, write: Callable[[Any], None], mode: str) -> None:
    tmp = paths.join(paths.dirname(path), f".{paths.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with paths.open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            write(f)
        paths.replace(tmp, path)
    except BaseException:
        if paths.exists(tmp):
            paths.remove(tmp)
        raise
