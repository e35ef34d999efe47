"""Fixtures of the GPU tests: the kits of the CPU tests they reuse (tests/train, tests/data, tests/evaluate,
tests/jobs) on the import path, the demo's shards and the labelled shards' kit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
for folder in ("gpu", "train", "data", "evaluate", "jobs"):
    sys.path.insert(0, str(TESTS / folder))

from labelled_kit import kit  # noqa: E402
from shard_kit import pack_demo  # noqa: E402

__all__ = ["kit"]


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The demo's synthetic world packed by the real packer: 64 samples in 4 shards of 16."""
    return pack_demo(tmp_path_factory.mktemp("gpu-shards"))
