"""Training metrics: TensorBoard event files, a JSON-lines log, PNG sample grids, FLOP counts.

Only process 0 writes (``MetricWriter(active=False)`` does nothing elsewhere). Scalars go to
``WORKDIR/tensorboard`` (TensorBoard's own event writer: no TensorFlow import) and one JSON object
per logging step to ``WORKDIR/metrics.jsonl`` (easy to read in tests and notebooks). Images go to
``WORKDIR/samples/<tag>_<step>.png`` and to TensorBoard.

A remote WORKDIR (gs://...) is written through unclip_jax.io.paths, nothing on local disk:
object stores cannot append, so metrics.jsonl and train.log are rewritten whole after each
write (:class:`paths.AppendFile`) and TensorBoard events are framed in memory and written as
whole event files (:class:`RemoteEventWriter`, a new file every ``max_bytes``).

:func:`model_flops` counts the FLOPs of a step's jaxpr (2 x the multiply-adds of its matrix
products and convolutions; the trainer divides by the devices of the mesh for TFLOP/s per
device). :func:`compiled_flops` reads XLA's cost analysis of the compiled program instead: close
on CPU, but on GPU it leaves out the cuBLAS / cuDNN calls (7-26x too small on an H100, see
benchmarks/GPU_NOTES.md).
"""
from __future__ import annotations

import io
import json
import math
import os
import socket
import sys
import time
import types
from typing import Any, Mapping

import numpy as np
from PIL import Image

from unclip_jax.io import paths

# TensorBoard's writer imports TensorFlow (seconds) just for its file layer unless
# ``tensorboard.compat.notf`` exists: with TensorFlow not loaded, its own stub serves local files
# (remote logdirs are written by RemoteEventWriter through unclip_jax.io.paths).
if "tensorflow" not in sys.modules:
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
from tensorboard.compat.proto.event_pb2 import Event  # noqa: E402
from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: E402
from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: E402
from tensorboard.summary.writer.record_writer import RecordWriter  # noqa: E402


def model_flops(jaxpr) -> float:
    """2 x the multiply-adds of every ``dot_general`` and ``conv_general_dilated`` of a (closed)
    jaxpr, nested jaxprs included (a scan's body times its length, a cond's costliest branch,
    a while loop's body once): the model FLOPs that MFU counts. Elementwise work, reductions
    and the optimizer's update are left out (well under 1% of a UNet's step)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
            (_, rc), (_, rb) = eqn.params["dimension_numbers"]
            free = [d for i, d in enumerate(rhs) if i not in set(rc) | set(rb)]
            total += 2.0 * math.prod(lhs) * math.prod(free)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out = eqn.outvars[0].aval.shape
            out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
            dilated = math.prod(eqn.params["lhs_dilation"])  # a strided conv's input grad:
            total += 2.0 * math.prod(out) * math.prod(rhs) / rhs[out_feature] / dilated  # 1/d^2
        values = [x for v in eqn.params.values()
                  for x in (v if isinstance(v, (list, tuple)) else [v])]
        subs = [x for x in values  # Jaxpr or ClosedJaxpr (pjit, scan, cond, remat, ...)
                if hasattr(x, "eqns") or hasattr(getattr(x, "jaxpr", None), "eqns")]
        if not subs:
            continue
        counts = [model_flops(v) for v in subs]
        if name == "cond":
            total += max(counts)
        elif name == "scan":
            total += eqn.params["length"] * sum(counts)
        else:
            total += sum(counts)
    return total


def compiled_flops(compiled) -> float | None:
    """FLOPs of a compiled jax function (``jit(f).lower(...).compile()``), or None if unknown."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops is not None and flops > 0 else None


class RemoteEventWriter:
    """TensorBoard events for a remote logdir: records framed in memory (TensorBoard's
    RecordWriter) and the event file written whole through unclip_jax.io.paths on ``flush()``;
    past ``max_bytes`` the next events go to a new file (TensorBoard reads every file of the
    folder)."""

    def __init__(self, logdir: str, max_bytes: int = 8 << 20):
        self.logdir, self.max_bytes = logdir, max_bytes
        self._index = 0
        self._start_file()

    def _start_file(self) -> None:
        self._name = paths.join(self.logdir, "events.out.tfevents.%010d.%s.%s.%s" % (
            time.time(), socket.gethostname(), os.getpid(), self._index))
        self._buffer = io.BytesIO()
        self._records = RecordWriter(self._buffer)
        self.add_event(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add_event(self, event) -> None:
        self._records.write(event.SerializeToString())
        self._dirty = True

    def flush(self) -> None:
        if not self._dirty:
            return
        paths.write_bytes(self._name, self._buffer.getvalue())
        self._dirty = False
        if self._buffer.tell() > self.max_bytes:
            self._index += 1
            self._start_file()
            self._dirty = False   # an empty file is written with its first event

    def close(self) -> None:
        self.flush()


class MetricWriter:
    def __init__(self, workdir: str, active: bool = True):
        self.active = active
        self.workdir = paths.check(workdir)
        self._tb = None
        self._jsonl = None
        self._log = None
        self._closed = False
        if not active:
            return
        paths.makedirs(workdir)
        self._jsonl = paths.AppendFile(paths.join(workdir, "metrics.jsonl"))
        logdir = paths.join(workdir, "tensorboard")
        if paths.is_remote(workdir):
            self._tb = RemoteEventWriter(logdir)
            return
        self._tb = EventFileWriter(logdir)

    def _event(self, step: int, summary) -> None:
        self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps(dict(values, step=int(step))) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._event(step, Summary(value=[Summary.Value(tag=k, simple_value=v)
                                             for k, v in values.items()]))
            self._flush_remote_events()

    def image(self, step: int, tag: str, grid_uint8: np.ndarray) -> str | None:
        """Write a [H, W, 3] uint8 grid as PNG (file and TensorBoard); returns the file path."""
        if not self.active:
            return None
        folder = paths.join(self.workdir, "samples")
        paths.makedirs(folder)
        path = paths.join(folder, f"{tag}_{int(step):08d}.png")
        buf = io.BytesIO()
        Image.fromarray(grid_uint8).save(buf, format="PNG")
        paths.write_bytes(path, buf.getvalue())
        if self._tb is not None:
            img = Summary.Image(height=grid_uint8.shape[0], width=grid_uint8.shape[1],
                                colorspace=grid_uint8.shape[2], encoded_image_string=buf.getvalue())
            self._event(step, Summary(value=[Summary.Value(tag=tag, image=img)]))
            self._flush_remote_events()
        return path

    def _flush_remote_events(self) -> None:
        if isinstance(self._tb, RemoteEventWriter):
            self._tb.flush()

    def text(self, message: str) -> None:
        if not self.active:
            return
        log = self._log or paths.AppendFile(paths.join(self.workdir, "train.log"))
        log.write(message + "\n")
        if self._closed:   # a last line after close()
            log.close()
        else:
            self._log = log
            log.flush()

    def close(self) -> None:
        self._closed = True
        for name in ("_jsonl", "_log", "_tb"):
            if getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)


def read_jsonl(workdir: str) -> list[dict]:
    path = paths.join(workdir, "metrics.jsonl")
    if not paths.exists(path):
        return []
    with paths.open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
