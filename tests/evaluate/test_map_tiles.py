"""The map's tile path (soilnet.evaluate.tiles): agreement with the per-point path on the synthetic world, the grid's
CRS read back as its EPSG code, and the streamed COG's layout, blocks, overviews, bands and tags."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import CRS

from shards.pack import make_sample
from shards.sources.synthetic import SyntheticWorld
from soilnet.evaluate.maps import (
    COG_BLOCK,
    GDAL_CACHE_MB,
    TILE_GDAL_CACHE_MB,
    Grid,
    MapError,
    _limits,
    gdal_cache,
    plan_grid,
    tile_bands,
    tile_cells,
    write_map,
    write_tile,
)
from soilnet.evaluate.tiles import TileAcquire, window_valid_counts
from soilnet.jobs.predict_map import predict_map
from soilnet.schema import SampleSchema

ALPS = shapely.geometry.box(9.0, 46.0, 9.25, 46.2)


def known_soc(image: np.ndarray, climate: np.ndarray, schema: SampleSchema) -> np.ndarray:
    """The synthetic world's SOC function without its noise, from a batch of model inputs: a stand-in model whose
    output depends on the patch (mean NDVI, mean elevation) and the climate as the world's SOC does."""
    ch, v = schema.channels, schema.climate_variables
    ndvi = image[:, ch.index("NDVI")].astype(np.float64).mean(axis=(1, 2))
    elev_km = image[:, ch.index("elevation")].astype(np.float64).mean(axis=(1, 2)) / 1000
    tmean = ((climate[:, :, v.index("tmmx")] + climate[:, :, v.index("tmmn")]) / 2).mean(axis=1)
    p_year = climate[:, :, v.index("pr")].mean(axis=1) * 12
    return np.exp(2.9 + 1.6 * (ndvi - 0.35) + 0.5 * elev_km - 0.04 * (tmean - 10) + 0.5 * (p_year / 700 - 1))


def agreement(region=ALPS, resolution=1000.0, tile_size=8, crs=None) -> dict:
    """Tile-path vs per-point-path predictions of :func:`known_soc` on every cell of ``region``."""
    schema = SampleSchema()
    world = SyntheticWorld(schema, seed=0)
    grid, projected = plan_grid(region, resolution, tile_size, crs)
    tiles = TileAcquire(world, schema.patch_size, schema.pixel_size_m, batch_size=64)

    def per_point(lon, lat):
        samples = [make_sample(world, schema, "c", float(x), float(y), "mask") for x, y in zip(lon, lat, strict=True)]
        image = np.stack([s["image.npy"] for s in samples])
        return image, np.stack([s["climate.npy"] for s in samples]), np.ones(len(lon), bool)

    def predict(image, climate):
        return known_soc(image, climate, schema)

    a, b = [], []
    for row, col in grid.tiles():
        inside = tile_cells(grid, projected, row, col)[0]
        ta = tile_bands(grid, projected, row, col, tiles, predict, 1.0, "original")[0][0][inside]
        tb = tile_bands(grid, projected, row, col, per_point, predict, 1.0, "original", 64)[0][0][inside]
        a.append(ta)
        b.append(tb)
    a, b = np.concatenate(a), np.concatenate(b)
    rel = np.abs(a - b) / np.abs(b)
    return {
        "crs": grid.crs,
        "cells": int(len(a)),
        "correlation": float(np.corrcoef(a, b)[0, 1]),
        "max_abs_diff_g_per_kg": float(np.abs(a - b).max()),
        "max_rel_diff": float(rel.max()),
        "mean_soc_g_per_kg": float(b.mean()),
    }


def test_tile_path_agrees_with_the_per_point_path_on_the_synthetic_world():
    m = agreement()
    assert m["crs"] == "EPSG:3035" and m["cells"] > 300
    assert m["correlation"] > 0.99
    assert m["max_rel_diff"] < 0.05


