#!/usr/bin/env bash
# Train on several machines through DeepSpeed's launcher (pdsh over passwordless ssh).
#
#   launch/multi_node.sh HOSTFILE CONFIG [key=value ...]
#   launch/multi_node.sh launch/hostfile.example configs/hybrid-500m.yaml train.zero_stage=2
#
# HOSTFILE lists one machine per line as "hostname slots=GPUS" (see launch/hostfile.example);
# the first host is the rendezvous (MASTER_ADDR). Every machine needs this repository and its
# Python environment at the same path, and out_dir / data.prepared_dir on a shared filesystem
# (rank 0 prepares the data and writes checkpoints; every rank writes its RNG state beside them).
# The variables of launch/env.sh reach the remote ranks through a DeepSpeed env file.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,13p' "$0"; exit 2; fi
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
hostfile=$1; shift
master_addr=${MASTER_ADDR:-$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1; exit}')}
# DeepSpeed forwards NCCL_* and PYTHON* by itself; the rest goes through this file.
export DS_ENV_FILE="$(mktemp /tmp/hybridlm-ds-env.XXXXXX)"
trap 'rm -f "$DS_ENV_FILE"' EXIT
env | grep -E '^(CUDA_DEVICE_MAX_CONNECTIONS|PYTORCH_CUDA_ALLOC_CONF|TORCH_NCCL_ASYNC_ERROR_HANDLING|TOKENIZERS_PARALLELISM|OMP_NUM_THREADS|WANDB_[A-Z_]*)=' >"$DS_ENV_FILE"
deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}" \
  "$here/../train.py" "$@"
