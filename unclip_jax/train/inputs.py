"""The trainer's input: per-process NumPy batches, then global (sharded) jax arrays.

``config.input.kind``:
  'synthetic_prior'  the caption -> z_i task of :mod:`unclip_jax.data.synthetic_embeddings`.
                     Global batch ``i`` is drawn from ``default_rng([seed, i])`` whatever the
                     number of processes, and process ``p`` of ``n`` takes rows
                     ``[p * B/n, (p+1) * B/n)``: one process with 8 devices and two with 4 see
                     the same global batch. Fields: num_concepts, dim, text_width,
                     context_length, task_seed.
  anything else      ``unclip_jax.data.input_pipeline.make_input(config.input, ...)`` (tf.data:
                     tfds / webdataset / TFRecords / precomputed embeddings), which returns an
                     iterator of per-process dict batches with ``.position`` and ``.counts()``.

Every iterator made here starts at a given global batch index (``start_batch``), which is how a
resumed run continues exactly where the checkpoint left off.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from unclip_jax.data.synthetic_embeddings import make_prior_task, sample_prior_batch
from unclip_jax.errors import UserError


class InputError(UserError, ValueError):
    """An input setting that cannot work (batch size, kind, missing keys)."""


class SyntheticPriorInput:
    """Deterministic batches of the synthetic prior task (see the module docstring)."""

    def __init__(self, cfg: Any, *, global_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, start_batch: int = 0):
        self.task = make_prior_task(num_concepts=cfg.get("num_concepts", 8), dim=cfg.get("dim", 32),
                                    text_width=cfg.get("text_width", 32),
                                    context_length=cfg.get("context_length", 8),
                                    seed=cfg.get("task_seed", 0))
        self.global_batch_size, self.seed = global_batch_size, seed
        self.rows = global_batch_size // process_count
        self.start = process_index * self.rows
        self.position = start_batch
        self._served = 0

    def global_batch(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        batch = sample_prior_batch(self.task, rng, self.global_batch_size)
        batch.pop("concept")
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.global_batch(self.position)
        self.position += 1
        self._served += 1
        return {k: v[self.start:self.start + self.rows] for k, v in batch.items()}

    def counts(self) -> dict[str, int]:
        return {"examples": self._served * self.rows, "skipped": 0}


def make_input(input_cfg: Any, *, global_batch_size: int, seed: int, process_index: int,
               process_count: int, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Per-process batches of ``global_batch_size // process_count`` rows from ``start_batch``."""
    if global_batch_size % process_count:
        raise InputError(f"batch_size {global_batch_size} does not split over {process_count} "
                         "processes; make it a multiple of the number of processes.")
    kind = input_cfg.get("kind", "synthetic_prior")
    if kind == "synthetic_prior":
        return SyntheticPriorInput(input_cfg, global_batch_size=global_batch_size, seed=seed,
                                   process_index=process_index, process_count=process_count,
                                   start_batch=start_batch)
    try:  # TensorFlow, imported only for the kinds that read with tf.data
        from unclip_jax.data import input_pipeline
    except ImportError as e:
        raise InputError(f"config.input.kind={kind!r} needs unclip_jax.data.input_pipeline, "
                         f"which cannot be imported ({e}); use kind='synthetic_prior' or install "
                         "the data pipeline.") from None
    return input_pipeline.make_input(input_cfg, global_batch_size=global_batch_size, seed=seed,
                                     process_index=process_index, process_count=process_count,
                                     start_batch=start_batch)


def select(batch: dict, keys: Sequence[str]) -> dict:
    """The arrays a stage needs, refusing a batch that lacks one."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise InputError(f"The input gives {sorted(batch)} but the stage needs {list(keys)} "
                         f"(missing {missing}); point config.input at data with those fields.")
    return {k: batch[k] for k in keys}


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """Per-process rows -> global jax arrays split as ``sharding`` (rows over the batch axes)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def host_global_batches(input_cfg: Any, *, global_batch_size: int, seed: int, count: int,
                        keys: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """``count`` whole global batches as NumPy on every process (for fits that every process
    must compute identically, e.g. the AR prior's PCA): local rows gathered across processes."""
    it = make_input(input_cfg, global_batch_size=global_batch_size, seed=seed,
                    process_index=jax.process_index(), process_count=jax.process_count())
    out = []
    for _ in range(count):
        b = select(next(it), keys)
        if jax.process_count() > 1:
            b = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                 for k, v in b.items()}
        out.append(b)
    return out
