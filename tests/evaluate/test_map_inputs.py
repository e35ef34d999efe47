"""predict-map refuses bad input before any tile runs: a region off the rasters (naming both bounds) and a model
whose schema its data source cannot serve (naming both sides). The model and the local rasters are those of
benchmarks/predict_map.py, at a tiny size: a model fine-tuned on synthetic-world shards, mapped from rasters."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import rasterio
import shapely

from soilnet.evaluate.maps import MapError
from soilnet.jobs.predict_map import predict_map

REPO = Path(__file__).resolve().parents[2]
RESOLUTION = 30.0


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_predict_map", REPO / "benchmarks" / "predict_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny fine-tuned model whose pack config points at local rasters, and a region of 900 cells on them."""
    bench = load_benchmark()
    d = tmp_path_factory.mktemp("map_inputs")
    model = bench.build_model(d, 60)
    bounds = bench.square(900, RESOLUTION)
    overrides = bench.rasters_overrides(bench.write_rasters(d, bounds, bench.schema()))
    region = bench.write_region(d / "region.geojson", bounds, RESOLUTION)
    return {"model": model, "overrides": overrides, "region": region}


def run(world, region, out: Path, overrides=(), **kw) -> dict:
    args = (world["model"], region, RESOLUTION, out)
    return predict_map(*args, overrides=[*world["overrides"], *overrides], crs="EPSG:3035", tile_size=16, **kw)


def test_the_model_maps_its_region_from_the_rasters(world, tmp_path):
    summary = run(world, world["region"], tmp_path / "map.tif")
    assert summary["complete"] and summary["cells"] == 900 and summary["failed"] == 0
    with rasterio.open(tmp_path / "map.tif") as src:
        assert (src.width, src.height) == (30, 30) and src.crs.to_epsg() == 3035


@pytest.mark.parametrize("per_point", [False, True])
def test_a_region_off_the_rasters_is_refused_before_any_tile_naming_both_bounds(world, tmp_path, per_point):
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps(shapely.geometry.mapping(shapely.geometry.box(20, 60, 21, 61))))
    out = tmp_path / "map.tif"
    with pytest.raises(MapError) as err:
        run(world, far, out, per_point=per_point)
    message = str(err.value)
    assert "the region (lon 20.0000..21.0000, lat 60.0000..61.0000) does not overlap the rasters (lon " in message
    w, s, e, n = shapely.bounds(shapely.geometry.shape(json.loads(world["region"].read_text())))
    rasters = message.split("the rasters (")[1]
    lon0, lon1 = (float(v) for v in rasters.split("lon ")[1].split(",")[0].split(".."))
    lat0, lat1 = (float(v) for v in rasters.split("lat ")[1].rstrip(")").split(".."))
    assert lon0 < w < e < lon1 and lat0 < s < n < lat1  # the rasters' bounds: around the region they were made for
    assert not out.with_name("map.tif.parts").exists()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (
            "schema.channels=[SR_B4, SR_B5]",
            "channels: the model's ['SR_B4', 'SR_B5', 'NDVI', 'elevation'], the source's ['SR_B4', 'SR_B5']",
        ),
        ("schema.climate_variables=[pr, tmmx]", "climate variables: the model's ['pr', 'tmmn', 'tmmx'], the source's"),
        ("schema.last_month=2014-06", "climate months: the model's 2014-01..2014-12, the source's 2014-01..2014-06"),
        ("schema.patch_size=16", "patches: the model's 8 x 30 m pixels, the source's 16 x 30 m"),
    ],
)
def test_a_model_the_source_cannot_serve_is_refused_before_any_tile_naming_both_sides(world, tmp_path, override, named):
    out = tmp_path / "map.tif"
    with pytest.raises(MapError, match="the model's schema does not fit its data source") as err:
        run(world, world["region"], out, overrides=[override])
    assert named in str(err.value) and override in str(err.value)  # the override that made the source's schema
    assert not out.with_name("map.tif.parts").exists()
