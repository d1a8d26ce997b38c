#!/usr/bin/env bash
# Multi-node training under SLURM: one accelerate launcher per node, all GPUs of each node.
#   sbatch --nodes=2 accelerate_configs/slurm_multinode.sh train/sft.py recipe=magpie_pro_300k
#SBATCH --job-name=magpie-train
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail
SCRIPT=$1; shift
PYTHON=${PYTHON:-.venv/bin/python}  # the sweep passes its own interpreter (an installed package has no .venv here)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}  # ACCELERATE_CONFIG picks another config (the sweep's CPU test: cpu.yaml)
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export NCCL_ASYNC_ERROR_HANDLING=1
srun --kill-on-bad-exit=1 bash -c "
  $PYTHON -m accelerate.commands.launch --config_file ${ACCELERATE_CONFIG:-accelerate_configs/multinode_zero3.yaml} \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_PROCID --main_process_ip $MAIN_IP --main_process_port 29500 \
    $SCRIPT $*
"
