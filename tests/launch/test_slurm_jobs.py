"""`sbatch slurm/pretrain.sh` and the submitit path on the real two-node test cluster.

The runs share one set of packed shards and one uninterrupted two-node baseline, against which a preempted and
requeued run must end with the very same weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from shards.pack import pack
from soilnet.config import load_config
from soilnet.config.pack import PackConfig
from soilnet.train.checkpoint import latest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
STEPS = 24
CONFIG = "configs/pretrain/demo.yaml"


def overrides(out: Path, shards: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"data.shards={shards}", f"train.steps={STEPS}", "checkpoint.every_steps=4",
            "checkpoint.keep_last=8", "train.tensorboard=false", "train.plot=false", *extra]  # fmt: skip


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
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    cfg = load_config(PackConfig, REPO / "configs/preprocess/demo.yaml",
                      [f"output_dir={out}", "sampling.n=192", "shard.max_samples=64"])  # fmt: skip
    pack(cfg)
    return out


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


def test_preempted_job_requeues_resumes_and_ends_with_the_same_weights(slurm_cluster, submit, shards, baseline,
                                                                        tmp_path):  # fmt: skip
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
