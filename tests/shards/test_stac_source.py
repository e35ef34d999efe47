"""The STAC source on real HTTP (nginx with range requests, the fake STAC API): scene choice, masking, lineage,
rejections, the climate store, bad catalogues and asset keys, the per-host limit, and identity with the
local-raster source reading the same scene from disk."""

from __future__ import annotations

import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from shards.pack import make_sample
from shards.sources import cog_reader
from shards.sources.base import Rejected
from shards.sources.cog_reader import EXACT, AssetReader, warp_shift
from shards.sources.rasters import RasterSource
from shards.sources.stac import StacSource, slope_degrees
from shards.sources.stac_catalog import AssetMissing
from shards.sources.transport import HostLimit, load_hook, redact, transient
from soilnet.config import load_config
from soilnet.config.base import ConfigError
from soilnet.config.pack import PackConfig, StacConfig
from soilnet.schema import SampleSchema, compute_indices

REPO = Path(__file__).resolve().parents[2]
BILINEAR = Resampling.bilinear
sys.path.insert(0, str(Path(__file__).parent))
from cog_kit import corner_point, local_rasters, write_cog  # noqa: E402
from fake_stac import LANDSAT_COLLECTION, landsat_item  # noqa: E402
from test_stac_world import CENTRE, CLOUD_ROWS, SATURATED_ROWS, SCHEMA, build, serving  # noqa: E402
from zarr_kit import climate_geotiffs  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with serving(build(tmp_path_factory.mktemp("stac-world"))) as w:
        yield w


def source(world, schema: SampleSchema = SCHEMA, **settings) -> StacSource:
    cfg = StacConfig(url=world.stac.url, climate_store=world.server.href(world.store.path), **settings)
    return StacSource(schema, cfg)


def test_the_clearest_winter_scene_else_the_lowest_ndvi_with_one_search_per_group(world):
    world.stac.searches.clear()
    src = source(world)
    clouds, clear, bare = (src.patch(*world.points[n]) for n in ("clouds", "clear", "bare"))
    assert (clouds.qa["scene"], clouds.qa["rule"]) == (world.scenes["A1"].id, "winter")
    assert (clear.qa["scene"], clear.qa["rule"]) == (world.scenes["A1"].id, "winter")  # A3 as clear, but later
    assert clear.scene_date == "2015-01-10" and clear.qa["clear_fraction"] == 1.0
    assert (bare.qa["scene"], bare.qa["rule"], bare.scene_date) == (world.scenes["B3"].id, "lowest_ndvi", "2015-08-10")
    assert bare.qa["scenes_considered"] == 4
    landsat = [s for s in world.stac.first_searches() if s["collections"] == [LANDSAT_COLLECTION]]
    assert len(landsat) == 2  # three points, two cells: one search each
    assert {s["datetime"] for s in landsat} == {"2015-01-01T00:00:00Z/2015-12-31T23:59:59Z"}
    assert world.stac.violations == []


def test_clouds_and_saturation_are_nan_and_scaled_like_earth_engine(world):
    patch = source(world).patch(*world.points["clouds"])
    scene = world.scenes["A1"]
    window = (slice(CENTRE - 32, CENTRE + 32), slice(CENTRE - 32, CENTRE + 32))
    expected_nan = np.zeros((64, 64), dtype=bool)
    for r0, r1 in (CLOUD_ROWS, SATURATED_ROWS):
        expected_nan[r0 - (CENTRE - 32) : r1 - (CENTRE - 32)] = True
    image = patch.image
    assert (np.isnan(image[0]) == expected_nan).all()
    assert patch.qa["clear_fraction"] == round(1 - expected_nan.mean(), 4) == 0.8125
    reflectance = scene.reflectance()[(slice(None), *window)]
    for k in range(7):
        np.testing.assert_array_equal(image[k][~expected_nan], reflectance[k][~expected_nan])
    layers = {f"SR_B{k + 1}": reflectance[k] for k in range(7)}
    ndvi = compute_indices(layers, ("NDVI",))["NDVI"]
    np.testing.assert_array_equal(image[SCHEMA.channels.index("NDVI")][~expected_nan], ndvi[~expected_nan])
    elevation, slope = (image[SCHEMA.channels.index(c)] for c in ("elevation", "slope"))
    assert np.isfinite(elevation).all() and 250 < elevation.mean() < 2500 and (slope >= 0).all() and slope.max() < 45


