"""`sbatch slurm/pretrain.sh` and the submitit path on the real two-node test cluster.

The runs share one set of packed shards and one uninterrupted two-node baseline, against which a preempted and
requeued run must end with the very same weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from soilnet.train.checkpoint import latest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
STEPS = 24
CONFIG = "configs/pretrain/demo.yaml"


def overrides(out: Path, shards: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.shards={shards}",
        f"train.steps={STEPS}",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=8",
        "train.tensorboard=false",
        "train.plot=false",
        *extra,
    ]


def weights(out: Path) -> dict[str, torch.Tensor]:
    ref = latest(out / "checkpoints")
    assert ref is not None, f"no checkpoint in {out}"
    state = torch.load(ref.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def log_of(out_dir: Path, job: int) -> str:
    return (out_dir / f"{job}.out").read_text(errors="replace")


def wait_for_checkpoint(out: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ref = latest(out / "checkpoints")
        if ref is not None:
            return
        time.sleep(0.5)
    raise TimeoutError(f"no checkpoint in {out} after {timeout} s")


@pytest.fixture(scope="module")
def submit(slurm_cluster, tmp_path_factory):
    logs = tmp_path_factory.mktemp("slurm-logs")

    def sbatch(*argv: str) -> int:
        return slurm_cluster.sbatch(f"--output={logs}/%j.out", *argv, cwd=REPO)

    sbatch.logs = logs
    return sbatch


@pytest.fixture(scope="module")
def baseline(slurm_cluster, submit, shards, tmp_path_factory) -> Path:
    """An uninterrupted two-node run: the test that it completes, and the reference weights."""
    out = tmp_path_factory.mktemp("baseline")
    job = submit("slurm/pretrain.sh", CONFIG, *overrides(out, shards))
    state = slurm_cluster.wait(job)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log_of(submit.logs, job)}\n{slurm_cluster.logs()}"
    return out


def test_sbatch_pretrain_on_two_nodes_completes(baseline, submit):
    ref = latest(baseline / "checkpoints")
    assert ref.meta["world_size"] == 2 and ref.meta["step"] == STEPS
    assert (baseline / "config.yaml").exists() and (baseline / "metrics.jsonl").exists()


def test_preempted_job_requeues_resumes_and_ends_with_the_same_weights(
    slurm_cluster, submit, shards, baseline, tmp_path
):
    out = tmp_path / "preempted"
    job = submit("slurm/pretrain.sh", CONFIG, *overrides(out, shards))
    wait_for_checkpoint(out)
    slurm_cluster.cmd("scontrol", "requeue", str(job))
    deadline = time.time() + 60
    while slurm_cluster.job_state(job) != "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    slurm_cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = slurm_cluster.wait(job)
    log = log_of(submit.logs, job)
    assert state == "COMPLETED", f"{state}:\n{log}"
    assert "restart 1" in log  # SLURM_RESTART_COUNT logged by the script
    assert "resumed from" in log
    got, want = weights(out), weights(baseline)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs after preemption"


def test_nccl_on_nodes_without_gpus_fails_with_a_clear_error_not_a_hang(slurm_cluster, submit, shards, tmp_path):
    job = submit("slurm/pretrain.sh", CONFIG, *overrides(tmp_path / "nccl", shards, "distributed.backend=nccl"))
    state = slurm_cluster.wait(job, timeout=180)
    log = log_of(submit.logs, job)
    assert state == "FAILED", f"{state}:\n{log}"
    assert "distributed.backend is 'nccl' but no CUDA GPU is visible" in log


def test_submitit_path_runs_the_same_job_on_the_same_cluster(slurm_cluster, shards, baseline, tmp_path):
    out, logs = tmp_path / "submitit", tmp_path / "submitit-logs"
    argv = [
        sys.executable,
        "-m",
        "launch.pretrain",
        "--config",
        CONFIG,
        "--cluster",
        "slurm",
        "--nodes",
        "2",
        "--tasks-per-node",
        "1",
        "--time",
        "10",
        "--logs",
        str(logs),
        *overrides(out, shards),
    ]
    proc = subprocess.run(argv, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "submitted job" in proc.stdout and f"logs in {logs}" in proc.stdout
    job = int(proc.stdout.split("submitted job ")[1].split()[0])
    state = slurm_cluster.wait(job)
    assert state == "COMPLETED", f"{state}:\n" + "\n".join(f.read_text() for f in sorted(logs.rglob("*.err")))
    assert latest(out / "checkpoints").meta["world_size"] == 2
    got, want = weights(out), weights(baseline)
    assert all(torch.equal(got[k], want[k]) for k in want)  # the same job as `sbatch slurm/pretrain.sh`


def test_launch_pack_as_a_job_array_writes_the_same_shards_as_one_process(slurm_cluster, shards, tmp_path):
    out = tmp_path / "array"
    argv = [
        sys.executable,
        "-m",
        "launch.pack",
        "--config",
        "configs/preprocess/demo.yaml",
        "--cluster",
        "slurm",
        "--array",
        "2",
        "--logs",
        str(tmp_path / "pack-logs"),
        f"output_dir={out}",
        "sampling.n=192",
        "shard.max_samples=64",
    ]
    proc = subprocess.run(argv, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first = int(proc.stdout.split("submitted job ")[1].split()[0].split("_")[0])
    for task in range(2):
        assert slurm_cluster.wait(f"{first}_{task}") == "COMPLETED"
    manifest, single = (json.loads((d / "manifest.json").read_text()) for d in (out, shards))
    assert manifest["shards"] == single["shards"] and manifest["stats"] == single["stats"]


def test_run_started_on_two_nodes_finishes_on_one(slurm_cluster, submit, shards, tmp_path):
    out = tmp_path / "shrink"
    first = submit("slurm/pretrain.sh", CONFIG, *overrides(out, shards, "debug.sigkill_after_step=10"))
    assert slurm_cluster.wait(first) != "COMPLETED"
    assert latest(out / "checkpoints").meta["world_size"] == 2
    second = submit("--nodes=1", "slurm/pretrain.sh", CONFIG, *overrides(out, shards))
    state = slurm_cluster.wait(second)
    log = log_of(submit.logs, second)
    assert state == "COMPLETED", f"{state}:\n{log}"
    assert "resumed from" in log and "1 node(s)" in log
    ref = latest(out / "checkpoints")
    assert ref.meta["world_size"] == 1 and ref.meta["step"] == STEPS


def test_a_node_lost_mid_run_fails_clearly_and_the_resubmitted_job_resumes(
    slurm_cluster, submit, shards, baseline, tmp_path
):
    out = tmp_path / "lost"
    job = submit("slurm/pretrain.sh", CONFIG, *overrides(out, shards))
    wait_for_checkpoint(out)
    slurm_cluster.lose_node("node2")
    try:
        state = slurm_cluster.wait(job, states=("FAILED", "NODE_FAIL", "CANCELLED", "PENDING", "COMPLETED"))
        log = log_of(submit.logs, job)
        assert state != "COMPLETED", log
        assert "If another rank or its node was lost, resubmit the same command" in log, log
    finally:
        slurm_cluster.cmd("scancel", str(job), check=False)
        slurm_cluster.resume_node("node2")
    again = submit("slurm/pretrain.sh", CONFIG, *overrides(out, shards))
    state = slurm_cluster.wait(again)
    log = log_of(submit.logs, again)
    assert state == "COMPLETED", f"{state}:\n{log}"
    assert "resumed from" in log
    got, want = weights(out), weights(baseline)
    assert all(torch.equal(got[k], want[k]) for k in want)
