"""Fixtures of the pretraining tests: one shared tiny shard set per session, and a CPU DeepSpeed environment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[2]
SAMPLES, PER_SHARD = 64, 16


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The demo's synthetic world packed by the real packer: 64 samples in 4 shards of 16."""
    from shards.pack import pack
    from soilnet.config.base import load_config
    from soilnet.config.pack import PackConfig

    folder = tmp_path_factory.mktemp("pretrain-shards")
    cfg = load_config(
        PackConfig,
        REPO / "configs/preprocess/demo.yaml",
        [f"output_dir={folder}", f"sampling.n={SAMPLES}", f"shard.max_samples={PER_SHARD}"],
    )
    manifest = pack(cfg)
    assert manifest is not None and manifest["samples"] == SAMPLES
    return folder
