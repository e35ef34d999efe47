"""Location sampling: uniform by area on the sphere, deterministic, filtered by land cover / climate cell / spacing."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin

from shards.sample import climate_cell, run_cli, sample_region


def _write_region(path, polygons):
    features = [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}
        for ring in polygons
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _box(w, s, e, n):
    return [[w, s], [e, s], [e, n], [w, n], [w, s]]


def _args(**kw):
    base = dict(
        region=None,
        n=0,
        seed=0,
        out=None,
        exclude_raster=None,
        exclude_classes=[],
        max_excluded_fraction=0.2,
        min_spacing_m=0.0,
        one_per_climate_cell=False,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_uniform_by_area_on_the_sphere(tmp_path):
    # Two bands of equal spherical area but very different lat extent: 0..10 N and 50 N..(asin(sin50+sin10)) ~ 70 N.
    top = math.degrees(math.asin(math.sin(math.radians(50)) + math.sin(math.radians(10))))
    region = _write_region(tmp_path / "r.geojson", [_box(0, 0, 20, 10), _box(0, 50, 20, top)])
    pts = sample_region(region, 40_000, seed=1)
    low = int((pts.lat < 30).sum())
    high = len(pts) - low
    # Equal areas -> equal expected counts (binomial sd ~100); lon/lat-uniform would give 1 : 2.
    assert abs(low - high) < 600, (low, high)
    assert pts.lon.between(0, 20).all()


def test_deterministic_per_seed_with_stable_ids(tmp_path):
    region = _write_region(tmp_path / "r.geojson", [_box(5, 45, 6, 46)])
    a = sample_region(region, 500, seed=7)
    b = sample_region(region, 500, seed=7)
    c = sample_region(region, 500, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.lon, c.lon)
    assert a.id.iloc[123] == "p0000000123"
    assert a.id.is_unique and len(a) == 500


def test_points_fall_inside_real_europe(shared_data):
    import shapely
    from shapely.geometry import shape

    path = shared_data / "regions" / "Europe.geojson"
    pts = sample_region(path, 2000, seed=0)
    geom = shape(json.loads(path.read_text())["features"][0]["geometry"])
    assert len(pts) == 2000
    assert shapely.contains_xy(geom, pts.lon.to_numpy(), pts.lat.to_numpy()).all()


def test_bad_polygon_and_file_without_polygons_are_named(tmp_path):
    flat = _write_region(tmp_path / "flat.geojson", [[[0, 0], [1, 1], [2, 2], [0, 0]]])
    with pytest.raises(ValueError, match=r"flat\.geojson: feature 0 is a Polygon with no area"):
        sample_region(flat, 10, 0)
    points = tmp_path / "points.geojson"
    points.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [1, 2]}}
                ],
            }
        )
    )
    with pytest.raises(ValueError, match=r"points\.geojson: no Polygon or MultiPolygon"):
        sample_region(points, 10, 0)


def test_exclusion_raster_drops_points_in_excluded_classes(tmp_path):
    # A real GeoTIFF in UTM 32N: class 80 (water) west of x=500 km, class 10 (tree) east of it, 30 m pixels.
    region = _write_region(tmp_path / "r.geojson", [_box(8.5, 45.0, 9.5, 45.5)])
    raster = tmp_path / "worldcover.tif"
    x0, y0, px = 420_000.0, 5_060_000.0, 30.0
    w, h = 7000, 3400  # covers the whole region
    data = np.full((h, w), 10, dtype=np.uint8)
    data[:, : int((500_000 - x0) / px)] = 80
    profile = dict(driver="GTiff", width=w, height=h, count=1, dtype="uint8", crs="EPSG:32632", nodata=0, tiled=True)
    with rasterio.open(raster, "w", transform=from_origin(x0, y0, px, px), compress="deflate", **profile) as dst:
        dst.write(data, 1)
    out = tmp_path / "pts.parquet"
    run_cli(
        _args(
            region=str(region),
            n=300,
            seed=3,
            out=str(out),
            exclude_raster=str(raster),
            exclude_classes=[50, 80, 90],
            max_excluded_fraction=0.2,
        )
    )
    pts = pd.read_parquet(out)
    assert len(pts) == 300
    from pyproj import Transformer

    x, _ = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(pts.lon.values, pts.lat.values)
    # A point is kept only when <= 20 % of its 1920 m footprint is water: its centre lies east of ~500 km - 576 m.
    assert (x > 500_000 - 0.3 * 1920).all()
    # Without the raster, the region's west part (x < 500 km) gets points too.
    free = sample_region(region, 300, 3)
    xf, _ = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(free.lon.values, free.lat.values)
    assert (xf < 499_000).sum() > 50


def test_one_point_per_climate_cell_and_min_spacing(tmp_path):
    region = _write_region(tmp_path / "r.geojson", [_box(10.0, 50.0, 10.5, 50.5)])  # 12 x 12 = 144 cells
    out = tmp_path / "cells.csv"
    run_cli(_args(region=str(region), n=120, seed=0, out=str(out), one_per_climate_cell=True))
    pts = pd.read_csv(out, dtype={"id": str})
    assert len(pts) == 120 and pts.id.iloc[0] == "p0000000000"
    assert len(np.unique(climate_cell(pts.lon.values, pts.lat.values))) == 120

    spaced = tmp_path / "spaced.parquet"
    run_cli(_args(region=str(region), n=60, seed=0, out=str(spaced), min_spacing_m=3000.0))
    p = pd.read_parquet(spaced)
    lo, la = np.radians(p.lon.values), np.radians(p.lat.values)
    xyz = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], 1)
    d = 6_371_008.8 * np.arccos(np.clip(xyz @ xyz.T, -1, 1))
    np.fill_diagonal(d, np.inf)
    assert len(p) == 60 and d.min() >= 3000.0


def test_more_points_than_the_filters_allow_is_a_clear_error_not_a_endless_loop(tmp_path):
    region = _write_region(tmp_path / "r.geojson", [_box(10.0, 50.0, 10.5, 50.5)])  # 144 climate cells
    with pytest.raises(ValueError, match=r"failed the filters after 144 of 200 points"):
        run_cli(_args(region=str(region), n=200, seed=0, out=str(tmp_path / "x.csv"), one_per_climate_cell=True))
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.csv.tmp").exists()


def test_pack_config_applies_the_same_filters_as_soilnet_sample(tmp_path):
    from shards.pack import load_points
    from shards.sample import MinSpacing, OnePerCell
    from soilnet.config import load_config
    from soilnet.config.pack import PackConfig

    region = _write_region(tmp_path / "r.geojson", [_box(10.0, 50.0, 10.5, 50.5)])
    demo = Path(__file__).resolve().parents[2] / "configs" / "preprocess" / "demo.yaml"
    cfg = load_config(
        PackConfig,
        demo,
        [
            f"sampling.region={region}",
            "sampling.n=50",
            "sampling.seed=4",
            "sampling.one_per_climate_cell=true",
            "sampling.min_spacing_m=2500",
        ],
    )
    points = load_points(cfg)
    expected = sample_region(region, 50, 4, [OnePerCell(), MinSpacing(2500.0)])
    assert list(points.ids) == list(expected.id) and np.array_equal(points.lon, expected.lon.to_numpy())
    assert len(np.unique(climate_cell(points.lon, points.lat))) == 50
