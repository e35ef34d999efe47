"""Local-raster source: real GeoTIFF / COG files in other CRSs, reprojected windows, edges, nodata, corrupt files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.transform import from_origin

from shards.pack import pack
from shards.parallel import Workers
from shards.sources.base import Rejected
from shards.sources.rasters import RasterSource
from soilnet.config.base import load_config
from soilnet.config.pack import PackConfig
from soilnet.evaluate.maps import Grid, MapError, tile_bands, tile_centres
from soilnet.evaluate.tiles import TileAcquire
from soilnet.jobs.predict_map import check_overlap
from soilnet.schema import SampleSchema, month_range

CHANNELS = ["SR_B4", "SR_B5"]
VARS = ["pr", "tmmx"]
FIRST, LAST = "2014-01", "2014-06"


def _write(path, data, crs, transform, nodata=None, **extra):
    count, h, w = data.shape
    with rasterio.open(
        path,
        "w",
        driver=extra.pop("driver", "GTiff"),
        width=w,
        height=h,
        count=count,
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
        **extra,
    ) as dst:
        dst.write(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Mosaic in LAEA Europe (EPSG:3035, 30 m, values = easting in km and 0.5), climate COG in EPSG:4326."""
    d = tmp_path_factory.mktemp("rasters")
    x0, y0, px, n = 4_300_000.0, 2_700_000.0, 30.0, 1000
    xs = x0 + px * (np.arange(n) + 0.5)
    b4 = np.broadcast_to((xs / 1000.0).astype(np.float32), (n, n)).copy()
    b4[600:700, 600:700] = -9999.0  # a nodata hole
    b5 = np.full((n, n), 0.5, dtype=np.float32)
    _write(
        d / "mosaic.tif",
        np.stack([b4, b5]),
        "EPSG:3035",
        from_origin(x0, y0, px, px),
        nodata=-9999.0,
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    months = month_range("2013-12", "2014-12")  # a stack starting one month before the schema's first month
    ppt = np.stack([np.full((60, 60), 10 * (i + 1), dtype=np.int16) for i in range(len(months))])
    tmmx = np.stack([np.full((60, 60), 100 + i, dtype=np.int16) for i in range(len(months))])
    geo = from_origin(8.0, 49.0, 0.05, 0.05)
    _write(d / "pr.tif", ppt, "EPSG:4326", geo, nodata=-32768, driver="COG")
    _write(d / "tmmx.tif", tmmx, "EPSG:4326", geo, nodata=-32768, driver="COG")
    (d / "corrupt.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    to_geo = Transformer.from_crs("EPSG:3035", "EPSG:4326", always_xy=True)
    return {"dir": d, "x0": x0, "y0": y0, "size": n * px, "to_geo": to_geo}


def _schema():
    return SampleSchema(channels=tuple(CHANNELS), climate_variables=tuple(VARS), months=month_range(FIRST, LAST))


def _source(world, images=None):
    d = world["dir"]
    images = images or [(d / "mosaic.tif", CHANNELS)]
    climate = [(d / "pr.tif", "pr", "2013-12", 1.0), (d / "tmmx.tif", "tmmx", "2013-12", 0.1)]
    return RasterSource(_schema(), images, climate, scene_date="2014-03-01")


def _lonlat(world, fx, fy):
    return world["to_geo"].transform(world["x0"] + fx * world["size"], world["y0"] - fy * world["size"])


def test_patch_is_reprojected_onto_the_local_utm_grid(world):
    src = _source(world)
    lon, lat = _lonlat(world, 0.3, 0.3)
    patch = src.patch(lon, lat)
    assert patch.image.shape == (2, 64, 64) and patch.image.dtype == np.float32
    assert patch.qa["crs"].startswith("EPSG:326")
    # B4 = LAEA easting in km: the patch centre reads the point's own easting; across 64 x 30 m it spans ~1.9 km.
    x, _ = Transformer.from_crs("EPSG:4326", "EPSG:3035", always_xy=True).transform(lon, lat)
    centre = patch.image[0, 31:33, 31:33].mean()
    assert abs(centre - x / 1000.0) < 0.05
    assert 1.7 < np.ptp(patch.image[0]) < 2.1
    np.testing.assert_allclose(patch.image[1], 0.5)
    clim = src.climate(lon, lat)
    assert clim.shape == (6, 2)
    np.testing.assert_allclose(clim[:, 0], [20, 30, 40, 50, 60, 70])  # the stack starts at 2013-12
    np.testing.assert_allclose(clim[:, 1], [10.1, 10.2, 10.3, 10.4, 10.5, 10.6], rtol=1e-6)


def test_edges_and_nodata_are_rejected(world):
    src = _source(world)
    with pytest.raises(Rejected) as err:
        src.patch(*_lonlat(world, 0.001, 0.5))  # 30 m from the west edge: the 1.9 km footprint leaves the raster
    assert err.value.reason == "outside"
    with pytest.raises(Rejected) as err:
        src.patch(*_lonlat(world, 0.65, 0.65))
    assert err.value.reason == "nodata"


def test_pack_from_rasters_records_a_corrupt_file_and_goes_on(world, tmp_path):
    d = world["dir"]
    pts = [("a", 0.3, 0.3), ("b", 0.4, 0.2), ("edge", 0.001, 0.5), ("hole", 0.65, 0.65), ("c", 0.2, 0.8)]
    rows = [(pid, *_lonlat(world, fx, fy)) for pid, fx, fy in pts]
    pd.DataFrame(rows, columns=["id", "lon", "lat"]).to_csv(tmp_path / "points.csv", index=False)
    cfg_path = tmp_path / "rasters.yaml"
    cfg_path.write_text(
        json.dumps(
            {
                "output_dir": str(tmp_path / "out"),
                "schema": {"channels": CHANNELS, "climate_variables": VARS, "first_month": FIRST, "last_month": LAST},
                "sampling": {"points": str(tmp_path / "points.csv")},
                "source": {
                    "kind": "rasters",
                    "rasters": {
                        "images": [{"path": str(d / "mosaic.tif"), "bands": CHANNELS}],
                        "climate": [
                            {"path": str(d / "pr.tif"), "variable": "pr", "first_month": "2013-12"},
                            {"path": str(d / "tmmx.tif"), "variable": "tmmx", "first_month": "2013-12", "scale": 0.1},
                        ],
                    },
                },
                "shard": {"max_samples": 2},
            }
        )
    )
    cfg = load_config(PackConfig, cfg_path)
    manifest = pack(cfg, Workers(0, 1))
    assert manifest["samples"] == 3 and len(manifest["shards"]) == 3
    ledger = [json.loads(line) for line in (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in ledger} == {"edge": "outside", "hole": "nodata"}
    assert manifest["sources"]["kind"] == "rasters" and "gdal" in manifest["sources"]["versions"]

    # A corrupt mosaic: every point fails with an error naming the file, and the run still completes.
    cfg.output_dir = str(tmp_path / "out2")
    cfg.source.rasters.images[0].path = str(d / "corrupt.tif")
    manifest = pack(cfg, Workers(0, 1))
    assert manifest["samples"] == 0
    ledger = [json.loads(line) for line in (tmp_path / "out2" / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 5 and all(r["reason"] == "error" and "corrupt.tif" in r["detail"] for r in ledger)


def test_missing_channel_is_a_clear_error(world):
    with pytest.raises(ValueError, match=r"no file provides the channels \['SR_B5'\]"):
        _source(world, images=[(world["dir"] / "mosaic.tif", ["SR_B4", "SR_B2"])])


def test_example_config_loads(repo_root):
    cfg = load_config(PackConfig, repo_root / "configs" / "preprocess" / "rasters.yaml")
    assert cfg.source.kind == "rasters" and cfg.source.rasters.images


def test_vrt_mosaic_reads_like_its_geotiff(world, tmp_path):
    d = world["dir"]
    with rasterio.open(d / "mosaic.tif") as src:
        w, h, t = src.width, src.height, src.transform
        crs_wkt = src.crs.to_wkt()
    bands = "".join(
        f'<VRTRasterBand dataType="Float32" band="{b}"><NoDataValue>-9999</NoDataValue><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{d / "mosaic.tif"}</SourceFilename><SourceBand>{b}</SourceBand>'
        f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/><DstRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
        "</SimpleSource></VRTRasterBand>"
        for b in (1, 2)
    )
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text(
        f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}"><SRS>{crs_wkt}</SRS>'
        f"<GeoTransform>{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}</GeoTransform>{bands}</VRTDataset>"
    )
    lon, lat = _lonlat(world, 0.4, 0.2)
    via_vrt = _source(world, images=[(vrt, CHANNELS)]).patch(lon, lat).image
    np.testing.assert_array_equal(via_vrt, _source(world).patch(lon, lat).image)


def test_read_window_and_climate_many_serve_the_map_tile_path(world):
    """A window on the mosaic's own grid reads its values; the nodata hole and the outside are invalid; the climate
    of many points in one read per variable equals the per-point climate."""
    src = _source(world)
    x0, y0 = world["x0"], world["y0"]
    image, valid = src.read_window("EPSG:3035", from_origin(x0 + 17_970, y0 - 17_970, 30.0, 30.0), 80, 80)
    assert image.shape == (2, 80, 80) and image.dtype == np.float32
    xs = x0 + 17_970 + 30 * (np.arange(80) + 0.5)
    # rows and columns 599..678 of the mosaic, whose nodata hole is rows and columns 600..699
    assert not valid[2:, 2:].any() and valid[0].all() and valid[:, 0].all()
    assert np.allclose(image[0, 0], xs / 1000.0, atol=1e-3) and np.allclose(image[1][valid], 0.5)
    _, outside = src.read_window("EPSG:3035", from_origin(x0 - 600, y0, 30.0, 30.0), 40, 10)
    assert not outside[:, :20].any() and outside[:, 21:].all()
    lon, lat = _lonlat(world, np.array([0.2, 0.5, 0.8]), np.array([0.3, 0.6, 0.1]))
    many, cok = src.climate_many(np.asarray(lon), np.asarray(lat))
    assert cok.all()
    assert np.array_equal(many, np.stack([src.climate(x, y) for x, y in zip(lon, lat, strict=True)]))
    _, far = src.climate_many(np.array([20.0, lon[0]]), np.array([60.0, lat[0]]))
    assert far.tolist() == [False, True]


def test_map_tile_path_centres_patches_and_masks_cells_without_data(world):
    """The tile path over the mosaic (a 300 m grid in its own CRS, reaching past its west edge): each cell's patch
    is centred on the cell (band 1 is easting in km), cells whose patch leaves the mosaic or meets its nodata hole
    are NaN."""
    src = _source(world)
    s = src.schema
    x0, y0 = world["x0"], world["y0"]
    grid = Grid("EPSG:3035", x0 - 3000.0, y0 - 3000.0, 300.0, 90, 60, 32)
    region = shapely.geometry.box(x0 - 3000.0, y0 - 21000.0, x0 + 24000.0, y0 - 3000.0)
    tiles = TileAcquire(src, s.patch_size, s.pixel_size_m, batch_size=100, max_values=2_000_000, image_dtype=np.float32)

    def predict(image, climate):
        return image[:, 0].astype(np.float64).mean(axis=(1, 2))

    half = s.patch_size * s.pixel_size_m / 2
    hole = (x0 + 18_000.0 - half, x0 + 21_000.0 + half, y0 - 21_000.0 - half, y0 - 18_000.0 + half)
    for row, col in grid.tiles():
        bands, counts = tile_bands(grid, region, row, col, tiles, predict, 1.0, "original")
        xs, ys = tile_centres(grid, row, col)
        xx, yy = np.meshgrid(xs, ys)
        off = (xx - half < x0) | ((xx > hole[0]) & (xx < hole[1]) & (yy > hole[2]) & (yy < hole[3]))
        assert np.isnan(bands[0][off]).all()
        assert np.allclose(bands[0][~off], xx[~off] / 1000.0, atol=1e-3)
        assert counts["failed"] == int(off.sum())


def test_a_region_off_the_rasters_is_refused_naming_both_bounds(world):
    src = _source(world)
    w, s, e, n = src.bounds_lonlat()
    lon, lat = _lonlat(world, 0.5, 0.5)
    assert w < lon < e and s < lat < n
    check_overlap(shapely.geometry.box(lon - 0.01, lat - 0.01, lon + 0.01, lat + 0.01), src)
    with pytest.raises(MapError, match=r"region \(lon 20\.0000\.\.21\.0000.*does not overlap the rasters \(lon "):
        check_overlap(shapely.geometry.box(20, 60, 21, 61), src)
