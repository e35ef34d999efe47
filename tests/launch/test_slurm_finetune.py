"""`sbatch slurm/finetune.sh` on the real two-node test cluster: a fine-tuning job stopped by Slurm's signal
requeues itself, resumes, and ends with the metrics of a job that was never stopped.

Both jobs train data-parallel on two nodes (one rank each, DeepSpeed on gloo) from the demo config on shards
packed by the demo preprocessing config (every point carries a SOC target).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/finetune/demo.yaml"


def overrides(out: Path, shards: Path) -> list[str]:
    # 2 folds of 10 epochs (no early stop) and the final model: long enough for the signal to land in a fold
    return [
        f"output_dir={out}",
        f"data.shards={shards}",
        "train.epochs=10",
        "train.patience=10",
        "eval.split.folds=2",
        "eval.baseline.n_estimators=20",
        "eval.plots=false",
    ]


def log_of(logs: Path, job: int) -> str:
    return (logs / f"{job}.out").read_text(errors="replace")


def epochs(log: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in log.splitlines() if " epoch " in line and "val RMSE" in line]


def metrics_text(out: Path) -> str:
    """metrics.json with the output_dir (in the final model's path) written as OUT."""
    return (out / "metrics.json").read_text().replace(str(out), "OUT")


@pytest.fixture(scope="module")
def submit(slurm_cluster, tmp_path_factory):
    logs = tmp_path_factory.mktemp("slurm-ft-logs")

    def sbatch(*argv: str) -> int:
        return slurm_cluster.sbatch(f"--output={logs}/%j.out", "--nodes=2", *argv, cwd=REPO)

    sbatch.logs = logs
    return sbatch


@pytest.fixture(scope="module")
def baseline(slurm_cluster, submit, shards, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted two-node fine-tuning job (its output_dir and log): the test that it completes, and the
    reference metrics."""
    out = tmp_path_factory.mktemp("ft-baseline")
    job = submit("slurm/finetune.sh", CONFIG, *overrides(out, shards))
    state = slurm_cluster.wait(job)
    log = log_of(submit.logs, job)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log}\n{slurm_cluster.logs()}"
    assert "data parallel: DeepSpeed ZeRO stage 0 on 2 ranks (gloo)" in log
    return out, log


def test_sbatch_finetune_on_two_nodes_completes_and_leaves_no_checkpoints(baseline):
    baseline, _ = baseline
    assert (baseline / "metrics.json").is_file() and (baseline / "model.safetensors").is_file()
    assert not (baseline / "checkpoints").exists()


def test_usr2_before_the_time_limit_requeues_the_job_which_resumes_to_the_same_metrics(
    slurm_cluster, submit, shards, baseline, tmp_path
):
    out = tmp_path / "preempted"
    job = submit("slurm/finetune.sh", CONFIG, *overrides(out, shards))
    deadline = time.time() + 240
    while not (out / "checkpoints" / "fold_1.pt").is_file():  # fold 0 done, fold 1 has an epoch checkpoint
        running = slurm_cluster.job_state(job) in ("PENDING", "RUNNING")
        assert time.time() < deadline and running, log_of(submit.logs, job)
        time.sleep(0.05)
    # what --signal=USR2@120 sends before the time limit: USR2 to every task of the job's steps
    slurm_cluster.cmd("scancel", "--signal=USR2", str(job))
    deadline = time.time() + 120
    while slurm_cluster.job_state(job) != "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    assert slurm_cluster.job_state(job) == "PENDING", log_of(submit.logs, job)
    slurm_cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = slurm_cluster.wait(job)
    log = log_of(submit.logs, job)
    assert state == "COMPLETED", f"{state}:\n{log}"
    assert "stopped early with a checkpoint saved; requeueing job" in log  # slurm/common.sh saw exit code 75
    for rank in (0, 1):
        assert f"rank {rank}: stopped on a signal at fold 1 epoch" in log, log
    assert "restart 1" in log  # SLURM_RESTART_COUNT logged by the script
    assert "fold 0: finished before" in log and "fold 1: resumed at epoch" in log
    # the epochs of both jobs, side by side, show where they part if they do
    (ref, ref_log) = baseline
    assert metrics_text(out) == metrics_text(ref), (epochs(log), epochs(ref_log))
    assert not (out / "checkpoints").exists()
