"""``benchmarks/predict_map.py`` at a tiny size, as its own command: it builds its model and rasters, maps both
regions in processes of their own and prints one JSON object last, with the figures docs/benchmarks.md records.
The numbers mean nothing at this size (docs/benchmarks.md has the real run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = {
    "cells",
    "large_cells",
    "cells_per_s",
    "vs_per_point",
    "per_point_cells_per_s",
    "tile_subset_cells_per_s",
    "per_point_subset_cells",
    "peak_rss_mib",
    "large_peak_rss_mib",
    "peak_rss_ratio",
    "tile_read_cells_per_s",
    "reference_read_cells_per_s",
}


@pytest.mark.slow
def test_the_benchmark_prints_its_figures_as_one_json_line(tmp_path):
    args = ["--cells", "400", "--large-cells", "1600", "--tile-size", "16", "--train", "60"]
    args += ["--per-point-tiles", "1", "--per-point-tile-size", "8", "--repeats", "1", "--reference-cells", "16"]
    args += ["--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "predict_map.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= result.keys()
    assert result["cells"] == 400 and result["large_cells"] == 1600 and result["per_point_subset_cells"] == 64
    assert result["cells_per_s"] > 0 and result["per_point_cells_per_s"] > 0 and result["peak_rss_mib"] > 0
    assert result["vs_per_point"] == pytest.approx(
        result["tile_subset_cells_per_s"] / result["per_point_cells_per_s"], rel=0.01
    )
    assert result["peak_rss_ratio"] == pytest.approx(result["large_peak_rss_mib"] / result["peak_rss_mib"], rel=1e-3)
    assert set(result["reference_read_cells_per_s"]) == {"1000", "100"}  # the reference schema's data side
    for name in ("small", "large"):  # each map complete: a COG of its cells
        assert (tmp_path / f"{name}.tif").is_file()
