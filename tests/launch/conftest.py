"""The real two-node Slurm cluster, started once per session (see cluster.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shards.pack import pack
from soilnet.config import load_config
from soilnet.config.pack import PackConfig

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import start_cluster, why_unavailable  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """192 synthetic-world samples in 3 shards, packed once for every Slurm job test (they only read them)."""
    out = tmp_path_factory.mktemp("shards")
    cfg = load_config(
        PackConfig,
        REPO / "configs/preprocess/demo.yaml",
        [f"output_dir={out}", "sampling.n=192", "shard.max_samples=64"],
    )
    pack(cfg)
    return out


@pytest.fixture(scope="session")
def finetuned(shards, tmp_path_factory) -> Path:
    """A model fine-tuned (briefly) on the suite's synthetic-world shards, whose pack config predict-map reuses."""
    out = tmp_path_factory.mktemp("ft-map")
    argv = ["finetune", "--config", str(REPO / "configs/finetune/demo.yaml"), f"data.shards={shards}"]
    settings = ["train.epochs=2", "train.threads=1", "eval.split.folds=2", "eval.baseline.n_estimators=10"]
    cmd = [sys.executable, "-m", "soilnet.cli", *argv, f"output_dir={out}", *settings, "eval.plots=false"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)  # a process of its own, as the jobs' are
    return out
