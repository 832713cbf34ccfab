"""Loading ml_collections configs the way big_vision does.

A config is a Python file under ``configs/`` with a ``get_config(arg=None)`` function that returns
an ``ml_collections.ConfigDict``. Commands name it as

    --config configs/FILE.py:key=value,other_key,...   --config.some.field=VALUE ...

The text after ``:`` is handed to ``get_config`` unparsed; config files turn it into typed
values with :func:`parse_arg`. ``--config.a.b=v`` overrides are applied afterwards, with the
type of the existing field. Unknown keys and values of the wrong type are refused with a
:class:`ConfigError` that names the key and says what would be accepted.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import math
import os
from typing import Any, Iterable, Sequence

import ml_collections

from unclip_jax.errors import UserError

ConfigDict = ml_collections.ConfigDict


class ConfigError(UserError, ValueError):
    """A config file, argument or override that cannot be used as given."""


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _suggest(key: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(valid) if valid else '(none)'}."


def coerce(value: str, like: Any, key: str) -> Any:
    """Parse the command-line string ``value`` into the type of ``like`` (the current value).

    Raises ConfigError naming ``key`` when the string does not fit that type.
    """
    def fail(expected: str) -> ConfigError:
        return ConfigError(
            f"Config key '{key}' expects {expected}, got {value!r}. "
            f"Pass a value of that type, e.g. --{key}=<{expected}>.")

    if isinstance(like, bool):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise fail("a boolean (true/false)")
    if isinstance(like, int):
        try:
            return int(value)
        except ValueError:
            raise fail("an integer") from None
    if isinstance(like, float):
        try:
            number = float(value)
        except ValueError:
            raise fail("a number") from None
        if not math.isfinite(number):
            raise fail("a finite number")
        return number
    if isinstance(like, str):
        return value
    if isinstance(like, (tuple, list)):
        text = value.strip()
        if text.startswith(("(", "[")):
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise fail("a list, e.g. 1,2,3") from None
            items = list(parsed) if isinstance(parsed, (tuple, list)) else [parsed]
        else:
            items = [s for s in text.split(",") if s.strip()] if text else []
        if like:  # coerce each element like the first existing element
            items = [coerce(str(i), like[0], f"{key}[{n}]") if isinstance(i, str) else
                     _same_kind(i, like[0], f"{key}[{n}]", value) for n, i in enumerate(items)]
        return type(like)(items)
    if like is None:
        # No type to go by: a Python literal if it parses as one, else the string itself.
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    raise ConfigError(f"Config key '{key}' holds a {type(like).__name__}, which cannot be set "
                      "from the command line; edit the config file instead.")


def _same_kind(item: Any, like: Any, key: str, value: str) -> Any:
    """A list element parsed from a literal: refused unless of the kind of ``like``."""
    numbers_ok = (isinstance(like, (int, float)) and not isinstance(like, bool)
                  and isinstance(item, (int, float)) and not isinstance(item, bool))
    if numbers_ok and isinstance(like, float):
        item = float(item)
    if not (numbers_ok or type(item) is type(like)):
        raise ConfigError(f"Config key '{key}' expects {type(like).__name__} elements, got "
                          f"{item!r} in {value!r}.")
    if isinstance(item, float) and not math.isfinite(item):
        raise ConfigError(f"Config key '{key}' expects finite numbers, got {item!r}.")
    return item


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
    """Parse a ``key=value,key2,...`` config argument against typed defaults.

    A bare ``key`` means ``key=True``. Every key must be one of ``defaults``; each value takes
    the type of its default. Returns a ConfigDict holding all defaults with the overrides applied.
    Values that themselves need commas can use ``+`` as separator inside a value ("1+2+3") when
    the default is a tuple.
    """
    out = ConfigDict(dict(defaults))
    if not arg:
        return out
    for part in arg.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"Unknown config argument '{key}'." + _suggest(key, defaults))
        if not sep:
            if not isinstance(defaults[key], bool):
                raise ConfigError(f"Config argument '{key}' needs a value: write {key}=VALUE.")
            out[key] = True
            continue
        like = defaults[key]
        if isinstance(like, (tuple, list)):
            value = value.replace("+", ",")
        out[key] = coerce(value, like, key)
    return out


def _failure(e: BaseException) -> str:
    text = " ".join(str(e).split())[:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _load_module(path: str):
    if not path or not os.path.isfile(path):
        what = "is a folder" if path and os.path.isdir(path) else "does not exist"
        raise ConfigError(f"Config file '{path}' {what}. Pass the path of a .py file under "
                          "configs/, e.g. --config configs/clip.py:size=tiny.")
    if not path.endswith(".py"):
        raise ConfigError(f"Config file '{path}' is not a Python file (.py); pass a config file "
                          "such as configs/clip.py.")
    name = "unclip_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"Config file '{path}' cannot be loaded as a Python module.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - a config file is code a user wrote
        raise ConfigError(f"Config file '{path}' failed to load ({_failure(e)}); fix the "
                          "file.") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"Config file '{path}' has no get_config(arg) function.")
    return module


def load_file(spec: str) -> ConfigDict:
    """Load ``path.py`` or ``path.py:arg`` into a ConfigDict."""
    path, sep, arg = spec.partition(":")
    module = _load_module(path)
    try:
        accepts_arg = len(inspect.signature(module.get_config).parameters) > 0
    except (TypeError, ValueError):
        accepts_arg = True
    if sep and not accepts_arg:
        raise ConfigError(f"Config file '{path}' takes no argument, but ':{arg}' was given.")
    try:
        config = module.get_config(arg if sep else None) if accepts_arg else module.get_config()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a config's own check of its argument
        shown = f"'{arg}'" if sep else "no argument"
        raise ConfigError(f"get_config({shown}) in '{path}' failed: {_failure(e)}. Check the "
                          "argument after ':' (the file's docstring lists them).") from None
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"get_config() in '{path}' returned {type(config).__name__}, "
                          "not an ml_collections.ConfigDict.")
    return config


def apply_override(config: ConfigDict, dotted: str, value: str, prefix: str = "config") -> None:
    """Set ``config.<dotted> = value`` in place, parsed to the type of the existing field."""
    *parents, leaf = dotted.split(".")
    node, where = config, prefix
    for name in parents:
        if name not in node:
            raise ConfigError(f"Unknown config key '{where}.{name}'." + _suggest(name, node.keys()))
        node, where = node[name], f"{where}.{name}"
        if not isinstance(node, ConfigDict):
            raise ConfigError(f"Config key '{where}' is a value, not a group; "
                              f"'{prefix}.{dotted}' cannot be set.")
    if leaf not in node:
        raise ConfigError(f"Unknown config key '{where}.{leaf}'." + _suggest(leaf, node.keys()))
    current = node[leaf]
    if isinstance(current, ConfigDict):
        raise ConfigError(f"Config key '{where}.{leaf}' is a group; set one of its fields: "
                          f"{', '.join(sorted(current.keys()))}.")
    parsed = coerce(value, current, f"{where}.{leaf}")
    try:
        node[leaf] = parsed
    except TypeError as e:  # ml_collections' own type check (e.g. FieldReference)
        raise ConfigError(f"Config key '{where}.{leaf}': {e}") from None


def split_overrides(argv: Sequence[str], prefix: str = "config") -> tuple[list[tuple[str, str]], list[str]]:
    """Separate ``--config.a.b=v`` / ``--config.a.b v`` arguments from the rest of ``argv``."""
    overrides, rest = [], []
    flag = f"--{prefix}."
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(flag):
            body = a[len(flag):]
            key, sep, value = body.partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise ConfigError(f"Override '{a}' has no value: write {a}=VALUE.")
                value, i = argv[i + 1], i + 1
            if not key:
                raise ConfigError(f"Override '{a}' names no key.")
            overrides.append((key, value))
        else:
            rest.append(a)
        i += 1
    return overrides, rest


# The default logical-axis -> mesh-axis rules (FSDP; see unclip_jax/train/sharding.py).
DEFAULT_SHARDING_RULES = "embed=fsdp,vocab=fsdp,conv_in=fsdp,mlp=tensor,heads=tensor,conv_out=tensor"


def add_trainer_sections(c: ConfigDict, *, checkpoint_every: int, eval_every: int,
                         keep: int = 3) -> ConfigDict:
    """The sections every training config shares (read by unclip_jax.train.trainer): ``mesh``
    (sizes of the 'data', 'fsdp', 'tensor' axes, -1 = the devices the others leave; the
    logical-axis rules; leaves under ``min_shard_bytes`` stay replicated; ``cpu_devices``: the
    CPU devices a CPU run makes, 0 = JAX's default of one, -1 = one per usable core, see
    unclip_jax.train.distributed), ``checkpoint``,
    ``eval_every`` and ``optimizer.accum_steps`` (gradient accumulation)."""
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1,
                                            rules=DEFAULT_SHARDING_RULES,
                                            min_shard_bytes=1 << 16, cpu_devices=0))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=checkpoint_every, keep=keep,
                                                  async_save=False))
    c.eval_every = eval_every
    if "optimizer" in c and "accum_steps" not in c.optimizer:
        c.optimizer.accum_steps = 1
    return c


def load_config(spec: str, overrides: Sequence[tuple[str, str]] | Sequence[str] = ()) -> ConfigDict:
    """Load a config file and apply overrides.

    Args:
      spec: ``path/to/file.py`` or ``path/to/file.py:arg``.
      overrides: ``(dotted_key, value)`` pairs or ``"dotted.key=value"`` strings (without the
        ``--config.`` prefix).
    Returns the ConfigDict, locked so that a typo in code reading it fails loudly.
    """
    config = load_file(spec)
    for item in overrides:
        if isinstance(item, str):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"Override '{item}' must look like key=value.")
        else:
            key, value = item
        apply_override(config, key, value)
    config.lock()
    return config
