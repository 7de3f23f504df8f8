# shellcheck shell=bash
# Sourced by the moe-lm launch scripts (not run on its own): environment defaults and the signal wiring.
#
# Preemption: SLURM sends SIGUSR1 120 s before the time limit (`#SBATCH --signal=B:USR1@120`) to the batch
# script only. The trainer must get it: on SIGUSR1 (or SIGTERM) it checkpoints at the next step boundary on every
# rank and exits (moe_lm/train/faults.py). Neither torchrun nor DeepSpeed's launcher handles SIGUSR1 (its default
# action kills them, and torchrun starts its workers in their own sessions, out of reach of a process-group
# signal), so the scripts start the launcher with SIGUSR1 *ignored* (the trainer processes inherit that and
# install their own handler, so they still get it) and forward every SIGUSR1 they receive to the trainer
# processes below the launcher. SIGTERM/SIGINT go to the launcher, which passes them on to its workers.

# ---- environment defaults: export a value before calling a script to override it ----
# torchrun sets OMP_NUM_THREADS=1 for its workers, DeepSpeed's launcher does not: several ranks x all cores
# oversubscribe the CPU (on a GPU node, set it to cores / ranks per node).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# NCCL (GPU clusters): uncomment what your fabric needs.
# export NCCL_DEBUG=WARN                   # INFO to see the rings/trees and the interfaces NCCL picked
# export NCCL_SOCKET_IFNAME=ib0            # the interface the nodes reach each other on (bootstrap + socket)
# export NCCL_IB_HCA=mlx5                  # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1                 # no InfiniBand: TCP sockets only
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed or stuck collective ends the process instead of a hang

# Exit with the calling script's usage unless it got a recipe: moe_lm_require_recipe "$#".
moe_lm_require_recipe() {
    if [ "$1" -lt 1 ]; then
        echo "usage: launch/$(basename "$0") RECIPE [key=value ...]" >&2
        exit 2
    fi
}

# The `moe-lm` console script (installed by `pip install -e .`; activate the venv first).
moe_lm_entrypoint() {
    command -v moe-lm || { echo "moe-lm launch: moe-lm is not on PATH (activate the venv: . .venv/bin/activate)" >&2
                           return 1; }
}

# Number of NVIDIA GPUs on this node (0 without nvidia-smi).
moe_lm_gpu_count() {
    local n
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    echo "${n:-0}"
}

# PIDs of the processes below $1 that run moe-lm (the trainers; launcher layers in between ignore SIGUSR1).
moe_lm_trainer_pids() {
    local child
    for child in $(pgrep -P "$1" 2>/dev/null || true); do
        case "$(ps -o args= -p "$child" 2>/dev/null || true)" in
            *moe-lm*|*moe_lm*) echo "$child" ;;
        esac
        moe_lm_trainer_pids "$child"
    done
}

_moe_lm_on_usr1() {
    MOE_LM_GOT_USR1=1
    _moe_lm_interrupted=1
    local targets
    if [ "$_moe_lm_mode" = trainers ]; then
        targets=$(moe_lm_trainer_pids "$MOE_LM_CHILD_PID" | tr '\n' ' ')
    else
        targets=$MOE_LM_CHILD_PID
    fi
    echo "moe-lm launch: SIGUSR1 -> ${targets:-no trainer process yet}" >&2
    # shellcheck disable=SC2086
    [ -z "$targets" ] || kill -USR1 $targets 2>/dev/null || true
}

_moe_lm_on_stop() {
    _moe_lm_interrupted=1
    echo "moe-lm launch: SIG$1 -> $MOE_LM_CHILD_PID" >&2
    kill -"$1" "$MOE_LM_CHILD_PID" 2>/dev/null || true
}

# moe_lm_run MODE CMD [ARGS...]: run CMD in the background, pass signals on, return CMD's exit status.
#   MODE=trainers: CMD is a launcher (torchrun, deepspeed); it starts with SIGUSR1 ignored, and each SIGUSR1
#                  received here goes to the moe-lm processes below it.
#   MODE=child:    CMD is a script or srun that forwards signals itself; each SIGUSR1 goes to CMD.
# SIGTERM and SIGINT go to CMD in both modes. Sets MOE_LM_GOT_USR1=1 once a SIGUSR1 arrived.
moe_lm_run() {
    _moe_lm_mode=$1
    shift
    # shellcheck disable=SC2034  # read by the scripts that source this file
    MOE_LM_GOT_USR1=0
    if [ "$_moe_lm_mode" = trainers ]; then
        ( trap '' USR1; exec "$@" ) &
    else
        "$@" &
    fi
    MOE_LM_CHILD_PID=$!
    trap _moe_lm_on_usr1 USR1
    trap '_moe_lm_on_stop TERM' TERM
    trap '_moe_lm_on_stop INT' INT
    local status
    while :; do
        _moe_lm_interrupted=0
        status=0
        wait "$MOE_LM_CHILD_PID" || status=$?
        # a trapped signal interrupts `wait` (status > 128) while CMD still runs: wait again
        [ "$_moe_lm_interrupted" = 1 ] && [ "$status" -gt 128 ] && continue
        break
    done
    trap - USR1 TERM INT
    return "$status"
}
