#!/bin/bash
# Fine-tuning and evaluation on a Slurm cluster (one node; single-node runs use plain PyTorch):
#     sbatch slurm/finetune.sh [CONFIG] [key=value ...]
#SBATCH --job-name=soilnet-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
##SBATCH --gpus-per-node=1          # enable on GPU partitions
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:-configs/finetune/demo.yaml}
[ $# -gt 0 ] && shift
# Slurm runs a copy of this script from its spool folder, so shared code is found from the submit directory:
# submit from the repository root.
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"

set +e
srun --kill-on-bad-exit=1 python -m soilnet.cli finetune --config "$CONFIG" "$@"
rc=$?
set -e
requeue_if_stopped_early "$rc"