def test_lineage_names_the_item_its_asset_hrefs_and_the_dem_tiles(world):
    patch = source(world).patch(*world.points["clear"])
    scene = world.scenes["A1"]
    assert patch.qa["scene"] == scene.id and patch.qa["collection"] == LANDSAT_COLLECTION
    assert patch.qa["assets"] == {band: world.server.href(path) for band, path in scene.files.items()}
    assert patch.qa["dem"] and all(h.startswith(world.server.url) and h.endswith(".tif") for h in patch.qa["dem"])


def test_rejections_have_the_other_sources_reasons(world):
    src = source(world)
    for name, reason in (("cloudy", "cloud"), ("nowhere", "no_scene")):
        with pytest.raises(Rejected) as err:
            src.patch(*world.points[name])
        assert err.value.reason == reason, name
    src.patch(*world.points["sea"])  # the patch is fine; its TerraClimate cell is not
    with pytest.raises(Rejected) as err:
        src.climate(*world.points["sea"])
    assert err.value.reason == "nodata" and "TerraClimate has no aet" in err.value.detail


def test_climate_is_one_read_per_chunk_zeros_stay_zero_and_values_match_the_store(world):
    src = source(world)
    got = {n: src.climate(*world.points[n]) for n in ("clouds", "clear", "cloudy")}
    store = world.store
    for name, climate in got.items():
        lon, lat = world.points[name]
        for f, var in enumerate(SCHEMA.climate_variables):
            want = [store.value(var, m, lon, lat) for m in SCHEMA.months]
            np.testing.assert_allclose(climate[:, f], want, rtol=1e-6, err_msg=f"{name} {var}")
    assert (got["clear"][:, SCHEMA.climate_variables.index("swe")] == 0).all()
    assert src.climate_store.chunks.loads == len(SCHEMA.climate_variables)  # the three points share one spatial chunk


def test_the_same_scene_through_stac_and_through_local_rasters_gives_the_same_samples(world, tmp_path):
    """Bit for bit after float16 at a point whose grid is aligned with the scene's (both sources sample the same
    pixels; the STAC source warps exactly, so a pixel does not depend on the window). Between pixel centres both
    interpolate bilinearly, the DN (as float32) here and the reflectance there: equal to float32 rounding (1e-7).
    The indices, elevation and slope then differ by resampling: the local rasters interpolate indices and a DEM
    already warped once onto the scene grid, the STAC source computes indices from interpolated bands and warps
    the DEM tiles once (docs/shards.md: here within 1e-4, 0.05 m and 0.05 degrees)."""
    images = local_topography_rasters(world, tmp_path)
    climate = climate_geotiffs(world.store, tmp_path / "climate")
    local = RasterSource(SCHEMA, images, climate)
    stac = source(world)
    lon, lat = world.points["clear"]
    a = make_sample(stac, SCHEMA, "p", lon, lat, "reject")
    b = make_sample(local, SCHEMA, "p", lon, lat, "reject")
    assert a["image.npy"].tobytes() == b["image.npy"].tobytes()
    assert a["climate.npy"].tobytes() == b["climate.npy"].tobytes()
    off = lon + 0.00011, lat - 0.00007  # about 8 m east and south: between pixel centres
    got, want = stac.patch(*off).image, local.patch(*off).image
    sr = [SCHEMA.channels.index(f"SR_B{k}") for k in range(1, 8)]
    np.testing.assert_allclose(got[sr], want[sr], rtol=0, atol=1e-7)
    for channels, atol in (
        (("clayIndex", "ferrousIndex", "carbonateIndex", "rockOutcropIndex", "NDVI"), 1e-4),
        (("elevation",), 0.05),
        (("slope",), 0.05),
    ):
        k = [SCHEMA.channels.index(c) for c in channels]
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=atol, err_msg=str(channels))


