#!/bin/bash
# Fine-tuning and evaluation on a Slurm cluster:
#     sbatch slurm/finetune.sh [CONFIG] [key=value ...]
#     sbatch --nodes=2 slurm/finetune.sh [CONFIG] [key=value ...]
# One task per GPU (or per CPU node). One task trains with plain PyTorch; several (more nodes, or more tasks per
# node) train data-parallel through DeepSpeed on the same global batches, and only rank 0 writes.
#SBATCH --job-name=soilnet-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
##SBATCH --gpus-per-node=1          # enable on GPU partitions, and set --ntasks-per-node to the same number
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --signal=USR2@120           # 2 minutes before the time limit every rank saves its fold's state and stops
#SBATCH --requeue                   # ...and the job goes back to the queue, resuming from that checkpoint
#SBATCH --open-mode=append          # a requeued job appends to the same log
#SBATCH --output=%x-%j.out
set -euo pipefail

# Slurm runs a copy of this script from its spool folder, so shared code is found from the submit directory:
# submit from the repository root.
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
srun_soilnet finetune configs/finetune/demo.yaml "$@"
