#!/usr/bin/env bash
# Multi-node lorakit training on SLURM: one `accelerate launch` per node (srun), which starts one
# process per GPU; the nodes meet at the first node's address (torchrun's static rendezvous).
#
#   sbatch scripts/slurm_train.sh RECIPE [lorakit train options, e.g. --set train.lr=1e-4]
#   sbatch --nodes=4 --gpus-per-node=8 scripts/slurm_train.sh recipes/qlora-llama-3.1-8b.yaml
#
# Submit from the repository root on a filesystem every node sees: the recipe, its data and the run
# directory must be reachable at the same path everywhere. Only global rank 0 writes the run directory.
# The strategy comes from the accelerate config: DDP (default) or FSDP-QLoRA, e.g.
#   ACCELERATE_CONFIG=configs/accelerate-fsdp-qlora.yaml sbatch scripts/slurm_train.sh RECIPE
#
#SBATCH --job-name=lorakit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=lorakit-%j.log

set -euo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "slurm_train.sh: run it with sbatch (SLURM_JOB_ID is not set)" >&2
  exit 2
fi
if [[ $# -lt 1 ]]; then
  echo "usage: sbatch scripts/slurm_train.sh RECIPE [lorakit train options]" >&2
  exit 2
fi

export RECIPE="$1"
shift
export ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate-ddp.yaml}"
export NNODES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}}"
# rendezvous: the first node of the allocation, a port derived from the job id (two jobs sharing a
# node do not collide). All of scontrol's output is read (`| head -1` would SIGPIPE it under pipefail).
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [[ ${#NODES[@]} -eq 0 ]]; then
  echo "slurm_train.sh: scontrol listed no hosts for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2
  exit 1
fi
export MAIN_PROCESS_IP="${NODES[0]}"
export MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export CI=true                          # plain log lines (no progress bar) in the job log
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a rank that dies takes the job down instead of hanging it

echo "lorakit: $NNODES node(s) x $GPUS_PER_NODE GPU(s), rendezvous $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT, $ACCELERATE_CONFIG"

# One task per node; SLURM_NODEID (0..NNODES-1) is the machine rank. Single quotes: the variables are
# expanded by each node's shell, where SLURM_NODEID differs. --kill-on-bad-exit ends every node when
# one fails (the failing rank has printed `error: rank i/N: ...`).
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NNODES" --num_processes "$((NNODES * GPUS_PER_NODE))" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
    -m lorakit train "$RECIPE" "$@"
' lorakit-node "$@"
