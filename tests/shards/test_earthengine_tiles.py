"""The Earth Engine source on the map's tile path (``read_window``, ``climate_many``), through the real
earthengine-api client, against the fake service (tests/shards/fake_earthengine.py), which checks every request's
grid, bands, filters, masks and size and says which kind of request it got, so the requests per tile are counted."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import shapely.geometry
from affine import Affine
from pyproj import Transformer

from shards.sources.earthengine import (
    COMPOSITE,
    MAX_REQUEST_BANDS,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_SIDE,
    EarthEngineError,
    EarthEngineSource,
    request_blocks,
)
from soilnet.config.pack import EarthEngineConfig
from soilnet.evaluate.maps import default_crs, plan_grid, tile_cells
from soilnet.evaluate.tiles import TileAcquire
from soilnet.jobs.predict_map import predict_map
from soilnet.regions import read_region
from soilnet.schema import CLIMATE_BY_NAME, SampleSchema, compute_indices, month_range

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "evaluate"))
from fake_earthengine import (  # noqa: E402
    SR_BANDS,
    FakeEarthEngine,
    default_climate,
    default_composite,
    make_service_account_key,
)
from labelled_kit import SCHEMA as LABELLED_SCHEMA  # noqa: E402
from labelled_kit import finetuned_dir, labelled_shards, run_packed_from  # noqa: E402, F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
EUROPE = REPO / "configs" / "preprocess" / "europe.yaml"
SCHEMA = SampleSchema()
LAEA_USA = default_crs(shapely.box(-100.0, 40.0, -99.0, 41.0))  # a WKT CRS without an EPSG code


def start_fake(tmp_path: Path, schema: SampleSchema):
    service = FakeEarthEngine(None, 2015, schema.months, schema.climate_variables)
    service.__enter__()
    service.key = tmp_path / "service-account.json"
    service.public_key = make_service_account_key(service.key, service.url + "/token")
    return service


@pytest.fixture
def fake(tmp_path):
    service = start_fake(tmp_path, SCHEMA)
    yield service
    service.__exit__(None, None, None)


def source_for(fake, tmp_path: Path, schema: SampleSchema = SCHEMA, **cfg) -> EarthEngineSource:
    config = EarthEngineConfig(url=fake.url, service_account_key=str(fake.key), project="soil-project", **cfg)
    return EarthEngineSource(schema, config, tmp_path / "budget")


def kinds(fake) -> list[str]:
    return [c["kind"] for c in fake.calls]


def pixel_lonlat(crs, transform: Affine, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x, y = transform.c + cols * transform.a, transform.f + rows * transform.e
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    return np.asarray(lon), np.asarray(lat)


def window_at(crs, lon: float, lat: float, pixel: float = 30.0) -> Affine:
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    return Affine(pixel, 0.0, round(x / pixel) * pixel, 0.0, -pixel, round(y / pixel) * pixel)


def holed(lat_north: float):
    """The default composite with no clear observation (and so DN 0, valid 0) north of ``lat_north``."""

    def composite(lon, lat):
        out = default_composite(lon, lat)
        hole = lat > lat_north
        for b in SR_BANDS:
            out[b][hole] = 0
        out["valid"][hole] = 0
        return out

    return composite


def no_climate(lon, lat):
    """Where :func:`pixel_climate` masks a value: the TerraClimate pixels (1/24 degree) whose centre lies west of
    9.1 E and south of 49.05 N."""
    return ((np.floor(np.asarray(lon) * 24) + 0.5) / 24 < 9.1) & ((np.floor(np.asarray(lat) * 24) + 0.5) / 24 < 49.05)


def pixel_climate(lon: float, lat: float, months, variables) -> dict:
    """Raw values that differ from TerraClimate pixel to pixel; ``pr`` of one month masked in the pixels of
    :func:`no_climate` (as over the sea); ``swe`` 0, a true zero."""
    col, row = int(np.floor((lon + 180) * 24)), int(np.floor((90 - lat) * 24))
    out = default_climate(lon, lat, months, variables)
    for key in out:
        if not key.endswith("_swe"):
            out[key] += 1000 * (col % 7) + 10000 * (row % 5)
    if no_climate(lon, lat):
        out[f"{months[2].replace('-', '')}_pr"] = None
    return out


@pytest.mark.parametrize("crs", ["EPSG:3035", LAEA_USA], ids=["epsg3035", "laea-wkt"])
def test_read_window_is_one_request_on_the_window_grid_with_the_worlds_values(fake, tmp_path, crs):
    lon0, lat0 = (9.0, 49.0) if crs == "EPSG:3035" else (-99.5, 40.5)
    transform, width, height = window_at(crs, lon0, lat0), 120, 90
    lon, lat = pixel_lonlat(crs, transform, width, height)
    north = float(np.median(lat))
    fake.composite_for, fake.expect_crs = holed(north), crs
    image, valid = source_for(fake, tmp_path).read_window(crs, transform, width, height)
    assert fake.violations == [] and kinds(fake) == ["tile"]
    grid = fake.calls[0]["grid"]
    assert grid["dimensions"] == {"width": width, "height": height}
    assert ("crsCode" in grid) == (crs == "EPSG:3035") and grid.get("crsCode", crs) == crs
    t = grid["affineTransform"]
    assert (t["translateX"], t["translateY"], t["scaleX"], t["scaleY"]) == (transform.c, transform.f, 30.0, -30.0)
    world = default_composite(lon, lat)
    np.testing.assert_array_equal(valid, lat <= north)
    reflectance = {b: world[b].astype(np.float32) * 2.75e-5 - 0.2 for b in SR_BANDS}
    expected = {**reflectance, **compute_indices(reflectance, SCHEMA.channels)}
    expected.update(elevation=world["elevation"], slope=world["slope"])
    assert image.shape == (SCHEMA.n_channels, height, width) and image.dtype == np.float32
    for k, name in enumerate(SCHEMA.channels):
        if name in ("elevation", "slope"):
            np.testing.assert_allclose(image[k], expected[name], rtol=1e-6, err_msg=name)
        else:
            assert np.isnan(image[k][~valid]).all(), f"{name} is not NaN where no clear scene was seen"
            np.testing.assert_allclose(image[k][valid], expected[name][valid], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_window_beyond_48_mib_is_cut_into_the_fewest_strips_that_fit(fake, tmp_path):
    width, height = 1700, 1500  # 2.55 M pixels x 23 bytes = 56 MiB: two requests
    assert width * height * COMPOSITE.itemsize > MAX_REQUEST_BYTES
    transform = window_at("EPSG:3035", 9.0, 49.0)
    image, valid = source_for(fake, tmp_path).read_window("EPSG:3035", transform, width, height)
    assert fake.violations == [] and kinds(fake) == ["tile", "tile"]
    rows = [c["grid"]["dimensions"] for c in fake.calls]
    assert rows == [{"width": width, "height": 750}, {"width": width, "height": 750}]
    assert fake.calls[1]["grid"]["affineTransform"]["translateY"] == transform.f - 750 * 30.0
    lon, lat = pixel_lonlat("EPSG:3035", transform, width, height)
    blue = default_composite(lon[::97, ::89], lat[::97, ::89])["SR_B2"] * 2.75e-5 - 0.2
    np.testing.assert_allclose(image[SCHEMA.channels.index("SR_B2"), ::97, ::89], blue, rtol=1e-5, atol=1e-7)
    assert valid.all()


def test_request_blocks_cover_the_window_within_every_limit():
    cases = [(3000, 3000, 23), (10, 40000, 1), (140, 90, 4 * 2688), (1, 1, 23), (33000, 10, 1)]
    for height, width, size in cases:
        blocks = request_blocks(height, width, size)
        covered = np.zeros((height, width), int)
        for rows, cols in blocks:
            h, w = rows.stop - rows.start, cols.stop - cols.start
            assert h * w * size <= MAX_REQUEST_BYTES and max(h, w) <= MAX_REQUEST_SIDE
            covered[rows, cols] += 1
        assert (covered == 1).all()
        fewest = max(
            -(-height * width * size // MAX_REQUEST_BYTES),
            -(-width // MAX_REQUEST_SIDE),
            -(-height // MAX_REQUEST_SIDE),
        )
        assert fewest <= len(blocks) <= fewest + 1, (height, width, size, len(blocks))
    assert len(request_blocks(1479, 1479, 23)) == 1  # the docstring's figure: one request up to 1479 x 1479
    most = EarthEngineSource.max_window_pixels
    assert len(request_blocks(1000, most // 1000, COMPOSITE.itemsize)) == 1
    assert len(request_blocks(1000, most // 1000 + 1, COMPOSITE.itemsize)) == 2


def test_climate_many_is_one_request_that_agrees_with_the_point_request(fake, tmp_path):
    fake.climate_for = pixel_climate
    source = source_for(fake, tmp_path)
    rng = np.random.default_rng(0)
    lon, lat = rng.uniform(9.0, 9.3, 40), rng.uniform(49.0, 49.2, 40)
    climate, ok = source.climate_many(lon, lat)
    assert fake.violations == [] and kinds(fake) == ["climate"]
    grid = fake.calls[0]["grid"]
    assert grid["crsCode"] == "EPSG:4326" and fake.calls[0]["bands"] == SCHEMA.n_months * SCHEMA.n_climate
    assert grid["dimensions"]["width"] * grid["dimensions"]["height"] <= 8 * 6  # the pixels holding the points
    np.testing.assert_array_equal(ok, ~no_climate(lon, lat))
    assert (~ok).any()
    assert climate.shape == (40, *SCHEMA.climate_shape) and climate.dtype == np.float32
    for i in range(0, 40, 7):
        if ok[i]:
            np.testing.assert_array_equal(climate[i], source.climate(float(lon[i]), float(lat[i])), err_msg=str(i))
    swe = SCHEMA.climate_variables.index("swe")
    assert (climate[:, :, swe] == 0).all()
    pr = SCHEMA.climate_variables.index("pr")
    raw = pixel_climate(float(lon[ok][0]), float(lat[ok][0]), SCHEMA.months, SCHEMA.climate_variables)
    assert climate[ok][0, 0, pr] == np.float32(
        raw[f"{SCHEMA.months[0].replace('-', '')}_pr"] * CLIMATE_BY_NAME["pr"].scale
    )
    assert source.climate_many(np.zeros(0), np.zeros(0))[0].shape == (0, *SCHEMA.climate_shape)
    assert kinds(fake).count("climate") == 1  # no request for no cells


def test_more_than_1024_climate_bands_take_one_request_per_1024(tmp_path):
    schema = SampleSchema(months=month_range("2000-01", "2015-12"))  # 192 months x 14 variables = 2688 bands
    fake = start_fake(tmp_path, schema)
    try:
        climate, ok = source_for(fake, tmp_path, schema).climate_many(np.array([9.01, 9.2]), np.array([49.01, 49.1]))
        assert fake.violations == [] and [c["bands"] for c in fake.calls] == [MAX_REQUEST_BANDS, 1024, 640]
        assert ok.all()
        expected = [
            [
                (100 * (t + 1) + f) * CLIMATE_BY_NAME[v].scale * (v != "swe")
                for f, v in enumerate(schema.climate_variables)
            ]
            for t in range(schema.n_months)
        ]
        np.testing.assert_allclose(climate[1], expected, rtol=1e-6)
    finally:
        fake.__exit__(None, None, None)


def test_a_tile_through_tile_acquire_is_one_image_request_per_strip_and_one_climate_request(fake, tmp_path):
    fake.climate_for = pixel_climate
    schema = SampleSchema(patch_size=16)
    source = source_for(fake, tmp_path, schema)
    crs, resolution = "EPSG:3035", 300.0
    x0, y0 = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(9.15, 49.15)
    xs, ys = x0 + resolution * (np.arange(12) + 0.5), y0 - resolution * (np.arange(10) + 0.5)
    inside = np.ones((10, 12), bool)
    inside[0, :3] = False
    xx, yy = np.meshgrid(xs, ys)
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(xx[inside], yy[inside])
    cells = int(inside.sum())
    for max_values in (64 * 2**20, 60_000):
        fake.calls.clear()
        acquire = TileAcquire(source, schema.patch_size, schema.pixel_size_m, batch_size=32, max_values=max_values)
        strips = -(-len(ys) // acquire.strip_rows(len(xs), schema.n_channels, resolution))
        assert strips == 1 or max_values < 64 * 2**20 and strips > 1
        batches = list(acquire.batches(crs, xs, ys, inside, np.asarray(lon), np.asarray(lat)))
        assert fake.violations == []
        assert (
            kinds(fake).count("tile") == strips and kinds(fake).count("climate") == 1 and len(fake.calls) == strips + 1
        )
        assert sum(len(idx) for idx, *_ in batches) == cells
        assert all(ok.all() for *_, ok in batches) and batches[0][1].shape[1:] == schema.image_shape


def test_errors_name_the_window_or_the_cells_and_the_http_status(fake, tmp_path):
    source = source_for(fake, tmp_path, max_retries=0)
    transform = window_at("EPSG:3035", 9.0, 49.0)
    fake.faults = [400]
    with pytest.raises(EarthEngineError) as err:
        source.read_window("EPSG:3035", transform, 50, 40)
    message = str(err.value)
    assert "HTTP 400" in message and "injected HTTP 400" in message
    assert f"x {transform.c:.1f}..{transform.c + 1500:.1f}, y {transform.f - 1200:.1f}..{transform.f:.1f}" in message
    assert "in EPSG:3035 (lon 9.0001..9.0208, lat 48.9893..49.0003)" in message
    fake.faults = [503]
    with pytest.raises(EarthEngineError, match=r"climate of 2 cells .*lat 49\.0000\.\.49\.1000.*HTTP 503"):
        source.climate_many(np.array([9.0, 9.1]), np.array([49.0, 49.1]))
    fake.faults = [429, 503]
    retried = source_for(fake, tmp_path, max_retries=2)
    assert retried.read_window("EPSG:3035", transform, 50, 40)[1].all()  # the client's own retries


def ee_checkpoint(finetuned: Path, fake, tmp_path: Path) -> Path:
    """The fine-tuning run, as if its shards had been packed from Earth Engine (the fake)."""
    overrides = [
        f"source.earthengine.url={fake.url}",
        f"source.earthengine.service_account_key={fake.key}",
        "source.earthengine.project=soil-project",
        f"source.earthengine.budget_dir={tmp_path / 'budget'}",
    ]
    return run_packed_from(finetuned, EUROPE, overrides, tmp_path / "from-ee")


def map_cells(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The map's prediction band and the lon/lat of its cells' centres."""
    with rasterio.open(out) as cog:
        prediction, transform, crs = cog.read(1), cog.transform, cog.crs
    rows, cols = np.indices(prediction.shape)
    x, y = transform.c + (cols + 0.5) * transform.a, transform.f + (rows + 0.5) * transform.e
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    return prediction, np.asarray(lon), np.asarray(lat)


