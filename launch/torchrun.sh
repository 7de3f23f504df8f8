#!/usr/bin/env bash
# moe-lm under torchrun: one node, or one node of several (then run it on every node, e.g. through srun).
#
#   launch/torchrun.sh RECIPE [key=value ...]
#   NPROC_PER_NODE=2 launch/torchrun.sh recipes/quickstart.yaml parallel.ep_size=2 train.max_steps=20
#
# runs, on one node (a free port, chosen by torchrun's --standalone):
#   torchrun --standalone --nproc_per_node $NPROC_PER_NODE $(command -v moe-lm) train RECIPE [key=value ...]
# and with NNODES > 1 (the same line on every node; torchrun's c10d rendezvous assigns the node ranks):
#   torchrun --nnodes $NNODES --nproc_per_node $NPROC_PER_NODE --rdzv_backend c10d \
#            --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT --rdzv_id $RDZV_ID $(command -v moe-lm) train RECIPE ...
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  processes on this node [$SLURM_GPUS_ON_NODE, else the number of GPUs, else 1]
#   NNODES          nodes [1]
#   MASTER_ADDR     rendezvous host, reachable from every node [required when NNODES > 1]
#   MASTER_PORT     rendezvous port [29500; on one node: a free port unless MASTER_PORT is set]
#   RDZV_ID         job id shared by the nodes of one run [$SLURM_JOB_ID, else moe-lm]
#   RDZV_TIMEOUT    seconds to wait for all nodes to join the rendezvous [600]
#   OMP_NUM_THREADS, NCCL_*: see launch/common.sh
# Overrides are key=value words (never --options), so torchrun's prefix matching of options cannot take them.
# SIGUSR1 sent to this script reaches the trainer processes (checkpoint and exit); SIGTERM goes to torchrun.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

moe_lm_require_recipe "$#"
recipe=$1
shift
entrypoint=$(moe_lm_entrypoint)

NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(moe_lm_gpu_count)}}
[ "$NPROC_PER_NODE" -ge 1 ] 2>/dev/null || NPROC_PER_NODE=1
NNODES=${NNODES:-1}

if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_PORT:-}" ]; then
    rendezvous=(--standalone)
else
    if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
        echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (a host every node can reach)" >&2
        exit 2
    fi
    rendezvous=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
                --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-moe-lm}}" --rdzv_conf "join_timeout=${RDZV_TIMEOUT:-600}")
fi

echo "moe-lm launch: torchrun on ${HOSTNAME:-$(uname -n)} nnodes=$NNODES nproc_per_node=$NPROC_PER_NODE ${rendezvous[*]}" >&2
moe_lm_run trainers torchrun "${rendezvous[@]}" --nproc_per_node "$NPROC_PER_NODE" \
    "$entrypoint" train "$recipe" "$@"
