"""Training memory per device with FSDP: parameters + optimizer state (+ EMA) over 1, 2, 4, 8 devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        .venv/bin/python benchmarks/memory.py [--configs decoder:karlo,upsampler:paper_1024,...]

For every stage config (``configs/<stage>.py:size=<size>``) the trainer's own setup is built
abstractly (``unclip_jax.train.trainer.build_setup``: ``nnx.eval_shape``, nothing allocated), its
shardings are taken from ``trainer.state_shardings`` on a mesh of ``fsdp`` = 1, 2, 4, 8 devices
(the default FSDP rules of ``unclip_jax.train.sharding``), and the bytes each device would hold
are added up from every leaf's shard shape. The table shows the largest per-device total and its
ratio to the one-device total (ideal: 1/n). Activations are not counted (they depend on batch,
remat and resolution).

``--check`` also creates the state of the smallest config for real (jit with out_shardings) on
8 devices and compares the measured resident bytes per device with the computed ones.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from common import preamble, table  # noqa: E402  (benchmarks/common.py; puts the repo on sys.path)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from unclip_jax.config import load_config  # noqa: E402
from unclip_jax.models.layers import plain_tracer_errors  # noqa: E402
from unclip_jax.train import sharding as shard_lib  # noqa: E402
from unclip_jax.train import trainer  # noqa: E402

DEFAULT = ("diffusion_prior:karlo", "decoder:karlo", "upsampler:karlo", "diffusion_prior:paper",
           "decoder:paper", "upsampler:paper_256", "upsampler:paper_1024")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def per_device_bytes(abstract: dict, shardings: dict) -> tuple[int, int]:
    """(largest per-device bytes, total bytes) of a train-state dict under ``shardings``."""
    per_device: dict = {}
    total = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        nbytes = np.dtype(x.dtype).itemsize
        total += math.prod(x.shape) * nbytes
        shard = math.prod(s.shard_shape(x.shape)) * nbytes
        for d in s.device_set:
            per_device[d] = per_device.get(d, 0) + shard
    return max(per_device.values()), total


def mesh_of(n: int):
    return shard_lib.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, devices=jax.devices()[:n])


def gib(b: int) -> str:
    return f"{b / 2**30:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(DEFAULT),
                    help="comma list of STAGE:SIZE (configs/STAGE.py:size=SIZE)")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--check", action="store_true", help="also allocate a tiny state for real")
    args = ap.parse_args(argv)
    preamble("training memory per device with FSDP (parameters + optimizer state + EMA)")
    counts = [int(n) for n in args.devices.split(",")]
    if max(counts) > len(jax.devices()):
        raise SystemExit(f"need {max(counts)} devices, have {len(jax.devices())}: set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=8 on CPU")
    rows = []
    for entry in args.configs.split(","):
        stage, size = entry.split(":")
        if True:
            cfg = load_config(os.path.join(CONFIGS, f"{stage}.py:size={size}"), [])
            setup = trainer.build_setup(cfg)
            abstract = setup["abstract"]
            n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract["params"]))
            line = [f"{stage}:{size}", f"{n_params / 1e6:.0f}M"]
            base = None
            for n in counts:
                sh = trainer.state_shardings(abstract, mesh_of(n), cfg.mesh.get("rules", None)
                                             if "mesh" in cfg else None)
                largest, total = per_device_bytes(abstract, sh)
                base = base or total
                line.append(f"{gib(largest)} ({largest / total:.3f})")
            line.append(gib(base))
            rows.append(line)
    print(table(["config", "params"] + [f"{n} dev GiB (frac)" for n in counts] + ["total GiB"],
                rows))
    print("\nstate = params + AdamW (mu, nu) + EMA where the stage keeps one, float32; "
          "(frac) = largest device / one-device total, ideal 1/n")

    if args.check:
        cfg = load_config(os.path.join(CONFIGS, "decoder.py:runlocal"), [])
        setup = trainer.build_setup(cfg)
        mesh = mesh_of(8)
        sh = trainer.state_shardings(setup["abstract"], mesh)
        with plain_tracer_errors():
            state = jax.jit(setup["init_fn"], out_shardings=sh)()
        measured = max(shard_lib.bytes_per_device(state).values())
        computed, total = per_device_bytes(setup["abstract"], sh)
        print(f"\ncheck (decoder runlocal, 8 devices): measured {measured} B/device, computed "
              f"{computed} B/device, total {total} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
