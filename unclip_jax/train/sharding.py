"""The device mesh, and where every parameter, optimizer slot and batch lives on it.

Mesh: three named axes, ``('data', 'fsdp', 'tensor')``, sized by the config's ``mesh`` group
(``data``, ``fsdp``, ``tensor``; one size may be -1, meaning "the devices the others leave").
Batches are split over ``('data', 'fsdp')`` together (every device sees its own rows); parameters
are split over ``fsdp`` (ZeRO-3 / FSDP: each device holds a slice, XLA gathers it for the matmul)
and ``tensor`` (Megatron-style), and replicated over ``data``.

Parameters carry *logical* axis names (``unclip_jax.models.layers``). ``mesh.rules`` maps them to
mesh axes, as a string ``"logical=mesh_axis,..."`` so it can be overridden from the command line.
The default, :data:`DEFAULT_RULES`, is FSDP:

  embed, vocab, conv_in -> fsdp     the residual / input width: the axis every large matrix has
  mlp, heads, conv_out  -> tensor   the hidden widths (a no-op while ``tensor`` has size 1)

For each parameter the spec is built axis by axis from these rules; an axis whose size the mesh
axis does not divide stays unsplit, and a mesh axis is used at most once per parameter. If a
parameter ends up not split over ``fsdp`` at all (no 'embed'-like axis, or it did not divide),
its largest divisible unsplit axis takes ``fsdp``: every large leaf is split 1/fsdp. Leaves
smaller than ``mesh.min_shard_bytes`` (biases, norms) stay replicated: slicing them saves
nothing and costs a gather.

Optimizer state mirrors the parameters: a slot (Adam's mu, nu; the EMA) whose path ends with a
parameter's path and has its shape gets that parameter's sharding; anything else (step counts)
is replicated.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unclip_jax.config import DEFAULT_SHARDING_RULES
from unclip_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = DEFAULT_SHARDING_RULES


class MeshError(UserError, ValueError):
    """A mesh or sharding setting that does not fit the devices or the model."""


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------

def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of ('data', 'fsdp', 'tensor') for ``num_devices``, resolving one -1."""
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise MeshError(f"Only one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}; "
                        "set the others to explicit sizes (e.g. --config.mesh.data=1).")
    if any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"Mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}.")
    known = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % known:
            raise MeshError(f"The mesh {dict(zip(MESH_AXES, shape))} needs a multiple of {known} "
                            f"devices, but there are {num_devices}; change the mesh sizes.")
        shape[free[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise MeshError(f"The mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices "
                        f"but there are {num_devices}; make the product match or set one axis "
                        "to -1 (e.g. --config.mesh.fsdp=-1).")
    return tuple(shape)


def make_mesh(mesh_config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh of a config's ``mesh`` group (default: all FSDP)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {a: (mesh_config[a] if mesh_config is not None and a in mesh_config else
                 (-1 if a == "fsdp" else 1)) for a in MESH_AXES}
    shape = mesh_shape(sizes, len(devices))
    try:  # a topology-aware order on real hardware (ICI rings on TPU)
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - simulated devices / odd shapes: plain order is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def parse_rules(rules: str | Sequence[tuple[str, str | None]] | None) -> dict[str, str | None]:
    """``"embed=fsdp,mlp=tensor"`` (or pairs) -> {'embed': 'fsdp', 'mlp': 'tensor'}."""
    if rules is None:
        rules = DEFAULT_RULES
    pairs = []
    if isinstance(rules, str):
        for part in rules.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, axis = part.partition("=")
            if not sep:
                raise MeshError(f"Sharding rule {part!r} must look like logical=mesh_axis "
                                "(e.g. embed=fsdp); use logical=none to replicate.")
            pairs.append((name.strip(), axis.strip()))
    else:
        pairs = list(rules)
    out = {}
    for name, axis in pairs:
        axis = None if axis in (None, "", "none", "None") else axis
        if axis is not None and axis not in MESH_AXES:
            raise MeshError(f"Sharding rule {name}={axis}: {axis!r} is not a mesh axis; "
                            f"use one of {MESH_AXES} or none.")
        out[name] = axis
    return out


# --------------------------------------------------------------------------------------------
# Parameter and optimizer-state shardings
# --------------------------------------------------------------------------------------------

def physical_spec(logical_spec: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                  rules: dict[str, str | None], min_shard_bytes: int = 0,
                  itemsize: int = 4) -> P:
    """The mesh PartitionSpec of one leaf (see the module docstring for the procedure)."""
    shape = tuple(shape)
    if not shape or math.prod(shape) * itemsize < min_shard_bytes:
        return P()
    logical_spec = tuple(logical_spec or ()) + (None,) * (len(shape) - len(logical_spec or ()))
    out: list[str | None] = [None] * len(shape)
    used = set()
    for i, (name, size) in enumerate(zip(logical_spec, shape)):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
            continue
        out[i] = axis
        used.add(axis)
    n = mesh.shape["fsdp"]
    if n > 1 and "fsdp" not in used:
        free = [i for i in range(len(shape)) if out[i] is None and shape[i] % n == 0]
        if free:
            out[max(free, key=lambda i: shape[i])] = "fsdp"
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _logical_specs(abstract_state):
    """The logical names of each leaf of an nnx State (None where the Variable has none)."""
    return nnx.get_partition_spec(abstract_state)


def tree_shardings(abstract_tree, mesh: Mesh, rules: dict[str, str | None],
                   min_shard_bytes: int = 0):
    """NamedShardings for an nnx State of abstract parameters (logical names in metadata)."""
    specs = _logical_specs(abstract_tree)

    def one(x, spec):
        return NamedSharding(mesh, physical_spec(tuple(spec) if spec is not None else (),
                                                 x.shape, mesh, rules, min_shard_bytes,
                                                 np.dtype(x.dtype).itemsize))

    return jax.tree.map(one, abstract_tree, specs,
                        is_leaf=lambda s: isinstance(s, P) or s is None)


def mirror_shardings(abstract_tree, param_tree, param_shardings, mesh: Mesh):
    """Shardings for a tree whose slots mirror the parameters (optimizer state, EMA): a leaf whose
    path ends with a parameter's path and has its shape gets that parameter's sharding; other
    leaves are replicated."""
    by_path = {}
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(param_tree),
                            jax.tree.leaves(param_shardings)):
        by_path[tuple(path)] = (tuple(x.shape), s)
    replicated = NamedSharding(mesh, P())

    def one(path, x):
        path = tuple(path)
        for i in range(len(path)):
            hit = by_path.get(path[i:])
            if hit is not None and hit[0] == tuple(np.shape(x)):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def replicated(tree, mesh: Mesh):
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over ('data', 'fsdp'); everything else of a batch array unsplit."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def bytes_per_device(tree) -> dict[Any, int]:
    """{device: bytes of ``tree``'s shards resident on it} (for tests and the startup log)."""
    out: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def describe(abstract_params, shardings, limit: int = 12) -> list[str]:
    """Lines 'path shape -> spec' of the largest leaves, for the startup log."""
    rows = []
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                            jax.tree.leaves(shardings)):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path
                        if getattr(k, "name", None) != "value")
        rows.append((math.prod(x.shape), f"{name} {tuple(x.shape)} -> {s.spec}"))
    rows.sort(key=lambda r: -r[0])
    return [r[1] for r in rows[:limit]]
