"""Read packed shards back in tests: ``{key: {"image.npy": array, "climate.npy": array, "meta.json": dict}}``."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest


def shard_samples(out: Path) -> dict[str, dict]:
    """Every sample of every ``shard-*.tar`` in ``out``, members decoded (``.npy`` arrays, ``.json`` dicts)."""
    found: dict[str, dict] = {}
    for shard in sorted(Path(out).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                found.setdefault(key, {})[ext] = np.load(io.BytesIO(data)) if ext.endswith(".npy") else json.loads(data)
    return found


def mpirun_pack(ranks: int, config: Path, *overrides: str, cwd: Path, timeout: float) -> None:
    """``soilnet pack`` on ``ranks`` MPI ranks (as root too); skips the test where mpirun is not installed."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (Debian's openmpi-bin; scripts/setup.sh installs it as root)")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}
    argv = ["mpirun", "-n", str(ranks), "--oversubscribe", sys.executable, "-m", "soilnet.cli", "pack"]
    subprocess.run(
        [*argv, "--config", str(config), *overrides], cwd=cwd, env=env, check=True, capture_output=True, timeout=timeout
    )
