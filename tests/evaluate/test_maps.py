"""predict-map: the grid (soilnet.evaluate.maps), a valid Cloud-Optimized GeoTIFF with interval bands, and resumption
(the job, soilnet.jobs.predict_map; here, beside the fine-tuned model fixtures it needs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Geod

from soilnet.evaluate.maps import MapError, plan_grid, tile_cells
from soilnet.jobs.predict_map import predict_map, read_region

REGION = {"type": "Polygon", "coordinates": [[[9, 46], [11, 46], [11, 47.5], [9.5, 47.5], [9, 46]]]}


@pytest.fixture
def region(tmp_path):
    path = tmp_path / "region.geojson"
    path.write_text(
        json.dumps(
            {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": REGION}]}
        )
    )
    return path


def test_grid_cells_are_inside_the_region(region):
    grid, projected = plan_grid(read_region(region), 5000.0, tile_size=8)
    poly = shapely.geometry.shape(REGION)
    total = 0
    for r, c in grid.tiles():
        inside, lon, lat = tile_cells(grid, projected, r, c)
        total += int(inside.sum())
        assert shapely.contains_xy(poly.buffer(1e-6), lon, lat).all()
    area_m2 = abs(Geod(ellps="WGS84").geometry_area_perimeter(poly)[0])
    assert total == pytest.approx(area_m2 / 5000.0**2, rel=0.03)  # equal-area cells


def test_predict_map_writes_a_cog_and_resumes(finetuned_dir, region, tmp_path, kit):
    out = tmp_path / "map.tif"
    kw = dict(acquire=kit.field_acquire, tile_size=16, batch_size=100)
    first = predict_map(finetuned_dir, region, 5000.0, out, max_tiles=2, **kw)
    assert not first["complete"] and first["new"] == 2 and not out.exists()
    second = predict_map(finetuned_dir, region, 5000.0, out, **kw)
    assert second["complete"] and second["reused"] == 2 and second["new"] == second["tiles"] - 2

    with rasterio.open(out) as src:
        assert src.count == 4 and src.dtypes == ("float32",) * 4
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.profile["tiled"] and src.overviews(1)
        assert src.crs.is_projected and src.res == (5000.0, 5000.0)
        pred, lower, upper, aoa = src.read()
        assert src.descriptions[3] == "aoa (1 inside, 0 outside)" and float(src.tags()["aoa_threshold"]) > 0
        assert "soc" in src.descriptions[0] and "lower" in src.descriptions[1]
    ok = np.isfinite(pred)
    assert ok.sum() == second["cells_predicted"] > 500
    assert (lower[ok] <= pred[ok]).all() and (pred[ok] <= upper[ok]).all()
    assert set(np.unique(aoa[ok])) <= {0.0, 1.0} and np.isnan(aoa[~ok]).all()
    assert (tmp_path / "map.png").stat().st_size > 1000

    # An uninterrupted run gives the same map.
    again = tmp_path / "again.tif"
    predict_map(finetuned_dir, region, 5000.0, again, **kw)
    with rasterio.open(again) as src:
        assert np.array_equal(src.read(), np.stack([pred, lower, upper, aoa]), equal_nan=True)


def test_parts_of_another_grid_are_refused(finetuned_dir, region, tmp_path, kit):
    out = tmp_path / "map.tif"
    predict_map(finetuned_dir, region, 20000.0, out, acquire=kit.field_acquire, max_tiles=1, tile_size=4)
    with pytest.raises(MapError, match="another grid"):
        predict_map(finetuned_dir, region, 10000.0, out, acquire=kit.field_acquire, tile_size=4)


def test_a_model_saved_without_its_area_of_applicability_is_refused_before_any_tile(finetuned_dir, region, tmp_path):
    model = tmp_path / "old"
    model.mkdir()
    (model / "model.safetensors").write_bytes((finetuned_dir / "model.safetensors").read_bytes())
    out = tmp_path / "map.tif"
    with pytest.raises(FileNotFoundError, match="aoa.npz"):
        predict_map(model, region, 20000.0, out, acquire=lambda lon, lat: pytest.fail("a tile ran"), tile_size=4)
    assert not out.with_name("map.tif.parts").exists()