def test_the_tile_path_flags_cells_from_the_inputs_it_predicts_on():
    """Band 4 on the tile path: ``applicability`` gets the very arrays ``predict`` gets (raw, schema units), and its
    flags land on the cells they belong to; cells outside the region stay NaN."""
    schema = SampleSchema()
    grid, projected = plan_grid(ALPS, 1000.0, 8)
    tiles = TileAcquire(SyntheticWorld(schema, seed=0), schema.patch_size, schema.pixel_size_m, batch_size=64)
    seen = []

    def predict(image, climate):
        seen.append((image, climate))
        return known_soc(image, climate, schema)

    def applicability(image, climate):
        assert image is seen[-1][0] and climate is seen[-1][1]
        return (known_soc(image, climate, schema) > threshold).astype(np.float32)

    threshold = float(np.nanmedian(tile_bands(grid, projected, 0, 0, tiles, predict, 1.0, "original")[0][0]))
    flagged = 0
    for row, col in grid.tiles():
        inside = tile_cells(grid, projected, row, col)[0]
        bands = tile_bands(grid, projected, row, col, tiles, predict, 1.0, "original", 64, applicability)[0]
        assert bands.shape[0] == 4 and np.isnan(bands[3][~inside]).all()
        assert np.array_equal(bands[3][inside], (bands[0][inside] > threshold).astype(np.float32))
        flagged += int((bands[3][inside] == 0).sum())
    assert flagged > 0


def test_gdal_block_cache_is_set_in_mebibytes():
    """rasterio takes GDAL_CACHEMAX in bytes: the map's caches are MiB, not a few bytes (no cache at all)."""
    with gdal_cache(TILE_GDAL_CACHE_MB):
        assert rasterio.env.getenv()["GDAL_CACHEMAX"] == TILE_GDAL_CACHE_MB * 2**20
    with gdal_cache(GDAL_CACHE_MB):
        assert rasterio.env.getenv()["GDAL_CACHEMAX"] == GDAL_CACHE_MB * 2**20


def test_valid_counts_flag_every_patch_touching_a_bad_pixel():
    valid = np.ones((10, 12), bool)
    valid[4, 7] = False
    bad = window_valid_counts(valid, 3)
    assert bad.shape == (8, 10)
    expect = np.zeros((8, 10), int)
    expect[2:5, 5:8] = 1
    assert np.array_equal(bad, expect)


def test_grid_crs_origin_and_defaults():
    grid, _ = plan_grid(ALPS, 1000.0, 8, "EPSG:3035", origin=(500.0, 250.0))
    assert (grid.x0 - 500.0) % 1000.0 == 0 and (grid.y0 - 250.0) % 1000.0 == 0
    usa = shapely.geometry.box(-100, 38, -99, 39)
    assert plan_grid(usa, 5000.0, 8, "EPSG:5070")[0].crs == "EPSG:5070"
    laea = CRS(plan_grid(usa, 5000.0)[0].crs)  # outside Europe: a named LAEA centred on the region
    assert (
        laea.name.startswith("SoilNet LAEA") and "Lambert Azimuthal Equal Area" in laea.coordinate_operation.method_name
    )
    with pytest.raises(MapError, match="not a projected"):
        plan_grid(ALPS, 1000.0, 8, "EPSG:4326")


def _big_map(tmp_path, width=1300, height=1100, tile=256) -> tuple[Grid, object]:
    grid = Grid("EPSG:3035", 4_000_000.0, 3_000_000.0, 100.0, width, height, tile)
    parts = tmp_path / "parts"
    parts.mkdir()
    rng = np.random.default_rng(0)
    for row, col in grid.tiles():
        rs, cs = grid.tile_window(row, col)
        pred = rng.uniform(5, 50, (rs.stop - rs.start, cs.stop - cs.start)).astype(np.float32)
        pred[:3] = np.nan
        write_tile(parts, grid, row, col, np.stack([pred, pred - 2, pred + 2, (pred > 20).astype(np.float32)]))
    return grid, parts


def test_cog_from_tiles_validates_with_crs_bands_and_tags(tmp_path, caplog):
    grid, parts = _big_map(tmp_path)
    out = tmp_path / "map.tif"
    with caplog.at_level(logging.WARNING, logger="rasterio"):
        summary = write_map(
            out, grid, parts, {"name": "soc", "unit": "g/kg"}, {"level": 0.9, "half_width": 2.0}, {"model": "m.st"}
        )
    assert not [r for r in caplog.records if "BLOCKSIZE" in r.getMessage()]
    with rasterio.open(out) as src:
        assert src.crs.to_epsg() == 3035
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.block_shapes == [(COG_BLOCK, COG_BLOCK)] * 4
        assert src.overviews(1) == [2, 4]
        assert np.isnan(src.nodata) and src.dtypes == ("float32",) * 4
        assert src.descriptions == ("soc (g/kg)", "lower 90 %", "upper 90 %", "aoa (1 inside, 0 outside)")
        assert src.units == ("g/kg",) * 3 + (None,)  # the flags have no unit
        assert src.tags()["model"] == "m.st" and src.tags()["unit"] == "g/kg"
        data = src.read()
    first = rasterio.open(parts / "r0000_c0000.tif").read()
    assert np.array_equal(data[:, :256, :256], first, equal_nan=True)
    assert summary["cells_predicted"] == int(np.isfinite(data[0]).sum())
    assert (tmp_path / "map.png").stat().st_size > 1000


