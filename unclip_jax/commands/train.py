"""``unclip-jax train``: run (or resume) a training run of any stage.

    unclip-jax train --config configs/diffusion_prior.py:runlocal --workdir runs/prior
    unclip-jax train --config configs/decoder.py:size=karlo --workdir gs://.../decoder \
        --config.batch_size=512 --config.model.dtype=bfloat16

Rerunning the same command resumes from the workdir's latest checkpoint. Multi-host: every
process runs the same command with --coordinator-address / --num-processes / --process-id (or
the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID or SLURM_* variables); see
launch/README.md.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="Train a stage (clip, priors, decoder, upsampler) from a config.",
        description="Train the stage a config names, writing checkpoints, TensorBoard scalars and "
        "sample grids to --workdir. Rerun the same command to resume. SIGTERM saves a checkpoint "
        "and exits 0; a NaN/Inf loss stops the run with status 2 and leaves the last good "
        "checkpoint untouched.",
        epilog="Config fields can be overridden with --config.KEY=VALUE.")
    p.add_argument("--config", required=True, help="Config file[:arg], e.g. "
                   "configs/diffusion_prior.py:runlocal.")
    p.add_argument("--workdir", required=True, help="Folder for checkpoints and logs.")
    p.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="Multi-process: address of process 0's coordinator "
                   "(default: $JAX_COORDINATOR_ADDRESS, or derived under SLURM).")
    p.add_argument("--num-processes", type=int, default=None,
                   help="Multi-process: number of processes (default: $JAX_NUM_PROCESSES, "
                   "$SLURM_NTASKS, or 1).")
    p.add_argument("--process-id", type=int, default=None,
                   help="Multi-process: this process's index (default: $JAX_PROCESS_ID, "
                   "$SLURM_PROCID, or 0).")
    p.add_argument("--local-device-ids", default=None, metavar="0,1,...",
                   help="Multi-process GPU: the local devices this process uses.")
    p.add_argument("--no-progress", action="store_true", help="No tqdm progress bar.")
    p.set_defaults(func=run)
    return p


def run(args, overrides) -> int:
    from unclip_jax.config import load_config
    from unclip_jax.train import distributed
    settings = distributed.resolve(args.coordinator_address, args.num_processes,
                                   args.process_id, args.local_device_ids)
    config = load_config(args.config, overrides)   # a bad config fails before any start-up
    from unclip_jax.train.checks import check_config, check_workdir
    check_config(config)                           # ... and so does any setting, or the workdir
    check_workdir(args.workdir)
    mesh = config.get("mesh") or {}
    note = distributed.set_cpu_devices(distributed.cpu_device_count(
        int(mesh.get("cpu_devices", 0)), int(config.batch_size),
        int((config.get("optimizer") or {}).get("accum_steps", 1)), mesh,
        max(settings.num_processes, 1)))
    if note:
        print(note)
    distributed.initialize(settings)
    from unclip_jax.train.trainer import train
    train(config, args.workdir, progress=not args.no_progress)
    return 0
