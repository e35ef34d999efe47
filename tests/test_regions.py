"""Region files (soilnet.regions): GeoJSON, GeoPackage and Shapefile, their CRS honoured, errors naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyogrio.raw
import pytest
import shapely
from pyproj import Transformer

from shards.pack import load_points
from soilnet.config.base import load_config
from soilnet.config.pack import PackConfig
from soilnet.jobs import predict_map
from soilnet.regions import RegionError, read_region, region_polygons

# a 100 km square in the ETRS89 LAEA grid (EPSG:3035), in Bavaria
LAEA_BOX = shapely.box(4_400_000, 2_800_000, 4_500_000, 2_900_000)
TO_LONLAT = Transformer.from_crs("EPSG:3035", "EPSG:4326", always_xy=True)


def _write(path, geometries, crs, driver):
    wkb = np.array([shapely.to_wkb(g) for g in geometries], dtype=object)
    pyogrio.raw.write(str(path), wkb, [], fields=[], geometry_type="Polygon", crs=crs, driver=driver)
    return path


def _lonlat_corners(geom=LAEA_BOX):
    x, y = np.asarray(geom.exterior.coords).T
    return np.column_stack(TO_LONLAT.transform(x, y))


def _assert_is_the_laea_box(region):
    corners = _lonlat_corners()
    assert shapely.contains_xy(region.buffer(1e-9), corners[:, 0], corners[:, 1]).all()
    # the edges follow the projection: projected back, the region is the box again
    back = shapely.transform(
        region, Transformer.from_crs("EPSG:4326", "EPSG:3035", always_xy=True).transform, interleaved=False
    )
    assert back.symmetric_difference(LAEA_BOX).area / LAEA_BOX.area < 1e-6


def _geojson(path, geometry, crs_member=None):
    doc = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": geometry}]}
    if crs_member:
        doc["crs"] = {"type": "name", "properties": {"name": crs_member}}
    path.write_text(json.dumps(doc))
    return path


def test_geojson_without_crs_member_is_wgs84(tmp_path):
    box = shapely.box(9.0, 46.0, 11.0, 47.5)
    path = _geojson(tmp_path / "r.geojson", shapely.geometry.mapping(box))
    assert read_region(path).equals(box)


def test_geojson_with_a_crs_member_is_reprojected(tmp_path):
    path = _geojson(tmp_path / "laea.geojson", shapely.geometry.mapping(LAEA_BOX), "urn:ogc:def:crs:EPSG::3035")
    _assert_is_the_laea_box(read_region(path))


def test_geopackage_in_etrs89_laea_is_reprojected(tmp_path):
    path = _write(tmp_path / "region.gpkg", [LAEA_BOX], "EPSG:3035", "GPKG")
    _assert_is_the_laea_box(read_region(path))


def test_shapefile_with_prj_is_reprojected_and_overlaps_are_united(tmp_path):
    other = shapely.box(4_450_000, 2_850_000, 4_600_000, 2_950_000)
    path = _write(tmp_path / "region.shp", [LAEA_BOX, other], "EPSG:3035", "ESRI Shapefile")
    assert (tmp_path / "region.prj").is_file()
    polygons = region_polygons(path)
    assert len(polygons) == 1  # one polygon: the union
    union = shapely.union_all([LAEA_BOX, other])
    back = shapely.transform(
        polygons[0], Transformer.from_crs("EPSG:4326", "EPSG:3035", always_xy=True).transform, interleaved=False
    )
    assert back.symmetric_difference(union).area / union.area < 1e-6


def test_shapefile_without_prj_is_an_error_naming_the_file(tmp_path):
    with pytest.warns(UserWarning, match="crs"):
        path = _write(tmp_path / "nocrs.shp", [LAEA_BOX], None, "ESRI Shapefile")
    with pytest.raises(RegionError, match=r"nocrs\.shp: the layer has no CRS"):
        read_region(path)


def test_empty_regions_are_errors_naming_the_file(tmp_path):
    empty = _write(tmp_path / "empty.gpkg", [], "EPSG:3035", "GPKG")
    with pytest.raises(RegionError, match=r"empty\.gpkg: no features"):
        read_region(empty)
    nothing = tmp_path / "nothing.geojson"
    nothing.write_text(
        json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": None}]})
    )
    with pytest.raises(RegionError, match=r"nothing\.geojson: no Polygon or MultiPolygon"):
        read_region(nothing)


def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(RegionError, match=r"region file not found: .*absent\.gpkg"):
        read_region(tmp_path / "absent.gpkg")
    junk = tmp_path / "junk.gpkg"
    junk.write_bytes(b"\xa0\x01 not a geopackage" * 8)
    with pytest.raises(RegionError, match=r"junk\.gpkg: not a readable vector file"):
        read_region(junk)


def test_soilnet_sample_reads_a_geopackage_region(repo_root, tmp_path):
    region = _write(tmp_path / "region.gpkg", [LAEA_BOX], "EPSG:3035", "GPKG")
    out = tmp_path / "points.csv"
    cmd = [sys.executable, "-m", "soilnet.cli", "sample", "--region", str(region), "--n", "300", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    points = pd.read_csv(out)
    assert len(points) == 300
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3035", always_xy=True).transform(points.lon, points.lat)
    assert shapely.contains_xy(LAEA_BOX, x, y).all()


def test_a_bad_region_is_one_line_from_the_cli(repo_root, tmp_path):
    junk = tmp_path / "junk.gpkg"
    junk.write_bytes(b"\xa0\x01 not a geopackage" * 8)
    cmd = [
        sys.executable,
        "-m",
        "soilnet.cli",
        "sample",
        "--region",
        str(junk),
        "--n",
        "3",
        "--out",
        str(tmp_path / "p.csv"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, env=os.environ)
    assert proc.returncode == 2
    assert proc.stderr.startswith("soilnet sample: error: ") and str(junk) in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_pack_samples_inside_a_geopackage_region_and_predict_map_reads_it_the_same_way(repo_root, tmp_path):
    region = _write(tmp_path / "region.gpkg", [LAEA_BOX], "EPSG:3035", "GPKG")
    overrides = [f"sampling.region={region}", "sampling.n=50", "sampling.seed=3", f"output_dir={tmp_path / 'out'}"]
    cfg = load_config(PackConfig, repo_root / "configs" / "preprocess" / "demo.yaml", overrides)
    points = load_points(cfg)
    assert len(points) == 50
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3035", always_xy=True).transform(points.lon, points.lat)
    assert shapely.contains_xy(LAEA_BOX, x, y).all()
    assert predict_map.read_region is read_region  # the one reader


def test_a_file_of_several_layers_is_an_error_naming_them(tmp_path):
    path = tmp_path / "two.gpkg"
    wkb = np.array([shapely.to_wkb(LAEA_BOX)], dtype=object)
    for layer in ("land", "sea"):
        pyogrio.raw.write(str(path), wkb, [], fields=[], layer=layer, geometry_type="Polygon", crs="EPSG:3035")
    with pytest.raises(RegionError, match=r"two\.gpkg: 2 spatial layers \(land, sea\)"):
        read_region(path)
