#!/usr/bin/env bash
# One process per GPU under SLURM; the trainer reads SLURM_NTASKS / SLURM_PROCID and derives the
# coordinator (first node of the step, port $JAX_COORDINATOR_PORT, default 12345).
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm.sh \
#       --config configs/decoder.py:size=karlo --workdir /shared/runs/decoder
# Submit from the repository root after `make install EXTRAS=cuda12,train` (README, Install): the
# job runs .venv/bin/python there (UNCLIP_PYTHON names another interpreter).
#SBATCH --job-name=unclip-jax
#SBATCH --signal=TERM@120   # SIGTERM two minutes before the time limit: checkpoint and exit 0
set -euo pipefail
export JAX_COORDINATOR_PORT=${JAX_COORDINATOR_PORT:-12345}
export UNCLIP_PYTHON=${UNCLIP_PYTHON:-.venv/bin/python}
srun --kill-on-bad-exit=1 bash -c \
  '"$UNCLIP_PYTHON" -m unclip_jax.cli train "$@" --local-device-ids "$SLURM_LOCALID" --no-progress' _ "$@"
