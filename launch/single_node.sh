#!/usr/bin/env bash
# Train on the GPUs of one machine through DeepSpeed's launcher.
#
#   launch/single_node.sh NUM_GPUS CONFIG [key=value ...]
#   launch/single_node.sh 8 configs/hybrid-500m.yaml train.zero_stage=2
#
# One process per GPU; the global batch is micro_batch_size * grad_accum * NUM_GPUS sequences.
# Restart the same command with resume=auto after a preemption. On a machine without GPUs
# (tests, debugging) DS_ACCELERATOR=cpu runs the ranks on CPU over gloo.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,10p' "$0"; exit 2; fi
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
num_gpus=$1; shift
exec deepspeed --num_gpus "$num_gpus" --master_port "${MASTER_PORT:-29500}" "$here/../train.py" "$@"
