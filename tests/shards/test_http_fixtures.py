"""The STAC tests' own fixtures: nginx answering range requests behind the delaying, fault-injecting proxy
(http_server.py), the fake STAC API (fake_stac.py), and the COG and Zarr builders (cog_kit.py, zarr_kit.py)."""

from __future__ import annotations

import http.client
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pystac_client
import pytest
import rasterio
import xarray as xr

from soilnet.schema import SampleSchema

sys.path.insert(0, str(Path(__file__).parent))
import http_server  # noqa: E402
from cog_kit import (  # noqa: E402
    QA_CLEAR,
    QA_CLOUD,
    QA_FILL,
    corner_point,
    dem_covering,
    landsat_scene,
    local_rasters,
    scene_grid,
)
from fake_stac import DEM_COLLECTION, LANDSAT_ASSET_KEYS, LANDSAT_COLLECTION, FakeStac, dem_item, landsat_item  # noqa: E402
from http_server import serve_directory  # noqa: E402
from zarr_kit import FILL, TERRACLIMATE_NAMES, climate_geotiffs, terraclimate_zarr  # noqa: E402

SCHEMA = SampleSchema()
LON, LAT = 8.5, 47.2


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def blob(tmp_path):
    """A server of ``data/blob.bin`` (200 kB of random bytes), without delay."""
    data = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "blob.bin").write_bytes(data)
    with serve_directory(tmp_path) as server:
        yield server, data


# -- nginx and the proxy ---------------------------------------------------------------------------------------


def test_a_range_request_gets_206_with_exactly_those_bytes_from_nginx_and_through_the_proxy(blob):
    server, data = blob
    for base in (server.origin_url, server.url):
        status, headers, body = get(base + "/data/blob.bin", {"Range": "bytes=1000-5095"})
        assert status == 206
        assert headers["Content-Range"] == f"bytes 1000-5095/{len(data)}"
        assert body == data[1000:5096]
    status, _, body = get(server.url + "/data/blob.bin")
    assert status == 200 and body == data
    assert [(r.range, r.status, r.nbytes) for r in server.requests] == [
        ("bytes=1000-5095", 206, 4096),
        (None, 200, len(data)),
    ]


def test_a_missing_file_is_404_and_a_head_request_has_no_body(blob):
    server, data = blob
    assert get(server.url + "/data/nothing.bin")[0] == 404
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"))
    conn.request("HEAD", "/data/blob.bin")
    answer = conn.getresponse()
    assert answer.status == 200 and int(answer.headers["Content-Length"]) == len(data) and answer.read() == b""
    conn.request("GET", "/data/blob.bin", headers={"Range": "bytes=0-9"})  # the same keep-alive connection
    answer = conn.getresponse()
    assert answer.status == 206 and answer.read() == data[:10]
    conn.close()


def test_every_request_waits_the_delay_before_its_answer(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 100)
    with serve_directory(tmp_path, delay_s=0.05) as server:
        for _ in range(3):
            assert get(server.url + "/f.bin", {"Range": "bytes=0-9"})[2] == b"x" * 10
        held = [r.answered_s - r.received_s for r in server.requests]
    assert len(held) == 3 and min(held) >= 0.05  # a lower bound: sleep never returns early


def test_503_for_the_first_n_requests_to_a_path_then_the_file(blob):
    server, data = blob
    server.fail("/data/*.bin", status=503, times=2, headers={"Retry-After": "0"})
    answers = [get(server.url + "/data/blob.bin", {"Range": "bytes=0-99"}) for _ in range(3)]
    assert [a[0] for a in answers] == [503, 503, 206]
    assert answers[0][1]["Retry-After"] == "0" and answers[2][2] == data[:100]
    assert [r.fault for r in server.requests] == ["status", "status", None]


def test_a_persistent_failure_answers_every_request_and_spares_other_paths(blob):
    server, _ = blob
    (server.root / "data" / "other.bin").write_bytes(b"ok")
    server.fail("/data/blob.bin", status=500, times=None)
    assert [get(server.url + "/data/blob.bin")[0] for _ in range(4)] == [500] * 4
    assert get(server.url + "/data/other.bin")[2] == b"ok"
    server.clear_faults()
    assert get(server.url + "/data/blob.bin")[0] == 200


