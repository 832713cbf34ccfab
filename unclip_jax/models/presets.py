"""Helpers of the models' config dataclasses: named presets and dtype checks."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp

from unclip_jax.errors import UserError


class PresetError(UserError, ValueError):
    """An unknown preset name, or override fields a preset's config does not have."""


def from_preset(cls: type, presets: dict[str, dict[str, Any]], name: str, **overrides: Any):
    """``cls(**presets[name], **overrides)``, refusing an unknown preset or field by name."""
    what = cls.__name__
    if name not in presets:
        raise PresetError(f"Unknown {what} preset {name!r}. Known presets: {', '.join(presets)}.")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise PresetError(f"Unknown {what} field(s) {unknown} in overrides for preset {name!r}. "
                         f"Valid fields: {', '.join(sorted(fields))}.")
    return cls(**{**presets[name], **overrides})


def dtype_problems(config: Any, names: Sequence[str] = ("dtype", "param_dtype")) -> list[str]:
    """Messages for the fields of ``config`` in ``names`` that do not name a dtype."""
    problems = []
    for name in names:
        value = getattr(config, name)
        try:
            dtype = jnp.dtype(value)
        except (TypeError, ValueError):
            problems.append(f"{name} must name a floating dtype (float32, bfloat16, float16), "
                            f"got {value!r}")
            continue
        if not jnp.issubdtype(dtype, jnp.floating):
            problems.append(f"{name} must name a floating dtype (float32, bfloat16, float16), "
                            f"got {value!r}")
    return problems
