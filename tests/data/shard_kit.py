"""The shard set the loader and pretraining tests read (a uniquely named module: every test folder has its own
conftest)."""

from __future__ import annotations

from pathlib import Path

from shards.pack import pack
from soilnet.config.base import load_config
from soilnet.config.pack import PackConfig

REPO = Path(__file__).resolve().parents[2]
SAMPLES, PER_SHARD = 64, 16


def pack_demo(folder: Path) -> Path:
    """The demo's synthetic world packed by the real packer into ``folder``: 64 samples in 4 shards of 16."""
    overrides = [f"output_dir={folder}", f"sampling.n={SAMPLES}", f"shard.max_samples={PER_SHARD}"]
    manifest = pack(load_config(PackConfig, REPO / "configs/preprocess/demo.yaml", overrides))
    assert manifest is not None and manifest["samples"] == SAMPLES
    return folder
