"""Where a command may write, checked before it does any work.

Every command that writes files calls these first, so that a bad ``--out`` fails in one line
before a model is loaded, and so that nothing a user owns is overwritten: an existing output
file is refused unless the command was given ``--overwrite``, and then only the files the
command writes are replaced (atomically, see :mod:`unclip_jax.io.atomic`), never the rest of
the folder. Remote (``gs://``) paths get the same existence checks; their permissions are only
known when writing.
"""
from __future__ import annotations

import os
from typing import Iterable

from unclip_jax.errors import UserError
from unclip_jax.io import paths
from unclip_jax.io.atomic import atomic_write


class OutputError(UserError, ValueError):
    """An output location that cannot be written as asked."""


def _check_creatable(path: str, flag: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a folder we may write in."""
    if paths.is_remote(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        raise OutputError(f"{flag} {path}: {parent} is a file, not a folder. Choose another "
                          "location.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: no permission to write in {parent}. Choose a "
                          "location you can write to.")


def _not_empty(path: str, flag: str, what: str) -> str:
    if not path.strip():
        raise OutputError(f"{flag} is empty; give a {what}.")
    return path


def check_folder(folder: str, *, will_write: Iterable[str] = (), overwrite: bool = False,
                 flag: str = "--out") -> str:
    """Check that ``folder`` is, or can become, a folder to write ``will_write`` (names inside
    it) into, and that none of those exist unless ``overwrite``. Returns ``folder``."""
    folder = _not_empty(paths.check(folder), flag, "folder")
    if paths.exists(folder):
        if not paths.isdir(folder):
            raise OutputError(f"{flag} {folder} is a file, not a folder. Give a folder (it is "
                              "created if missing).")
        if not paths.is_remote(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {folder}: no permission to write in it. Choose a folder "
                              "you can write to.")
        existing = [n for n in will_write if paths.exists(paths.join(folder, n))]
        if existing and not overwrite:
            shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more"
                                               if len(existing) > 3 else "")
            raise OutputError(f"{flag} {folder} already has {shown}. Pass --overwrite to "
                              "replace them, or choose another folder.")
        for n in will_write:
            if paths.isdir(paths.join(folder, n)):
                raise OutputError(f"{flag} {folder}: {n} is a folder, where a file would be "
                                  "written. Move it or choose another folder.")
    else:
        _check_creatable(folder, flag)
    return folder


def check_file(path: str, *, overwrite: bool = False, flag: str = "--out") -> str:
    """Check that the file ``path`` can be written: not a folder, its folder creatable, and not
    already there unless ``overwrite``. Returns ``path``."""
    path = _not_empty(paths.check(path), flag, "file name")
    if paths.isdir(path):
        raise OutputError(f"{flag} {path} is a folder; give a file name.")
    if paths.exists(path):
        if not overwrite:
            raise OutputError(f"{flag} {path} already exists. Pass --overwrite to replace it, or "
                              "choose another name.")
        if not paths.is_remote(path) and not os.access(path, os.W_OK):
            raise OutputError(f"{flag} {path}: no permission to replace it.")
    _check_creatable(path, flag)
    return path


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to the file ``path`` atomically, creating its folder; ``path`` was
    checked with :func:`check_file` before the work began."""
    paths.makedirs(paths.dirname(paths.absolute(path)))
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
