"""predict-map's progress over its tiles in a log (stderr not a terminal): done / total, rate and ETA."""

from __future__ import annotations

import re

import numpy as np
import shapely

from soilnet.evaluate.maps import plan_grid, predict_tiles

REGION = shapely.geometry.box(9, 46, 10, 46.6)


def test_predict_map_reports_its_tiles(tmp_path, kit, capsys, monkeypatch):
    monkeypatch.setenv("SOILNET_PROGRESS_S", "0")
    grid, projected = plan_grid(REGION, 5000.0, tile_size=8)
    n = len(grid.tiles())
    assert n >= 2

    def predict(image, climate):
        return np.ones(len(image))

    summary = predict_tiles(grid, projected, kit.field_acquire, predict, 1.0, tmp_path / "parts", max_tiles=n - 1)
    assert summary["new"] == n - 1
    err = capsys.readouterr().err
    done = [
        int(m[1])
        for m in re.finditer(rf"^predict-map: (\d+)/{n - 1} tiles \(\d+%\), [\d.e+-]+ tiles/s, ETA ", err, re.M)
    ]
    assert done == list(range(1, n))
    assert f"predict-map: finished {n - 1}/{n - 1} tiles (100%) in " in err
    predict_tiles(grid, projected, kit.field_acquire, predict, 1.0, tmp_path / "parts")  # the rest: one tile to do
    assert "predict-map: finished 1/1 tiles (100%) in " in capsys.readouterr().err
