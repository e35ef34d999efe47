"""Fixtures of the pretraining tests: one shared tiny shard set per session, and a CPU DeepSpeed environment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "data"))

from shard_kit import pack_demo  # noqa: E402


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The demo's synthetic world packed by the real packer: 64 samples in 4 shards of 16."""
    return pack_demo(tmp_path_factory.mktemp("pretrain-shards"))