def local_topography_rasters(world, tmp_path: Path) -> list:
    """Scene A1 and the DEM as the local-raster source reads them: cog_kit's reflectance and indices, and
    elevation and slope warped exactly (GDAL's transformer without approximation, as the STAC source reads)."""
    scene = world.scenes["A1"]
    spectral = SampleSchema(channels=tuple(c for c in SCHEMA.channels if c not in ("elevation", "slope")))
    images = local_rasters(scene, world.tiles, tmp_path / "local", spectral)
    z = np.full(scene.shape, np.nan, dtype=np.float64)
    for tile in sorted(world.tiles, key=lambda t: t.id):
        with (
            rasterio.open(tile.path) as src,
            WarpedVRT(
                src,
                crs=scene.crs,
                transform=scene.transform,
                width=scene.shape[1],
                height=scene.shape[0],
                resampling=Resampling.bilinear,
                nodata=np.nan,
                **EXACT,
            ) as vrt,
        ):
            z = np.where(np.isnan(z), vrt.read(1).astype(np.float64), z)
    path = tmp_path / "local" / "topography.tif"
    write_cog(path, np.stack([z, slope_degrees(z, 30.0)]).astype(np.float32), scene.crs, scene.transform, np.nan)
    return [*images, (path, ["elevation", "slope"])]


def test_a_wrong_collection_or_an_unreachable_catalogue_is_one_error_naming_url_and_collection(world):
    with pytest.raises(ConfigError) as err:
        source(world, collection="landsat-c2-l1")
    assert world.stac.url in str(err.value) and "'landsat-c2-l1'" in str(err.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/api/stac/v1"
    with pytest.raises(ConfigError) as err:
        StacSource(SCHEMA, StacConfig(url=dead, climate_store=str(world.store.path), max_retries=0))
    assert dead in str(err.value) and "'landsat-c2-l2'" in str(err.value)


def test_an_asset_key_missing_from_an_item_is_an_error_naming_the_key_and_the_item(world):
    scene = world.scenes["B3"]
    item = landsat_item(scene, world.server.href, collection="landsat-no-qa")
    del item["assets"]["qa_radsat"]
    world.stac.add("landsat-no-qa", [item])
    with pytest.raises(AssetMissing) as err:
        source(world, collection="landsat-no-qa").patch(*world.points["bare"])
    assert f"item {scene.id} has no asset 'qa_radsat' (source.stac.assets.QA_RADSAT)" in str(err.value)


def test_urls_lose_their_tokens_and_passwords_in_every_message():
    text = "GET https://user:pw@acc.blob.core.windows.net/c/LC08_SR_B4.TIF?st=2026&sig=abc%3D failed: HTTP 503"
    assert redact(text) == "GET https://acc.blob.core.windows.net/c/LC08_SR_B4.TIF?<redacted> failed: HTTP 503"
    assert transient(OSError("HTTP response code: 503")) and not transient(OSError("not a TIFF file"))


def test_europe_stac_samples_europe_as_the_earth_engine_config_does():
    stac, ee = (
        load_config(PackConfig, REPO / "configs/preprocess" / name, []) for name in ("europe_stac.yaml", "europe.yaml")
    )
    assert stac.sampling == ee.sampling and stac.shard == ee.shard and stac.schema_ == ee.schema_
    assert stac.source.kind == "stac" and stac.source.stac.year == ee.source.earthengine.year
    assert stac.source.stac.winter_months == ee.source.earthengine.winter_months
    assert stac.source.stac.min_clear_fraction == ee.source.earthengine.min_clear_fraction
    sign = load_hook(stac.source.stac.sign)  # planetary-computer is a dependency: the config works as written
    assert sign("http://127.0.0.1:1/scene/SR_B1.tif") == "http://127.0.0.1:1/scene/SR_B1.tif"  # not Azure: unsigned


def env_sign(href: str) -> str:
    """A signing hook whose token the test rotates (``SOILNET_TEST_TOKEN``), as expiring SAS tokens are."""
    return f"{href}?token={os.environ['SOILNET_TEST_TOKEN']}"


def test_a_file_whose_signature_expired_is_signed_and_opened_anew(world, monkeypatch):
    scene = world.scenes["B2"]  # described, never chosen: these tiles of SR_B1 are read here first
    pattern, href = f"*/{scene.files['SR_B1'].name}", world.server.href(scene.files["SR_B1"])
    reader = AssetReader(load_hook("test_stac_source.env_sign"), HostLimit(4), 0, 0.0)
    grid = source(world).grid
    try:
        monkeypatch.setenv("SOILNET_TEST_TOKEN", "t1")
        world.server.require_query(pattern, "token", "t1")
        reader.read(href, grid(*corner_point(scene.crs, scene.transform, 64, 64)), Resampling.bilinear, nodata=0)
        world.server.clear_faults()
        world.server.require_query(pattern, "token", "t2")  # the first token expired
        monkeypatch.setenv("SOILNET_TEST_TOKEN", "t2")
        world.server.reset_log()
        got = reader.read(href, grid(*corner_point(scene.crs, scene.transform, 448, 448)), Resampling.bilinear, 0)
    finally:
        world.server.clear_faults()
    statuses = [r.status for r in world.server.requests_to(pattern)]
    assert 403 in statuses and statuses[-1] in (200, 206)
    np.testing.assert_array_equal(got, scene.dn[0, 416:480, 416:480])


def test_threads_reading_neighbouring_patches_share_each_block_and_get_its_exact_pixels(world):
    """Eight threads, eight overlapping patches inside one 256 x 256 block of one band: the block is fetched and
    decoded once, and every patch is the scene's pixels (the grids are aligned: nearest and bilinear agree)."""
    scene = world.scenes["A1"]
    href = world.server.href(scene.files["SR_B1"])
    reader = AssetReader(lambda h: h, HostLimit(4), 0, 0.0)
    grid = source(world).grid
    corners = [(100 + 7 * k, 120 + 5 * k) for k in range(8)]

    def read(corner: tuple[int, int]) -> np.ndarray:
        return reader.read(href, grid(*corner_point(scene.crs, scene.transform, *corner)), BILINEAR, 0)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(read, corners))
    assert reader.blocks.loads == 1
    for (r, c), patch in zip(corners, got, strict=True):
        np.testing.assert_array_equal(patch, scene.dn[0, r - 32 : r + 32, c - 32 : c + 32])


