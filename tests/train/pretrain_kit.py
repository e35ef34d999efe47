"""Helpers of the pretraining tests (a uniquely named module: every test folder has its own conftest)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_command(entry: list[str], out: Path, shards: Path, *overrides: str) -> list[str]:
    """``soilnet pretrain`` through ``entry`` on the demo config into ``out``: sample ids logged, no TensorBoard,
    a checkpoint every 3 steps, the last 2 kept; then ``overrides``."""
    run = [f"output_dir={out}", f"data.shards={shards}", "data.log_sample_ids=true", "train.tensorboard=false"]
    saves = ["checkpoint.every_steps=3", "checkpoint.keep_last=2"]
    return [sys.executable, *entry, "pretrain", "--config", str(DEMO), *run, *saves, *overrides]


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: CPU DeepSpeed and a stable extension cache."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (e.g. its DataLoader workers), from /proc."""
    found = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in f.read_text().split()]
        except OSError:
            pass
    return found
