"""predict-map's progress over its tiles in a log (stderr not a terminal): done / total, rate and ETA, from the one
tile loop (soilnet.jobs.map_tasks.run_tiles) running the tiles that soilnet.evaluate.maps.tile_writer computes."""

from __future__ import annotations

import re

import numpy as np
import shapely

from shards.parallel import Workers
from soilnet.evaluate.maps import plan_grid, tile_writer
from soilnet.jobs.map_tasks import run_tiles

REGION = shapely.geometry.box(9, 46, 10, 46.6)


def test_predict_map_reports_its_tiles(tmp_path, kit, capsys, monkeypatch):
    monkeypatch.setenv("SOILNET_PROGRESS_S", "0")
    grid, projected = plan_grid(REGION, 5000.0, tile_size=8)
    n = len(grid.tiles())
    assert n >= 2

    def predict(image, climate):
        return np.ones(len(image))

    parts = tmp_path / "parts"
    parts.mkdir()
    compute = tile_writer(grid, projected, parts, kit.field_acquire, predict, 1.0)
    assembled = []

    def assemble():
        assembled.append(True)
        return {}

    summary = run_tiles(grid.tiles(), compute, assemble, parts, Workers(), max_tiles=n - 1)
    assert summary["new"] == n - 1 and not summary["complete"] and not assembled
    err = capsys.readouterr().err
    done = [
        int(m[1])
        for m in re.finditer(
            rf"^predict-map\[0/1\]: (\d+)/{n - 1} tiles \(\d+%\), [\d.e+-]+ tiles/s, ETA .*cells/s", err, re.M
        )
    ]
    assert done == list(range(1, n))
    assert f"predict-map[0/1]: finished {n - 1}/{n - 1} tiles (100%) in " in err
    summary = run_tiles(grid.tiles(), compute, assemble, parts, Workers())  # the rest: one tile to do
    assert summary["new"] == 1 and summary["complete"] and assembled == [True]
    assert "predict-map[0/1]: finished 1/1 tiles (100%) in " in capsys.readouterr().err
