"""The real two-node Slurm cluster, started once per session (see cluster.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import start_cluster, why_unavailable  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()
