"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the environment.

Where each setting comes from, first match wins:

  coordinator address   --coordinator-address, $JAX_COORDINATOR_ADDRESS, else (under SLURM)
                        the first host of $SLURM_STEP_NODELIST / $SLURM_JOB_NODELIST with port
                        $JAX_COORDINATOR_PORT (default 12345)
  number of processes   --num-processes, $JAX_NUM_PROCESSES, $SLURM_NTASKS, else 1
  this process's id     --process-id, $JAX_PROCESS_ID, $SLURM_PROCID, else 0

With one process nothing is initialised. On CPU (tests, ``launch/local.py``) the cross-process
collectives use gloo, which must be chosen before JAX creates its backend. TPU pods need no
flags: with ``JAX_AUTO_DISTRIBUTED=1`` (launch/tpu_pod.sh sets it) ``jax.distributed.initialize()``
finds everything itself.

CPU device count (``mesh.cpu_devices`` of a training config, :func:`cpu_device_count`): on a CPU
host, XLA runs some large convolutions on one thread (jaxlib 0.10's YNNPACK: those with 64
output channels at 32x32 and most 1x1 ones; ``benchmarks/conv_cpu.py`` shows it), so a process
with one CPU device leaves the other cores idle through much of a UNet's step. Several CPU
devices in the process, each with its slice of the batch, run those convolutions side by side:
with ``cpu_devices=-1`` (one device per usable core) the Shapes decoder trains 1.31x faster on
two cores (``benchmarks/cpu_devices.py``), and two runs of it still agree bitwise. It must be
settled before JAX creates its CPU backend, so the ``train`` command applies it before anything
else touches JAX. The
environment wins over the config: ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` or
``JAX_NUM_CPU_DEVICES`` (the test suite's 8 simulated devices) is left as it is. The setting
only shapes the CPU backend, so it does nothing where a GPU or TPU does the work.
"""
from __future__ import annotations

import dataclasses
import os
import re

import jax

from unclip_jax.errors import UserError
from unclip_jax.train.sharding import MESH_AXES, MeshError, mesh_shape


class DistributedError(UserError, ValueError):
    """Inconsistent multi-process settings."""


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    coordinator_address: str | None
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None
    auto: bool = False       # let jax find everything (TPU pods, supported clusters)


def _first_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[003-005,007],cpu01' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{what} must be an integer, got {value!r}.") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: str | None = None,
            env: dict | None = None) -> ProcessSettings:
    """The settings for this process (see the module docstring for the order)."""
    env = os.environ if env is None else env
    if env.get("JAX_AUTO_DISTRIBUTED") == "1" and num_processes is None:
        return ProcessSettings(None, 0, 0, auto=True)   # TPU pods: jax finds everything
    n = num_processes if num_processes is not None else (
        env.get("JAX_NUM_PROCESSES") or env.get("SLURM_NTASKS") or 1)
    n = _int(n, "The number of processes")
    pid = process_id if process_id is not None else (
        env.get("JAX_PROCESS_ID") or env.get("SLURM_PROCID") or 0)
    pid = _int(pid, "The process id")
    addr = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if not addr and n > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if nodelist:
            addr = f"{_first_host(nodelist)}:{env.get('JAX_COORDINATOR_PORT', '12345')}"
    ids = None
    if local_device_ids:
        ids = tuple(_int(i, "--local-device-ids") for i in str(local_device_ids).split(",") if i)
    if n < 1:
        raise DistributedError(f"The number of processes must be at least 1, got {n}; pass "
                               "--num-processes N (1 for a single process).")
    if not 0 <= pid < n:
        raise DistributedError(f"Process id {pid} is not in [0, {n}): pass --process-id between "
                               "0 and --num-processes - 1.")
    if n > 1 and not addr:
        raise DistributedError(f"{n} processes need a coordinator: pass --coordinator-address "
                               "HOST:PORT (the same for every process) or set "
                               "JAX_COORDINATOR_ADDRESS.")
    return ProcessSettings(addr, n, pid, ids)


def initialize(settings: ProcessSettings) -> None:
    """Start the distributed runtime when there is more than one process. Call it before any
    other JAX call (it must precede backend creation)."""
    if settings.auto:
        jax.distributed.initialize()
        return
    if settings.num_processes <= 1:
        return
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=settings.coordinator_address,
                               num_processes=settings.num_processes,
                               process_id=settings.process_id,
                               local_device_ids=list(settings.local_device_ids)
                               if settings.local_device_ids else None)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def cpu_device_count(requested: int, batch_size: int, accum_steps: int = 1,
                     mesh_sizes: dict | None = None, num_processes: int = 1,
                     cores: int | None = None) -> int | None:
    """The CPU devices this process should have for ``mesh.cpu_devices = requested``: None for 0
    (JAX's own default, one device); ``requested`` itself when positive; for -1, the largest
    count up to the usable cores for which the mesh (the axis sizes in ``mesh_sizes``, e.g. the
    config's ``mesh`` group; over every process's devices) can be built and splits
    ``batch_size`` into ``accum_steps`` microbatches."""
    if requested == 0:
        return None
    if requested > 0:
        return requested
    sizes = {a: (mesh_sizes or {}).get(a, -1 if a == "fsdp" else 1) for a in MESH_AXES}
    for n in range(cores or usable_cores(), 0, -1):
        try:
            data, fsdp, _ = mesh_shape(sizes, n * num_processes)
        except MeshError:
            continue
        if batch_size % (data * fsdp * accum_steps) == 0:
            return n
    return 1


def environment_fixes_cpu_devices(env: dict | None = None) -> str | None:
    """The environment setting that already fixes the CPU device count, if any."""
    env = os.environ if env is None else env
    if "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", ""):
        return "XLA_FLAGS' --xla_force_host_platform_device_count"
    if env.get("JAX_NUM_CPU_DEVICES"):
        return "JAX_NUM_CPU_DEVICES"
    return None


def set_cpu_devices(count: int | None, env: dict | None = None) -> str | None:
    """Ask JAX for ``count`` CPU devices (None: leave JAX's default). Returns a line saying why
    it was not done, or None when it was (or nothing was asked). Call it before any other JAX
    call: once the backend exists the count cannot change."""
    if count is None:
        return None
    fixed = environment_fixes_cpu_devices(env)
    if fixed:
        return f"mesh.cpu_devices asks for {count} CPU device(s); {fixed} decides instead."
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError:
        return (f"mesh.cpu_devices asks for {count} CPU device(s), but JAX had already started "
                "its backend in this process, so it keeps the devices it has.")
    return None