def test_predict_map_on_an_epsg_grid_tags_model_config_and_version(finetuned_dir, tmp_path, kit):
    region = tmp_path / "r.geojson"
    region.write_text(json.dumps(shapely.geometry.mapping(shapely.geometry.box(9, 46, 10.5, 47))))
    out = tmp_path / "map.tif"
    predict_map(finetuned_dir, region, 5000.0, out, acquire=kit.field_acquire, tile_size=16, crs="EPSG:3035")
    with rasterio.open(out) as src:
        assert src.crs.to_epsg() == 3035 and src.res == (5000.0, 5000.0)
        tags = src.tags()
    assert {"model", "model_sha256", "config", "code_version"} <= set(tags)
    assert json.loads(tags["config"])["resolution_m"] == 5000.0


def test_a_constant_width_is_drawn_on_a_fixed_range_not_as_float_noise():
    width = np.full((5, 5), 4.0, dtype=np.float32) + np.float32(1e-7) * np.arange(25, dtype=np.float32).reshape(5, 5)
    width[0, 0] = np.nan
    vmin, vmax, note = _limits(width)
    assert vmin is not None and vmax is not None and vmin < 4.0 < vmax and vmax - vmin >= 0.2
    assert "constant 4" in note
    assert _limits(np.arange(4.0))[:2] == (None, None)
    assert _limits(np.full(3, np.nan))[2] == " (no data)"


def test_bf16_prediction_stays_close_to_float32(finetuned_dir, tmp_path, kit):
    region = tmp_path / "r.geojson"
    region.write_text(json.dumps(shapely.geometry.mapping(shapely.geometry.box(9, 46, 10, 46.6))))
    maps = []
    for bf16 in (False, True):
        out = tmp_path / f"map_{bf16}.tif"
        predict_map(finetuned_dir, region, 5000.0, out, acquire=kit.field_acquire, tile_size=16, bf16=bf16)
        with rasterio.open(out) as src:
            maps.append(src.read(1))
    ok = np.isfinite(maps[0])
    assert ok.sum() > 50 and np.array_equal(ok, np.isfinite(maps[1]))
    assert np.allclose(maps[1][ok], maps[0][ok], rtol=0.05)


class LimitedSource:
    """A source that caps the pixels of one window read (as Earth Engine's request size does)."""

    max_window_pixels = 300_000


@pytest.mark.parametrize("resolution", [10.0, 30.0, 250.0, 1000.0])
@pytest.mark.parametrize("source", [object(), LimitedSource()], ids=["no-limit", "pixel-limit"])
def test_a_strip_is_the_most_cell_rows_whose_window_fits_the_budget(resolution, source):
    """``k`` cell rows need ``ceil((k - 1) * step) + patch + 1`` pixel rows of the window's width: the strip takes
    the largest ``k`` within ``max_values`` values and the source's pixel limit, and one more would not fit. At
    least one row: a window over the source's limit is the source's to cut (Earth Engine's request blocks)."""
    n_cols, channels, patch, pixel = 256, 14, 64, 30.0
    acquire = TileAcquire(source, patch, pixel, max_values=8 * 2**20)
    step = resolution / pixel
    width = int(np.ceil((n_cols - 1) * step)) + patch + 1

    def fits(k: int) -> bool:
        height = int(np.ceil((k - 1) * step)) + patch + 1
        limit = getattr(source, "max_window_pixels", np.inf)
        return height * width * channels <= acquire.max_values and height * width <= limit

    k = acquire.strip_rows(n_cols, channels, resolution)
    assert (fits(k) or k == 1) and not fits(k + 1)
