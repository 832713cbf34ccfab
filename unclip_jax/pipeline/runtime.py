"""Where the pipeline's computations run: a 1-D device mesh ('data'), placement of batches
(sharded along their batch axis when it divides the device count) and of model state
(replicated), split model state per component, and the cache of compiled functions with a count
of traces per stage (a second call with the same shapes and static settings compiles nothing).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class Runtime:
    """Mesh, placement, split model state and the compiled-function cache of one pipeline."""

    def __init__(self):
        self.trace_counts: dict[str, int] = {}
        self._jit_cache: dict[Any, Any] = {}
        self._split_cache: dict[str, Any] = {}
        self._mesh: Mesh | None = None

    @property
    def mesh(self) -> Mesh:
        """A 1-D mesh ('data') of all devices."""
        if self._mesh is None:
            self._mesh = Mesh(np.asarray(jax.devices()), ("data",))
        return self._mesh

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def put(self, x, batch_axis: int | None = 0):
        """Place ``x`` on the devices: sharded along ``batch_axis`` when its size divides the
        device count, else replicated (None stays None)."""
        if x is None:
            return None
        n = self.mesh.size
        if batch_axis is None or n == 1 or x.shape[batch_axis] % n:
            return jax.device_put(x, self.replicated())
        spec = [None] * x.ndim
        spec[batch_axis] = "data"
        return jax.device_put(x, NamedSharding(self.mesh, P(*spec)))

    def split(self, name: str, module) -> tuple[Any, Any]:
        """(graphdef, replicated state) of ``module``, cached under ``name`` while it is the same
        module object."""
        hit = self._split_cache.get(name)
        if hit is None or hit[0] is not module:
            graphdef, state = nnx.split(module)
            state = jax.device_put(state, self.replicated())
            hit = self._split_cache[name] = (module, graphdef, state)
        return hit[1], hit[2]

    def jit(self, stage: str, key: tuple, fn: Callable) -> Callable:
        """``jax.jit(fn)``, cached per (stage, key): ``key`` must hold every static setting that
        ``fn`` closes over. Each trace counts in ``trace_counts[stage]``."""
        full_key = (stage, key)
        if full_key not in self._jit_cache:
            def traced(*args):
                self.trace_counts[stage] = self.trace_counts.get(stage, 0) + 1
                return fn(*args)
            self._jit_cache[full_key] = jax.jit(traced)
        return self._jit_cache[full_key]


def default_dtype() -> str:
    """The compute dtype the commands use unless told: bfloat16 on accelerators, float32 on
    CPU (where bfloat16 is slower and the bundled model is tested)."""
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