def test_a_cut_transfer_breaks_off_after_n_bytes(blob):
    server, _ = blob
    server.cut("/data/blob.bin", nbytes=1000, times=1)
    with pytest.raises(http.client.IncompleteRead):
        with urllib.request.urlopen(server.url + "/data/blob.bin") as answer:
            answer.read()
    assert server.requests[-1].nbytes == 1000 and server.requests[-1].fault == "cut"
    assert get(server.url + "/data/blob.bin")[0] == 200  # used up


def test_a_truncated_file_is_served_truncated(blob):
    server, data = blob
    server.truncate("data/blob.bin", 5000)
    status, headers, body = get(server.url + "/data/blob.bin", {"Range": "bytes=4000-9999"})
    assert status == 206 and headers["Content-Range"] == "bytes 4000-4999/5000" and body == data[4000:5000]
    assert get(server.url + "/data/blob.bin", {"Range": "bytes=6000-6999"})[0] == 416


def test_a_signed_path_refuses_requests_without_the_token(blob):
    server, data = blob
    server.require_query("/data/*", "sig", "s3cret")
    assert get(server.url + "/data/blob.bin")[0] == 403
    assert get(server.url + "/data/blob.bin?sig=wrong")[0] == 403
    assert get(server.url + "/data/blob.bin?st=2026&sig=s3cret")[2] == data


def test_max_in_flight_counts_concurrent_requests(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    with serve_directory(tmp_path, delay_s=0.2) as server:
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda _: get(server.url + "/f.bin")[0], range(4))) == [200] * 4
        assert server.max_in_flight == 4


def test_without_nginx_the_fixture_skips_naming_the_package(monkeypatch):
    monkeypatch.setattr(http_server, "NGINX_CANDIDATES", ("/nonexistent/nginx",))
    with pytest.raises(pytest.skip.Exception, match="nginx is not installed"):
        http_server.require_nginx()


# -- COGs through GDAL's HTTP reader --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two scenes of one path/row (a clear winter one, a cloudy summer one) and the DEM, served by nginx."""
    root = tmp_path_factory.mktemp("www")
    crs, transform = scene_grid(LON, LAT, 320, 320)
    winter = landsat_scene(root, crs, transform, (320, 320), date="2015-01-10", ndvi=0.3)
    cloudy = [(QA_CLOUD, (0, 200, 0, 320)), (QA_FILL, (300, 320, 0, 320))]
    summer = landsat_scene(root, crs, transform, (320, 320), date="2015-07-02", ndvi=0.7, qa_boxes=cloudy, seed=1)
    dem = dem_covering(root, winter.bounds_lonlat())
    with serve_directory(root) as server:
        yield server, winter, summer, dem


def test_gdal_reads_a_window_of_a_served_cog_with_range_requests(world):
    server, winter, _, _ = world
    href = server.href(winter.files["SR_B4"])
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(href) as ds:
        assert ds.crs.to_epsg() == winter.epsg and ds.transform == winter.transform and ds.overviews(1)
        window = ds.read(1, window=((100, 164), (40, 104)))
    assert (window == winter.dn[3, 100:164, 40:104]).all()
    reads = server.requests_to(f"*/{winter.product_id}_SR_B4.TIF")
    assert reads and all(r.status in (200, 206) for r in reads)
    assert any(r.range for r in reads) and not any(r.range is None and r.method == "GET" for r in reads)


def test_the_scene_kit_writes_landsat_values_and_qa(world):
    _, winter, summer, _ = world
    reflectance = winter.reflectance()
    ndvi = (reflectance[4] - reflectance[3]) / (reflectance[4] + reflectance[3])
    assert abs(float(np.median(ndvi)) - 0.3) < 0.01
    assert 0.0 < reflectance.min() and reflectance.max() < 1.0
    assert winter.clear().all() and winter.cloud_cover == 0.0
    assert (summer.qa_pixel[:200] == QA_CLOUD).all() and (summer.qa_pixel[200:300] == QA_CLEAR).all()
    assert (summer.dn[:, 300:] == 0).all() and not summer.clear()[300:].any()
    assert summer.cloud_cover == pytest.approx(100 * 200 / 320)
    assert winter.id == "LC08_L2SP_195026_20150110_02_T1"
    assert winter.files["QA_PIXEL"].name == "LC08_L2SP_195026_20150110_20200910_02_T1_QA_PIXEL.TIF"


