#!/usr/bin/env bash
# moe-lm under DeepSpeed's launcher: this node, or the nodes of a hostfile (started over ssh by pdsh).
#
#   launch/deepspeed.sh RECIPE [key=value ...]
#   NUM_GPUS=2 launch/deepspeed.sh recipes/quickstart.yaml parallel.ep_size=2 train.max_steps=20
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh recipes/1.3b_e16.yaml parallel.ep_size=8
#
# runs
#   deepspeed [--hostfile $HOSTFILE] --num_gpus $NUM_GPUS --master_port $MASTER_PORT \
#             $(command -v moe-lm) train RECIPE [key=value ...]
# The launcher appends --local_rank=N to each process's arguments (moe-lm ignores it: the rank comes from the
# RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT environment it also sets). On a CPU-only machine
# --num_gpus is the number of processes (CUDA_VISIBLE_DEVICES=0,1,... is set but unused).
#
# Environment (defaults in brackets):
#   NUM_GPUS     processes per node [the number of GPUs, else 1]
#   HOSTFILE     "host slots=N" lines (see launch/hostfile.example) [none: this node only]
#   MASTER_PORT  port on the first host [29500]
#   OMP_NUM_THREADS, NCCL_*: see launch/common.sh. The launcher does not set OMP_NUM_THREADS (torchrun does):
#   this script exports 1 unless it is set. Remote nodes of a hostfile only get variables named in a
#   .deepspeed_env file (KEY=VALUE lines, in the current or home directory) or starting with NCCL, PYTHON, UCX...
# SIGUSR1 sent to this script reaches the trainer processes on this node; SIGTERM goes to the launcher.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

moe_lm_require_recipe "$#"
recipe=$1
shift
entrypoint=$(moe_lm_entrypoint)

NUM_GPUS=${NUM_GPUS:-$(moe_lm_gpu_count)}
[ "$NUM_GPUS" -ge 1 ] 2>/dev/null || NUM_GPUS=1
launcher=(deepspeed)
if [ -n "${HOSTFILE:-}" ]; then
    launcher+=(--hostfile "$HOSTFILE")
fi
launcher+=(--num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}")

echo "moe-lm launch: ${launcher[*]} (OMP_NUM_THREADS=$OMP_NUM_THREADS)" >&2
moe_lm_run trainers "${launcher[@]}" "$entrypoint" train "$recipe" "$@"
