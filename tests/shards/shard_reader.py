"""Read packed shards back in tests: ``{key: {"image.npy": array, "climate.npy": array, "meta.json": dict}}``."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np


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
