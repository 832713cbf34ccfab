"""An XLA CPU flag that makes our convolution-heavy programs faster, set before JAX starts its
CPU backend.

``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` keeps convolutions off
YNNPACK, which jaxlib 0.10 uses for them by default, and on XLA's Eigen convolution: YNNPACK's
is about half as fast at 64 channels (6.4 ms against 3.4 ms for a 3x3 forward at 32x32, batch 8,
on the 2-core AMD EPYC of `benchmarks/README.md`) and no faster elsewhere. The rest of
YNNPACK's default use (dots, reductions) is kept.

Tried and not set: ``--xla_cpu_use_onednn=true`` hands convolutions to oneDNN, which computes
their kernel gradients faster (4.2 ms against 7.4 ms for the case above), but its results
depend on how busy the machine is: the same sampling call twice, under load, gave images that
differ by up to 19 grey levels. Reproducible runs come first (resume is bitwise exact, the
same seed draws the same image).

Rules, so that setting it never breaks or overrides anything:
- only on jaxlib 0.10.x, the releases known to have the flag and the fusion type (an unknown
  flag in ``XLA_FLAGS`` makes XLA abort the process);
- a flag the user already put in ``XLA_FLAGS`` is left as the user set it;
- nothing happens once a JAX backend is running (a flag read too late would only mislead), or
  when ``UNCLIP_JAX_CPU_FLAGS=0``;
- only ``xla_cpu_*`` flags: accelerators' compilers do not read them.
"""
from __future__ import annotations

import os
import sys
from importlib.metadata import version

FLAGS = {
    "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
}
SUPPORTED_JAXLIB = ((0, 10),)   # (major, minor) releases with the flag and the fusion type
OFF_VALUES = ("0", "false", "no", "off")


def _jaxlib_release() -> tuple | None:
    try:
        parts = version("jaxlib").split(".")
        return int(parts[0]), int(parts[1])
    except Exception:  # noqa: BLE001 - not installed or an unusual version string: do nothing
        return None


def _backend_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


def flags_to_add(xla_flags: str, release: tuple | None) -> list:
    """The ``--name=value`` flags to append to an ``XLA_FLAGS`` value (a pure function)."""
    if release not in SUPPORTED_JAXLIB:
        return []
    return [f"--{name}={value}" for name, value in FLAGS.items()
            if f"--{name}=" not in xla_flags and f"--{name} " not in xla_flags + " "]


def apply() -> list:
    """Append our flags to ``XLA_FLAGS`` where the rules above allow; returns what was added."""
    if os.environ.get("UNCLIP_JAX_CPU_FLAGS", "").strip().lower() in OFF_VALUES:
        return []
    if _backend_started():
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = flags_to_add(current, _jaxlib_release())
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added