def test_predict_map_from_earth_engine_takes_the_tile_path_two_requests_per_tile(finetuned_dir, tmp_path):  # noqa: F811
    fake = start_fake(tmp_path, LABELLED_SCHEMA)
    try:
        fake.composite_for, fake.climate_for, fake.expect_crs = holed(49.1), pixel_climate, "EPSG:3035"
        run = ee_checkpoint(finetuned_dir, fake, tmp_path)
        box = shapely.box(9.0, 49.0, 9.2, 49.14)
        region = tmp_path / "box.geojson"
        region.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(box)}))
        out = tmp_path / "map.tif"
        grid, projected = plan_grid(read_region(region), 2000.0, 4, "EPSG:3035")
        with_cells = [(r, c) for r, c in grid.tiles() if tile_cells(grid, projected, r, c)[0].any()]
        cells = sum(int(tile_cells(grid, projected, r, c)[0].sum()) for r, c in grid.tiles())
        assert len(with_cells) >= 4

        fake.fault_on_call = {5: 400}  # each tile asks climate, then image: the third tile's image request fails
        with pytest.raises(EarthEngineError, match="HTTP 400: injected HTTP 400") as err:
            predict_map(run, region, 2000.0, out, tile_size=4, crs="EPSG:3035")
        window = re.search(
            r"window \d+ x \d+ px at x ([\d.]+)\.\.([\d.]+), y ([\d.]+)\.\.([\d.]+) in EPSG:3035", str(err.value)
        )
        assert window, str(err.value)
        x, y = (float(window[1]) + float(window[2])) / 2, (float(window[3]) + float(window[4])) / 2
        row, col = with_cells[2]
        size = grid.tile_size * grid.resolution
        assert (
            grid.x0 + col * size < x < grid.x0 + (col + 1) * size
            and grid.y0 - (row + 1) * size < y < grid.y0 - row * size
        )

        fake.calls.clear()
        summary = predict_map(run, region, 2000.0, out, tile_size=4, crs="EPSG:3035")  # the rerun carries on
        assert summary["complete"] and summary["assembled"] and fake.violations == []
        assert kinds(fake) == ["climate", "tile"] * (len(with_cells) - 2)  # 2 requests per tile left, not per cell
        assert 2 * len(with_cells) < cells
        prediction, lon, lat = map_cells(out)
        inside = shapely.contains_xy(box.buffer(-0.005), lon, lat)
        masked = no_climate(lon, lat)
        assert np.isfinite(prediction[inside & (lat < 49.095) & ~masked]).all()
        assert np.isnan(prediction[inside & masked]).all() and (inside & masked).any()
        assert np.isnan(prediction[lat > 49.105]).all() and (inside & (lat > 49.105)).any()  # the composite's hole
    finally:
        fake.__exit__(None, None, None)
