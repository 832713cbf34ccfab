"""The one path layer: every path a user gives, local or remote (gs://, s3://, az://, hf://).

Local paths go through ``os`` exactly as before; a URL whose scheme etils.epath serves goes
through ``epath.Path`` (TensorFlow's gfile when TensorFlow is installed, else fsspec: gcsfs for
gs://), the layer Orbax writes checkpoints through too. Any other ``scheme://`` is refused with
one :class:`PathError`. Every function takes and returns ``str`` paths.

Object stores have no rename and no append: :func:`replace` copies, and :class:`AppendFile`
keeps a remote file's content in memory and rewrites it on ``flush()``.
"""
from __future__ import annotations

import builtins
import glob as glob_lib
import os
import posixpath
import re
import shutil
from typing import IO

from etils import epath

from unclip_jax.errors import UserError

REMOTE_SCHEMES = ("gs", "s3", "az", "hf")
"""The URL schemes served (etils.epath's)."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MAGIC = re.compile(r"[*?[]")


class PathError(UserError, ValueError):
    """A path with a scheme this layer cannot serve."""


def scheme(path) -> str | None:
    """'gs' for 'gs://bucket/x', None for a local path."""
    m = _SCHEME.match(os.fspath(path))
    return m.group(1).lower() if m else None


def check(path) -> str:
    """``path`` as str; a remote path must use a served scheme (else one PathError)."""
    path = os.fspath(path)
    s = scheme(path)
    if s is not None and s not in REMOTE_SCHEMES:
        raise PathError(f"{path!r}: the {s}:// scheme is not supported; use a local path or one "
                        f"of {', '.join(x + '://' for x in REMOTE_SCHEMES)}.")
    return path


def is_remote(path) -> bool:
    return scheme(check(path)) is not None


def _remote(path) -> epath.Path:
    return epath.Path(path)


def join(base, *parts) -> str:
    base = check(base)
    return posixpath.join(base, *parts) if scheme(base) else os.path.join(base, *parts)


def absolute(path) -> str:
    """An absolute local path; a remote one as given."""
    return check(path) if is_remote(path) else os.path.abspath(os.fspath(path))


def dirname(path) -> str:
    path = check(path)
    return posixpath.dirname(path.rstrip("/")) if scheme(path) else os.path.dirname(path)


def basename(path) -> str:
    path = check(path)
    return posixpath.basename(path.rstrip("/")) if scheme(path) else os.path.basename(path)


def exists(path) -> bool:
    return _remote(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _remote(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
    return _remote(path).is_file() if is_remote(path) else os.path.isfile(path)


def makedirs(path) -> None:
    """Create a folder and its parents (a no-op on object stores, where folders are implied)."""
    if is_remote(path):
        _remote(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
    """Names (not paths) in a folder, sorted."""
    if is_remote(path):
        return sorted(p.name for p in _remote(path).iterdir())
    return sorted(os.listdir(path))


def getsize(path) -> int:
    return _remote(path).stat().length if is_remote(path) else os.path.getsize(path)


def open(path, mode: str = "r", encoding: str | None = None) -> IO:  # noqa: A001 - like io.open
    if is_remote(path):
        return _remote(path).open(mode, encoding=encoding) if "b" not in mode \
            else _remote(path).open(mode)
    return builtins.open(path, mode, encoding=encoding)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def remove(path) -> None:
    if is_remote(path):
        _remote(path).unlink()
    else:
        os.remove(path)


def rmtree(path) -> None:
    if is_remote(path):
        _remote(path).rmtree(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace(src, dst) -> None:
    """Move ``src`` over ``dst`` (a file or a folder): a rename locally, a copy then delete of
    every object on object stores."""
    if not is_remote(src) and not is_remote(dst):
        os.replace(src, dst)
        return
    if isdir(src):
        for name in listdir(src):
            replace(join(src, name), join(dst, name))
        rmtree(src)
    else:
        write_bytes(dst, read_bytes(src))
        remove(src)


def glob(pattern) -> list[str]:
    """Sorted paths matching a glob pattern (``*``, ``?``, ``[...]``)."""
    pattern = check(pattern)
    if not scheme(pattern):
        return sorted(glob_lib.glob(pattern))
    if not _MAGIC.search(pattern):
        return [pattern] if exists(pattern) else []
    head, sep, tail = pattern.partition("://")
    parts = tail.split("/")
    first = next(i for i, p in enumerate(parts) if _MAGIC.search(p))
    if first == 0:
        raise PathError(f"{pattern!r}: the bucket name cannot be a glob pattern.")
    base = head + sep + "/".join(parts[:first])
    return sorted(os.fspath(p) for p in _remote(base).glob("/".join(parts[first:])))


def files_under(top) -> list[str]:
    """Every file under the folder ``top``, recursively, sorted."""
    if not is_remote(top):
        return sorted(os.path.join(d, name) for d, _, names in os.walk(top) for name in names)
    found = []
    for name in listdir(top):
        child = join(top, name)
        found += files_under(child) if isdir(child) else [child]
    return sorted(found)


class AppendFile:
    """A text file written by appending lines (a log): appended to locally; kept in memory and
    rewritten whole on ``flush()`` remotely (its earlier content read once, so a resumed run
    goes on where the last one stopped)."""

    def __init__(self, path):
        self.path = check(path)
        self._local = None
        self._text: list[str] = []
        self._dirty = False
        if is_remote(path):
            if exists(path):
                self._text.append(read_bytes(path).decode("utf-8"))
        else:
            self._local = builtins.open(path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        if self._local is not None:
            self._local.write(text)
        else:
            self._text.append(text)
            self._dirty = True

    def flush(self) -> None:
        if self._local is not None:
            self._local.flush()
        elif self._dirty:
            write_bytes(self.path, "".join(self._text).encode("utf-8"))
            self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._local is not None:
            self._local.close()
            self._local = None


# --------------------------------------------------------------------------------------------
# Paths read from files (manifests, indexes): they must stay inside their folder
# --------------------------------------------------------------------------------------------

def relative_problem(name) -> str | None:
    """Why ``name`` (a path read from a file, meant relative to its folder) may not be used, or
    None: it must be a non-empty string, not absolute, with no '..' part and no URL scheme."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name or not name.strip():
        return "is empty"
    if "\0" in name:
        return "holds a NUL character"
    if _SCHEME.match(name):
        return "is a URL, not a path relative to the folder"
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or os.path.isabs(name):
        return "is an absolute path"
    if ".." in parts:
        return "leaves the folder ('..')"
    return None


def hf_cache_blobs(folder) -> str | None:
    """The ``blobs/`` folder of the Hugging Face Hub cache entry that ``folder`` lies in (a
    snapshot's files are symlinks into it), or None."""
    parts = os.path.abspath(os.fspath(folder)).split(os.sep)
    if "snapshots" not in parts[1:]:
        return None
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    blobs = os.sep.join(parts[:i] + ["blobs"])
    return blobs if os.path.isdir(blobs) else None


def inside(path, root, *, also=()) -> bool:
    """Whether the local ``path``, every symlink resolved, lies inside the folder ``root`` (or
    one of the folders ``also``). Remote paths: True (object stores have no symlinks)."""
    if is_remote(path) or is_remote(root):
        return True
    real = os.path.realpath(path)
    for r in (root, *also):
        r = os.path.realpath(r)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False
