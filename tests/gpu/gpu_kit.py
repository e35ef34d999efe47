"""Helpers of the GPU tests (a uniquely named module: every test folder has its own conftest): the skip marks,
and the environment of a child process on CUDA.

Every test here is marked ``gpu`` (``pytest -m gpu``; ``benchmarks/gpu_check.sh`` runs them) and skipped, with
its reason, where torch sees no CUDA device or fewer devices than the test needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from pretrain_kit import cpu_env

REPO = Path(__file__).resolve().parents[2]


def visible_gpus() -> int:
    """CUDA devices torch sees (0 on a CPU-only build or machine)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def no_cuda_reason() -> str:
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"needs a CUDA GPU: torch {torch.__version__} ({build}) sees none"


needs_cuda = pytest.mark.skipif(visible_gpus() == 0, reason=no_cuda_reason())


def needs_gpus(n: int) -> pytest.MarkDecorator:
    """Skip unless ``n`` CUDA devices are visible: nccl refuses two ranks on one device."""
    found = visible_gpus()
    return pytest.mark.skipif(
        found < n, reason=f"needs {n} CUDA GPUs, one per rank (nccl refuses two ranks on one device); {found} visible"
    )


def gpu_env(**extra: str) -> dict[str, str]:
    """The environment of a child process on the GPU: no inherited rank, DeepSpeed's CUDA accelerator (the test
    suite's conftest defaults it to the CPU one), cuBLAS workspaces that allow deterministic algorithms, and the
    checkout on the import path (a script under tests/ run from a source tree that is not installed)."""
    env = cpu_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["DS_ACCELERATOR"] = "cuda"
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return env
