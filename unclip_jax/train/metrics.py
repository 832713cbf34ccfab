"""Training metrics: TensorBoard event files, a JSON-lines log, PNG sample grids, FLOP counts.

Only process 0 writes (``MetricWriter(active=False)`` does nothing elsewhere). Scalars go to
``WORKDIR/tensorboard`` (TensorBoard's own event writer: no TensorFlow import) and one JSON object
per logging step to ``WORKDIR/metrics.jsonl`` (easy to read in tests and notebooks). Images go to
``WORKDIR/samples/<tag>_<step>.png`` and to TensorBoard.

:func:`compiled_flops` reads the FLOPs of one compiled step from XLA's cost analysis; under SPMD
that is the FLOPs of one device's program, so TFLOP/s per device = flops / step time.
"""
from __future__ import annotations

import io
import json
import os
import time
from typing import Any, Mapping

import numpy as np


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


def _avoid_tensorflow_import(workdir: str) -> None:
    """TensorBoard's writer imports TensorFlow (seconds) just for its file layer unless
    ``tensorboard.compat.notf`` exists; for a local workdir its own stub is enough. Remote
    workdirs (gs://...) keep TensorFlow's gfile."""
    import sys
    import types
    if "://" not in workdir and "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


class MetricWriter:
    def __init__(self, workdir: str, active: bool = True):
        self.active = active
        self.workdir = workdir
        self._tb = None
        self._jsonl = None
        if not active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            _avoid_tensorflow_import(workdir)
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            self._tb = EventFileWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            self._tb = None

    def _event(self, step: int, summary) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps(dict(values, step=int(step))) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary
            self._event(step, Summary(value=[Summary.Value(tag=k, simple_value=v)
                                             for k, v in values.items()]))

    def image(self, step: int, tag: str, grid_uint8: np.ndarray) -> str | None:
        """Write a [H, W, 3] uint8 grid as PNG (file and TensorBoard); returns the file path."""
        if not self.active:
            return None
        from PIL import Image
        folder = os.path.join(self.workdir, "samples")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{tag}_{int(step):08d}.png")
        Image.fromarray(grid_uint8).save(path)
        if self._tb is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary
            buf = io.BytesIO()
            Image.fromarray(grid_uint8).save(buf, format="PNG")
            img = Summary.Image(height=grid_uint8.shape[0], width=grid_uint8.shape[1],
                                colorspace=grid_uint8.shape[2], encoded_image_string=buf.getvalue())
            self._event(step, Summary(value=[Summary.Value(tag=tag, image=img)]))
        return path

    def text(self, message: str) -> None:
        if self.active:
            with open(os.path.join(self.workdir, "train.log"), "a", encoding="utf-8") as f:
                f.write(message + "\n")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
