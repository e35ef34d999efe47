#!/bin/bash
# A SOC map on a Slurm cluster, its tiles spread over tasks, in either of two ways:
#   as a job array, one task per array index:  sbatch --array=0-15 slurm/predict_map.sh --checkpoint FINETUNE_DIR \
#                                                  --region R.geojson --resolution M --out map.tif [key=value ...]
#   as one MPI job over all tasks:             sbatch --ntasks=16 slurm/predict_map.sh ...the same arguments...
# Task k of n takes every n-th tile; each finished tile is written atomically beside the map (<out>.parts/), and
# the task that finishes the last tile assembles the COG. A killed or requeued job reruns to the same map; a run
# of the same command without an array (or `soilnet predict-map` on one machine) computes any tiles still
# missing, then assembles.
# Give each task the CPUs (or GPU) it should use: sbatch -c 8 [--gres=gpu:1] ...
#SBATCH --job-name=soilnet-predict-map
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

# Slurm runs a copy of this script from its spool folder, so shared code is found from the submit directory:
# submit from the repository root.
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"

if [ -n "${SLURM_ARRAY_TASK_COUNT:-}" ]; then
    # each task takes its tiles from SLURM_ARRAY_TASK_ID/MIN/MAX/COUNT: its position among evenly spaced indices
    # (--array=0-15, 1-16, 0-30:2, 1,3,5)
    python -m soilnet.cli predict-map "$@"
elif [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
    mpirun -n "$SLURM_NTASKS" python -m soilnet.cli predict-map "$@"
else
    python -m soilnet.cli predict-map "$@"
fi
