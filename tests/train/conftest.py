"""Fixtures of the pretraining tests: one shared tiny shard set per session, and a CPU DeepSpeed environment."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from shardkit import write_shards  # noqa: E402

SAMPLES, PER_SHARD = 64, 16


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """64 samples in 4 shards of 16 (images 14 x 64 x 64 float16, climate 6 months x 14 variables)."""
    folder = tmp_path_factory.mktemp("pretrain-shards")
    write_shards(folder, n=SAMPLES, per_shard=PER_SHARD)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: CPU DeepSpeed and a stable extension cache."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env
