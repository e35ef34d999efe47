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

# --- rendezvous: the first node of the allocation, as an IP ----------------------------------------------------
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(scontrol show node "$head_node" -o | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
head_addr=${head_addr:-$head_node}
MASTER_ADDR=$(getent ahostsv4 "$head_addr" | awk 'NR == 1 {print $1}')
export MASTER_ADDR=${MASTER_ADDR:-$head_addr}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

echo "soilnet: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}; ${SLURM_JOB_NUM_NODES:-1} node(s)" \
     "${SLURM_NTASKS:-1} task(s); master ${MASTER_ADDR}:${MASTER_PORT}; DS_ACCELERATOR=${DS_ACCELERATOR}"

# Exit code 75 (EX_TEMPFAIL) means: every rank stopped on a signal and saved a checkpoint; run again later.
requeue_if_stopped_early() {
    local rc=$1
    if [ "$rc" -eq 75 ]; then
        echo "soilnet: stopped early with a checkpoint saved; requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit "$rc"
}
