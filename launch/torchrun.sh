#!/usr/bin/env bash
# Train through torchrun instead of DeepSpeed's launcher (same train.py; DeepSpeed is still the engine).
#
#   one machine:  launch/torchrun.sh NUM_GPUS CONFIG [key=value ...]
#   N machines:   NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 launch/torchrun.sh 8 CONFIG ...   (on node001)
#                 NNODES=2 NODE_RANK=1 MASTER_ADDR=node001 launch/torchrun.sh 8 CONFIG ...   (on node002)
#
# torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each of the
# NUM_GPUS processes it starts per machine; train.py joins that process group.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,10p' "$0"; exit 2; fi
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
nproc=$1; shift
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$nproc" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  "$here/../train.py" "$@"
