"""`python -m launch.predict_map --array 2` on submitit's local executor: two tasks, each given --tasks 2
--task-id K, take the tiles between them; the one that finishes last assembles the map."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import rasterio

from soilnet.evaluate.maps import BANDS

REPO = Path(__file__).resolve().parents[2]
REGION = {"type": "Polygon", "coordinates": [[[8, 49], [9.2, 49], [9.2, 49.8], [8, 49.8], [8, 49]]]}


def test_an_array_of_two_local_tasks_writes_the_map_once(finetuned, tmp_path):
    region = tmp_path / "region.geojson"
    region.write_text(json.dumps(REGION))
    out = tmp_path / "map.tif"
    argv = ["--cluster", "local", "--array", "2", "--wait", "--checkpoint", str(finetuned), "--region", str(region)]
    argv += ["--resolution", "10000", "--tile-size", "4", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "launch.predict_map", *argv], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("map.tif.submitit/**/*_log.*")))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs}"
    assert f"logs in {out.with_name('map.tif.submitit')}" in proc.stdout
    assert "predict-map[0/2]: finished" in logs and "predict-map[1/2]: finished" in logs
    assert logs.count("wrote ") == 1 and logs.count("done in all") == 1
    with rasterio.open(out) as src:
        assert src.count == len(BANDS) and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
