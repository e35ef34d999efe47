"""Helpers of the pretraining tests (a uniquely named module: every test folder has its own conftest)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


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


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (e.g. its DataLoader workers), from /proc."""
    found = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in f.read_text().split()]
        except OSError:
            pass
    return found
