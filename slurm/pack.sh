#!/bin/bash
# Packing shards on a Slurm cluster, in either of two ways:
#   as a job array, one packer per array task:   sbatch --array=0-15 slurm/pack.sh [CONFIG] [key=value ...]
#   as one MPI job over all tasks:                sbatch --ntasks=32 slurm/pack.sh [CONFIG] [key=value ...]
# Which point lands in which shard depends only on the point list and the config, so both give the same shards,
# and a killed or requeued job reruns to the same result.
#SBATCH --job-name=soilnet-pack
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

CONFIG=${1:-configs/preprocess/demo.yaml}
[ $# -gt 0 ] && shift
# Slurm runs a copy of this script from its spool folder, so shared code is found from the submit directory:
# submit from the repository root.
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"

if [ -n "${SLURM_ARRAY_TASK_COUNT:-}" ]; then
    # the packer takes its part from SLURM_ARRAY_TASK_ID/MIN/MAX/COUNT: its position among evenly spaced indices
    # (--array=0-15, 1-16, 0-30:2, 1,3,5)
    python -m soilnet.cli pack --config "$CONFIG" "$@"
elif [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
    mpirun -n "$SLURM_NTASKS" python -m soilnet.cli pack --config "$CONFIG" "$@"
else
    python -m soilnet.cli pack --config "$CONFIG" "$@"
fi
