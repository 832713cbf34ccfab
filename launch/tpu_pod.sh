#!/usr/bin/env bash
# Run `unclip-jax train` on every worker of a Cloud TPU pod slice (one process per host).
#   launch/tpu_pod.sh TPU_NAME ZONE --config configs/decoder.py:size=karlo --workdir gs://BUCKET/runs/decoder
# Every worker needs the repository in $REPO_DIR, installed with TPU jax (README, Install):
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all \
#     --command "git clone URL ~/unclip-jax && cd ~/unclip-jax && make install EXTRAS=tpu,train"
# which builds $REPO_DIR/.venv (UNCLIP_PYTHON names another interpreter). JAX_AUTO_DISTRIBUTED=1
# makes the trainer call jax.distributed.initialize() with no arguments: on TPU VMs JAX finds
# the coordinator and the process ids itself. Rerun the same command to resume.
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; shift 2
REPO_DIR=${REPO_DIR:-\~/unclip-jax}
PY=${UNCLIP_PYTHON:-.venv/bin/python}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && JAX_AUTO_DISTRIBUTED=1 $PY -m unclip_jax.cli train $ARGS --no-progress"
