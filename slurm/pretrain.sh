#!/bin/bash
# Cross-modal contrastive pretraining on a Slurm cluster:
#     sbatch slurm/pretrain.sh [CONFIG] [key=value ...]
# Edit the #SBATCH lines below for your cluster. Everything after CONFIG is passed on as config overrides.
#SBATCH --job-name=soilnet-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
##SBATCH --gpus-per-node=4          # enable on GPU partitions, and set --ntasks-per-node to the same number
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --signal=USR2@120           # 2 minutes before the time limit every rank saves a checkpoint and stops
#SBATCH --requeue                   # ...and the job goes back to the queue, resuming from that checkpoint
#SBATCH --open-mode=append          # a requeued job appends to the same log
#SBATCH --output=%x-%j.out
##SBATCH --partition=...
##SBATCH --account=...
set -euo pipefail

# Slurm runs a copy of this script from its spool folder, so shared code is found from the submit directory:
# submit from the repository root.
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
srun_soilnet pretrain configs/pretrain/demo.yaml "$@"
