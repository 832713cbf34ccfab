"""JAX's persistent compilation cache for the command line, and a count of its hits and misses.

Every `unclip-jax` command compiles the same programs as the last identical call; with the cache
a second call loads them from disk instead of compiling (the Shapes `generate`: 34 s -> 10 s).
The cache lives in the user's cache directory (``$UNCLIP_JAX_CACHE``, else
``$XDG_CACHE_HOME/unclip-jax``, else ``~/.cache/unclip-jax``), under ``jax/``. A
``JAX_COMPILATION_CACHE_DIR`` the user set wins; ``UNCLIP_JAX_COMPILATION_CACHE=0`` (or the
command's ``--no-compilation-cache``) turns it off. JAX's own switches do the work; this module
only picks the folder and counts the events JAX reports (``jax.monitoring``).
"""
from __future__ import annotations

import os

import jax

OFF_VALUES = ("0", "false", "no", "off")
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
_counts = {"hits": 0, "misses": 0}
_listening = False


def user_cache_dir() -> str:
    """The folder unclip-jax keeps its caches in (compiled programs, converted weights)."""
    explicit = os.environ.get("UNCLIP_JAX_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unclip-jax")


def _listen(event: str, **_) -> None:
    if event == _HIT:
        _counts["hits"] += 1
    elif event == _MISS:
        _counts["misses"] += 1


def enable(disabled: bool = False) -> str | None:
    """Turn the persistent cache on for this process; returns its folder (None when off)."""
    global _listening
    if disabled or os.environ.get("UNCLIP_JAX_COMPILATION_CACHE", "1").lower() in OFF_VALUES:
        return None
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(user_cache_dir(), "jax")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None  # an unwritable cache costs speed only; the command still runs
    jax.config.update("jax_compilation_cache_dir", folder)
    # every program is worth keeping: the CPU compiles of the small models take 0.1-5 s each
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if not _listening:
        jax.monitoring.register_event_listener(_listen)
        _listening = True
    return folder


def counts() -> dict[str, int]:
    """Cache hits and misses (compiles) of this process so far."""
    return dict(_counts)


def summary() -> str:
    """E.g. 'compilation cache: 5 loaded, 0 compiled' (empty when the cache is off)."""
    if not _listening:
        return ""
    return f"compilation cache: {_counts['hits']} loaded, {_counts['misses']} compiled"