def test_local_rasters_hold_the_same_scene_in_the_schema_units(world, tmp_path):
    _, winter, _, dem = world
    images = local_rasters(winter, dem, tmp_path, SCHEMA)
    assert sorted(c for _, channels in images for c in channels) == sorted(SCHEMA.channels)
    with rasterio.open(images[0][0]) as ds:
        assert ds.crs.to_epsg() == winter.epsg and ds.transform == winter.transform
        assert (ds.read(4) == winter.reflectance()[3]).all()
    with rasterio.open(images[1][0]) as ds:
        elevation, slope = ds.read()
    assert np.isfinite(elevation).all() and 250 < elevation.min() and (0 <= slope).all() and (slope < 90).all()
    lon, lat = corner_point(winter.crs, winter.transform, 160, 160)
    x, y = winter.transform @ (160, 160)
    assert abs(lon - LON) < 0.01 and abs(lat - LAT) < 0.01
    assert (x, y) == (winter.bounds[0] + 4800, winter.bounds[3] - 4800)


# -- the fake STAC API ----------------------------------------------------------------------------------------


@pytest.fixture
def stac(world):
    server, winter, summer, dem = world
    with FakeStac() as fake:
        fake.add(LANDSAT_COLLECTION, [landsat_item(s, server.href) for s in (winter, summer)])
        fake.add(DEM_COLLECTION, [dem_item(t, server.href) for t in dem])
        yield fake, winter, summer, dem


def test_search_filters_by_bbox_datetime_and_cloud_cover_and_records_what_was_asked(stac):
    fake, winter, summer, _ = stac
    client = pystac_client.Client.open(fake.url)
    west, south, east, north = winter.bounds_lonlat()
    inside = [LON, LAT, LON + 0.01, LAT + 0.01]
    found = client.search(collections=[LANDSAT_COLLECTION], bbox=inside, datetime="2015").item_collection()
    assert [i.id for i in found] == [summer.id, winter.id]  # newest first
    query = {"eo:cloud_cover": {"lt": 20}}
    found = client.search(collections=[LANDSAT_COLLECTION], bbox=inside, datetime="2015", query=query)
    assert [i.id for i in found.items()] == [winter.id]
    assert not list(client.search(collections=[LANDSAT_COLLECTION], bbox=[east + 1, south, east + 2, north]).items())
    summer_only = client.search(collections=[LANDSAT_COLLECTION], bbox=inside, datetime="2015-06-01/2015-08-31")
    assert [i.id for i in summer_only.items()] == [summer.id]
    first = fake.first_searches()[1]
    assert first["bbox"] == inside and first["query"] == query and first["method"] == "POST"
    assert first["datetime"] == "2015-01-01T00:00:00Z/2015-12-31T23:59:59Z"
    assert first["returned"] == [winter.id] and fake.violations == []


def test_items_carry_the_planetary_computer_asset_keys_and_scale(stac):
    fake, winter, _, _ = stac
    client = pystac_client.Client.open(fake.url)
    item = next(client.search(collections=[LANDSAT_COLLECTION], ids=[winter.id]).items())
    assert set(LANDSAT_ASSET_KEYS.values()) <= set(item.assets)
    red = item.assets["red"].to_dict()
    assert red["raster:bands"][0]["scale"] == 2.75e-5 and red["raster:bands"][0]["offset"] == -0.2
    # the wire has proj:epsg as the Planetary Computer publishes it; pystac reads it as projection v2's proj:code
    assert item.properties["proj:code"] == winter.crs and item.properties["landsat:wrs_path"] == "195"
    assert fake.collections[LANDSAT_COLLECTION][0]["properties"]["proj:epsg"] == winter.epsg
    assert item.properties["proj:transform"][:3] == [30.0, 0.0, winter.bounds[0]]
    status, _, body = get(red["href"], {"Range": "bytes=0-3"})
    assert status == 206 and body[:2] in (b"II", b"MM")
    dem = next(client.search(collections=[DEM_COLLECTION], bbox=[LON, LAT, LON + 0.01, LAT + 0.01]).items())
    assert dem.assets["data"].href.endswith(f"{dem.id}.tif")


