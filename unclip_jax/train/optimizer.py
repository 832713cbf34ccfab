"""The optimizer every stage uses: AdamW with decoupled weight decay (Table 3), one factory.

``OptimizerConfig`` holds the numbers; ``TABLE3[stage]`` has the paper's for each stage;
``make_optimizer(cfg)`` builds the optax transformation: optional global-norm clipping, then
AdamW whose weight decay touches only weight matrices and convolution kernels (parameters named
``kernel``), never biases, normalisation scales, embedding / position tables or learned nulls.
Learning rate: linear warmup from 0 over ``warmup_steps``, then constant, or cosine decay to 0
at ``total_steps``. ``optimizer_config(config)`` and ``ema_decay(config)`` read both from a
training config the same way for every stage.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import optax

from unclip_jax.errors import UserError

SCHEDULES = ("constant", "cosine")


class OptimizerConfigError(UserError, ValueError):
    """Optimizer settings that cannot work together."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 0             # used by the cosine schedule
    lr_schedule: str = "constant"    # 'constant' | 'cosine'
    grad_clip_norm: float | None = None

    def __post_init__(self):
        problems = [p for p in (
            _number("learning_rate", self.learning_rate, 0.0),
            _number("b1", self.b1, 0.0, 1.0), _number("b2", self.b2, 0.0, 1.0),
            _number("eps", self.eps, 0.0, low_open=True),
            _number("weight_decay", self.weight_decay, 0.0),
            None if self.grad_clip_norm is None else _number("grad_clip_norm",
                                                             self.grad_clip_norm, 0.0),
            _integer("warmup_steps", self.warmup_steps), _integer("total_steps", self.total_steps),
        ) if p]
        if problems:
            raise OptimizerConfigError("; ".join(problems) + ". Fix them in the config file or "
                                       "with --config.optimizer.KEY=VALUE.")
        if self.lr_schedule not in SCHEDULES:
            raise OptimizerConfigError(f"lr_schedule must be one of {SCHEDULES}, got "
                                       f"{self.lr_schedule!r}.")
        if self.lr_schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise OptimizerConfigError(
                f"A cosine schedule needs total_steps ({self.total_steps}) greater than "
                f"warmup_steps ({self.warmup_steps}); lower --config.optimizer.warmup_steps or "
                "raise --config.total_steps.")


def _number(name: str, v, low: float, high: float | None = None,
            low_open: bool = False) -> str | None:
    """A problem with the optimizer setting ``name`` (a finite number in the range), or None."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (high is None or v < high)
    if ok:
        return None
    span = f"in [{low:g}, {high:g})" if high is not None else f"{'>' if low_open else '>='} {low:g}"
    return f"optimizer.{name} must be a finite number {span}, got {v!r}"


def _integer(name: str, v) -> str | None:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0:
        return None
    return f"optimizer.{name} must be an integer >= 0, got {v!r}"


# Table 3 of the paper (all AdamW, beta1 0.9).
TABLE3 = {
    "ar_prior": OptimizerConfig(1.6e-4, b2=0.91, eps=1e-10, weight_decay=4.0e-2),
    "diffusion_prior": OptimizerConfig(1.1e-4, b2=0.96, eps=1e-6, weight_decay=6.0e-2,
                                       total_steps=600_000, lr_schedule="cosine"),
    "decoder": OptimizerConfig(1.2e-4),
    "upsampler_256": OptimizerConfig(1.2e-4),
    "upsampler_1024": OptimizerConfig(1.0e-4),
}


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    if cfg.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  cfg.total_steps)
    if cfg.warmup_steps:
        return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.constant_schedule(cfg.learning_rate)


def _names(path) -> list:
    return [getattr(k, "key", getattr(k, "name", None)) for k in path]


def decay_mask(params):
    """True for the parameters weight decay applies to: those named ``kernel`` (plain dicts, or
    nnx states, whose leaves sit under a Variable's ``value``)."""
    def named_kernel(path, _):
        names = [n for n in _names(path) if n != "value"]
        return bool(names) and names[-1] == "kernel"
    return jax.tree_util.tree_map_with_path(named_kernel, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw


def from_config_dict(o: Any, total_steps: int | None = None) -> OptimizerConfig:
    """An OptimizerConfig from a config file's ``optimizer`` group (fields it lacks keep their
    defaults; ``total_steps`` from the run when given)."""
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    values = {k: o[k] for k in o.keys() if k in fields}
    if total_steps is not None:
        values["total_steps"] = total_steps
    values["grad_clip_norm"] = values.get("grad_clip_norm") or None
    return OptimizerConfig(**values)


def optimizer_config(config: Any) -> OptimizerConfig:
    """The OptimizerConfig of a training config's ``optimizer`` group; a ``schedule`` group (name
    'warmup_cosine', warmup_steps), where a config has one, sets the learning-rate schedule."""
    cfg = from_config_dict(config.optimizer, total_steps=config.total_steps)
    sched = config.get("schedule")
    if sched is not None and sched.get("name") == "warmup_cosine":
        cfg = dataclasses.replace(cfg, lr_schedule="cosine",
                                  warmup_steps=sched.get("warmup_steps", 0))
    return cfg


def ema_decay(config: Any) -> float | None:
    """A training config's ``ema_decay``; 0 (or missing) means no EMA."""
    d = config.get("ema_decay", 0.0)
    return float(d) if d else None
