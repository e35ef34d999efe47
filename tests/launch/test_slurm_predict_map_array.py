"""`sbatch --array=0-2:2 slurm/predict_map.sh` on the real two-node test cluster: a stepped array's two tasks
take the map's tiles between them (task k of 2 every other tile), the one that finishes last assembles the COG,
and the map equals that of one job doing every tile."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
REGION = {"type": "Polygon", "coordinates": [[[8, 49], [9.2, 49], [9.2, 49.8], [8, 49.8], [8, 49]]]}


def test_a_stepped_array_spreads_the_tiles_and_the_last_task_assembles(finetuned, slurm_cluster, tmp_path):
    region = tmp_path / "region.geojson"
    region.write_text(json.dumps(REGION))
    args = ["--checkpoint", str(finetuned), "--region", str(region), "--resolution", "10000", "--tile-size", "4"]
    logs = tmp_path / "logs"
    logs.mkdir()
    script = "slurm/predict_map.sh"
    single = slurm_cluster.sbatch(
        f"--output={logs}/%j.out", script, *args, "--out", str(tmp_path / "one.tif"), cwd=REPO
    )
    array = slurm_cluster.sbatch(
        "--array=0-2:2", f"--output={logs}/%A_%a.out", script, *args, "--out", str(tmp_path / "two.tif"), cwd=REPO
    )
    try:
        state = slurm_cluster.wait(single)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{slurm_cluster.logs()}") from err
    assert state == "COMPLETED", f"{(logs / f'{single}.out').read_text(errors='replace')}\n{slurm_cluster.logs()}"
    texts = []
    for index in (0, 2):
        state = slurm_cluster.wait(f"{array}_{index}")
        texts.append((logs / f"{array}_{index}.out").read_text(errors="replace"))
        assert state == "COMPLETED", f"array task {index}: {state}\n{texts[-1]}\n{slurm_cluster.logs()}"
    # task k of 2 (the array's position, not its index) did its own tiles; exactly one assembled
    for rank, text in enumerate(texts):
        assert re.search(rf"predict-map\[{rank}/2\]: finished \d+/\d+ tiles", text), text
    wrote = [t for t in texts if "wrote " in t and "two.tif" in t]
    assert len(wrote) == 1, texts
    assert sum("done in all" in t for t in texts) == 1
    assert (tmp_path / "one.tif").read_bytes() == (tmp_path / "two.tif").read_bytes()
    with rasterio.open(tmp_path / "one.tif") as a, rasterio.open(tmp_path / "two.tif") as b:
        assert a.tags() == b.tags() and a.crs == b.crs and a.transform == b.transform
        one, two = a.read(), b.read()
    assert np.isfinite(one[0]).mean() > 0.5
    assert np.array_equal(np.isnan(one), np.isnan(two)) and np.allclose(one, two, equal_nan=True, atol=1e-5)