def test_paging_follows_next_links_for_post_and_get(stac):
    fake, winter, summer, _ = stac
    client = pystac_client.Client.open(fake.url)
    for method in ("POST", "GET"):
        search = client.search(collections=[LANDSAT_COLLECTION], limit=1, method=method)
        assert [i.id for i in search.items()] == [summer.id, winter.id]
    pages = [(s["method"], s["token"]) for s in fake.searches]
    assert pages == [("POST", None), ("POST", "next:1"), ("GET", None), ("GET", "next:1")]
    assert len(fake.first_searches()) == 2


def test_the_cql2_filter_and_the_collection_routes(stac):
    fake, winter, _, _ = stac
    client = pystac_client.Client.open(fake.url)
    clear = {"op": "and", "args": [{"op": "<=", "args": [{"property": "eo:cloud_cover"}, 10]}]}
    assert [i.id for i in client.search(collections=[LANDSAT_COLLECTION], filter=clear).items()] == [winter.id]
    assert client.get_collection(LANDSAT_COLLECTION).id == LANDSAT_COLLECTION
    assert get(fake.url + "/collections/landsat-c2-l1")[0] == 404


def test_a_malformed_search_is_refused_and_recorded(stac):
    fake, *_ = stac
    request = urllib.request.Request(
        fake.url + "/search", data=json.dumps({"collections": [LANDSAT_COLLECTION], "bbox": [10, 50, 9, 49]}).encode()
    )
    request.add_header("Content-Type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 400
    assert get(fake.url + "/search?bbox=1,2,3,4")[0] == 400  # no collections
    assert len(fake.violations) == 2 and "bbox" in fake.violations[0] and "collections" in fake.violations[1]


def test_injected_catalogue_faults_and_the_sas_token_route(world):
    with FakeStac(sas_token="st=2026&sig=s3cret") as fake:
        fake.faults = [503]
        assert get(fake.url + "/")[0] == 503
        assert get(fake.url + "/")[0] == 200
        assert json.loads(get(fake.url + f"/api/sas/v1/token/{LANDSAT_COLLECTION}")[2])["token"].endswith("s3cret")


# -- the TerraClimate Zarr store ------------------------------------------------------------------------------


def test_the_zarr_store_decodes_to_terraclimate_values_with_nan_at_sea_and_true_zeros(tmp_path):
    box, sea = (8.0, 47.0, 9.0, 47.5), (8.0, 47.0, 8.2, 47.2)
    store = terraclimate_zarr(tmp_path / "tc.zarr", SCHEMA, box, sea=[sea])
    assert (tmp_path / "tc.zarr" / ".zmetadata").exists()  # consolidated: no listing needed over HTTP
    ds = xr.open_zarr(tmp_path / "tc.zarr")
    assert ds["tmax"].encoding["dtype"] == np.int16 and ds["tmax"].encoding["scale_factor"] == 0.1
    assert list(ds["tmax"].dims) == ["time", "lat", "lon"] and (np.diff(ds["lat"]) < 0).all()
    land = ds.sel(lat=47.4, lon=8.6, method="nearest")
    t = SCHEMA.months.index("2012-03")
    assert float(land["tmax"][t]) == pytest.approx(store.value("tmmx", "2012-03", 8.6, 47.4))
    f = SCHEMA.climate_variables.index("tmmx")
    assert float(land["tmax"][t]) == pytest.approx((100 * (t + 1) + f) * 0.1)
    assert (land["swe"] == 0).all()
    at_sea = ds.sel(lat=47.1, lon=8.1, method="nearest")
    assert np.isnan(at_sea["ppt"]).all() and np.isnan(store.value("pr", "2012-03", 8.1, 47.1))
    assert set(ds.data_vars) == {TERRACLIMATE_NAMES[v] for v in SCHEMA.climate_variables}
    entries = climate_geotiffs(store, tmp_path / "tifs")
    path, var, first, scale = next(e for e in entries if e[1] == "tmmx")
    with rasterio.open(path) as tif:
        row, col = tif.index(8.6, 47.4)
        assert first == SCHEMA.months[0] and scale == 0.1 and tif.nodata == FILL
        assert float(tif.read(t + 1)[row, col]) * scale == pytest.approx(float(land["tmax"][t]))
