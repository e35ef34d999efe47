"""``soilnet pack`` (and ``python -m launch.pack``): pack this worker's shards; the last one prints the summary."""

from __future__ import annotations

from pathlib import Path

from shards.pack import pack, summary
from soilnet.config.pack import PackConfig


def run(cfg: PackConfig) -> int:
    """Pack the shards of ``cfg`` this worker (MPI rank or Slurm array task) owns; see :mod:`shards.pack`."""
    manifest = pack(cfg)
    if manifest is not None:
        print(summary(manifest, Path(cfg.output_dir)))
    return 0