def test_a_gdal_memory_dataset_name_is_never_opened_as_an_asset(world):
    reader = AssetReader(lambda h: h, HostLimit(1), 0, 0.0)
    grid = source(world).grid(*world.points["clear"])
    with pytest.raises(OSError, match="not a file or URL"):
        reader.read("MEM:::DATAPOINTER=0x1000,PIXELS=64,LINES=64", grid, BILINEAR, 0)


def test_a_shift_within_the_scenes_crs_warps_as_gdal_does(world, monkeypatch):
    """A patch grid in the scene's CRS at its pixel size is a shift of the scene: warped without GDAL, nearest
    takes GDAL's pixels and bilinear GDAL's values to float32 rounding, at any sub-pixel offset."""
    scene = world.scenes["A2"]
    hrefs = [world.server.href(scene.files[b]) for b in ("SR_B1", "SR_B5", "QA_PIXEL")]
    source(world)  # GDAL's HTTP settings, as the source sets them
    reader = AssetReader(lambda h: h, HostLimit(4), 0, 0.0)
    rng = np.random.default_rng(0)
    grids = [(scene.crs, scene.transform @ Affine.translation(*rng.uniform(150, 300, 2)), 64, 64) for _ in range(6)] + [
        (scene.crs, scene.transform @ Affine.translation(200, 210), 64, 64)
    ]  # aligned
    shifts: list = []
    monkeypatch.setattr(cog_reader, "warp_shift", lambda *a: shifts.append(warp_shift(*a)) or shifts[-1])
    fast = [
        (reader.read_bands(hrefs[:2], g, BILINEAR, 0), reader.read(hrefs[2], g, Resampling.nearest, 1)) for g in grids
    ]
    assert len(shifts) == 2 * len(grids) and all(s is not None for s in shifts)  # no GDAL warp
    monkeypatch.setattr(cog_reader, "warp_shift", lambda *a: None)  # GDAL warps every one
    for g, (bilinear, nearest) in zip(grids, fast, strict=True):
        np.testing.assert_allclose(bilinear, reader.read_bands(hrefs[:2], g, BILINEAR, 0), rtol=1e-7, atol=0)
        np.testing.assert_array_equal(nearest, reader.read(hrefs[2], g, Resampling.nearest, 1))
    np.testing.assert_array_equal(fast[-1][0][0], scene.dn[0, 210:274, 200:264])
