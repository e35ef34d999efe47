"""On the synthetic world (shards/sources/synthetic.py), fine-tuning recovers the known SOC function, and
predict-map maps it through the same source the shards were packed from."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import rasterio
import shapely

from soilnet.cli import main
from soilnet.evaluate.maps import plan_grid
from soilnet.jobs.predict_map import predict_map
from soilnet.regions import read_region

pytest.importorskip("shards.pack", reason="the packer (shards/pack.py) is needed to pack the synthetic world")
pytestmark = pytest.mark.slow

# Small patches and one year of months keep packing and training within seconds; the SOC function itself is
# evaluated on the full schema by the synthetic world.
PACK = [
    "schema.patch_size=16",
    "schema.first_month=2014-01",
    "schema.last_month=2014-12",
    "sampling.n=600",
    "sampling.seed=11",
]
TRAIN = [
    "train.threads=1",
    "train.epochs=30",
    "train.lr=0.002",
    "eval.split.folds=3",
    "eval.split.block_km=100",
    "eval.split.buffer_km=25",
    "eval.baseline.n_estimators=50",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("world")
    shards = root / "shards"
    assert (
        main(["pack", "--config", str(repo_root / "configs/preprocess/demo.yaml"), f"output_dir={shards}", *PACK]) == 0
    )
    out = root / "finetune"
    assert (
        main(
            [
                "finetune",
                "--config",
                str(repo_root / "configs/finetune/demo.yaml"),
                f"data.shards={shards}",
                f"output_dir={out}",
                *TRAIN,
            ]
        )
        == 0
    )
    return root


def test_finetuning_recovers_the_known_soc_function(world):
    metrics = json.loads((world / "finetune" / "metrics.json").read_text())
    assert metrics["split"]["kind"] == "spatial"
    assert metrics["model"]["n"] == 600  # every point held out once
    assert metrics["model"]["r2"] >= 0.8
    assert 0.8 <= metrics["conformal"]["coverage"] <= 1.0


def test_predict_map_on_the_synthetic_source(world, tmp_path):
    region = tmp_path / "r.geojson"
    region.write_text(
        json.dumps({"type": "Polygon", "coordinates": [[[8, 49], [9.5, 49], [9.5, 50], [8, 50], [8, 49]]]})
    )
    out = tmp_path / "soc.tif"
    argv = [
        "predict-map",
        "--checkpoint",
        str(world / "finetune"),
        "--region",
        str(region),
        "--resolution",
        "4000",
        "--out",
        str(out),
        "--tile-size",
        "16",
    ]
    assert main([*argv, "--max-tiles", "1"]) == 3 and not out.exists()  # stopped early; rerun resumes
    assert main(argv) == 0
    with rasterio.open(out) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.overviews(1)
        pred, lower, upper, aoa = src.read()
        assert float(src.tags()["aoa_threshold"]) > 0
    ok = np.isfinite(pred)
    assert set(np.unique(aoa[ok])) <= {0.0, 1.0} and np.isnan(aoa[~ok]).all()  # band 4 flags every predicted cell
    assert aoa[ok].mean() > 0.9  # the region lies among the training samples (measured: all cells inside)
    grid, projected = plan_grid(read_region(region), 4000.0, 16)
    xs, ys = grid.x0 + (np.arange(grid.width) + 0.5) * 4000.0, grid.y0 - (np.arange(grid.height) + 0.5) * 4000.0
    inside = shapely.contains_xy(projected, *np.meshgrid(xs, ys))
    assert np.array_equal(ok, inside)  # every cell inside the region predicted (the world has data everywhere)
    assert (lower[ok] <= pred[ok]).all() and (upper[ok] >= pred[ok]).all()
    assert 2 < np.nanmedian(pred) < 200  # g/kg, the world's SOC range
    assert out.with_suffix(".png").is_file()


def test_tile_path_agrees_with_the_per_point_path(world, tmp_path):
    """The trained model's map from the tile path (patches cut from the map's EPSG:3035 grid) against the
    per-point path (each patch on its own north-up grid) on the same cells: docs/maps.md records the line printed."""
    region = tmp_path / "r.geojson"
    region.write_text(json.dumps({"type": "Polygon", "coordinates": [[[8, 49], [9, 49], [9, 50], [8, 50], [8, 49]]]}))
    maps, rate = {}, {}
    for per_point in (False, True):
        out = tmp_path / f"soc_{per_point}.tif"
        t0 = time.perf_counter()
        summary = predict_map(world / "finetune", region, 4000.0, out, tile_size=16, per_point=per_point)
        rate[per_point] = round(summary["cells"] / (time.perf_counter() - t0), 1)
        with rasterio.open(out) as src:
            maps[per_point] = src.read(1)
    tile, point = maps[False], maps[True]
    ok = np.isfinite(point)
    assert np.array_equal(ok, np.isfinite(tile)) and ok.sum() > 400
    diff = np.abs(tile[ok] - point[ok])
    m = {
        "cells": int(ok.sum()),
        "correlation": round(float(np.corrcoef(tile[ok], point[ok])[0, 1]), 5),
        "max_abs_diff_g_per_kg": round(float(diff.max()), 4),
        "max_rel_diff": round(float((diff / np.abs(point[ok])).max()), 5),
        "mean_soc_g_per_kg": round(float(point[ok].mean()), 3),
        "cells_per_s_tile": rate[False],
        "cells_per_s_per_point": rate[True],
    }
    print("tile-vs-per-point", json.dumps(m))
    assert m["correlation"] > 0.99 and m["max_rel_diff"] < 0.05
