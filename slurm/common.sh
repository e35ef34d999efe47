# Shared by the sbatch scripts: environment, rendezvous address, and requeue after an orderly early stop.

cd "${SLURM_SUBMIT_DIR:-.}"

# --- your site's environment: edit here (modules, conda, ...) -------------------------------------------------
# module load cuda/12.4 nccl
if [ -f .venv/bin/activate ]; then
    source .venv/bin/activate
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
export PYTHONUNBUFFERED=1

# --- rendezvous: the first node of the allocation, as an IP (its NodeAddr; soilnet.rendezvous.head_address) ---
MASTER_ADDR=$(python -m soilnet.rendezvous "$SLURM_JOB_NODELIST")
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

echo "soilnet: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}; ${SLURM_JOB_NUM_NODES:-1} node(s)" \
     "${SLURM_NTASKS:-1} task(s); master ${MASTER_ADDR}:${MASTER_PORT}; DS_ACCELERATOR=${DS_ACCELERATOR}"

# Exit code 75 (EX_TEMPFAIL) means: every rank stopped on a signal and saved a checkpoint; run again later.
requeue_if_stopped_early() {
    local rc=$1
    if [ "$rc" -eq 75 ]; then
        echo "soilnet: stopped early with a checkpoint saved; requeueing job ${SLURM_JOB_ID}"
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            # e.g. the site forbids requeue: the checkpoint is saved, so say how to go on instead of failing silently
            echo "soilnet: could not requeue job ${SLURM_JOB_ID}; resubmit the same sbatch command to resume" >&2
            exit 75
        fi
        exit 0
    fi
    exit "$rc"
}

# The tail of slurm/pretrain.sh and slurm/finetune.sh: `srun_soilnet COMMAND DEFAULT_CONFIG [CONFIG] [key=value ...]`
# runs `soilnet COMMAND --config CONFIG key=value ...` on every task (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID give
# each task its rank; soilnet.distributed reads them), then requeues after an orderly early stop.
srun_soilnet() {
    local command=$1 config=${3:-$2}
    shift 2
    if [ $# -gt 0 ]; then shift; fi
    set +e
    srun --kill-on-bad-exit=1 python -m soilnet.cli "$command" --config "$config" "$@"
    local rc=$?
    set -e
    requeue_if_stopped_early "$rc"
}
