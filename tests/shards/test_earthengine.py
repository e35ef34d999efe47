"""The Earth Engine source, through the real earthengine-api client, against a fake service at the HTTP boundary
(tests/shards/fake_earthengine.py) that checks collection IDs, bands, dates, grid, scale and CRS of every request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
import shapely.geometry

from shards.pack import pack
from shards.sources.base import Rejected
from shards.sources.earthengine import decode_climate
from shards.sources.landsat import choose_scene
from soilnet.config import load_config
from soilnet.config.pack import PackConfig
from soilnet.schema import CLIMATE_BY_NAME, SampleSchema, compute_indices

sys.path.insert(0, str(Path(__file__).parent))
from fake_earthengine import SR_BANDS, FakeEarthEngine, default_pixels, make_service_account_key  # noqa: E402
from shard_reader import mpirun_pack, shard_samples  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EUROPE = REPO / "configs" / "preprocess" / "europe.yaml"
SCHEMA = SampleSchema()


@pytest.fixture
def fake(tmp_path):
    with FakeEarthEngine(None, 2015, SCHEMA.months, SCHEMA.climate_variables) as service:
        service.key = tmp_path / "service-account.json"
        service.public_key = make_service_account_key(service.key, service.url + "/token")
        yield service


def points_csv(path: Path, lonlat: list[tuple[float, float]]) -> Path:
    rows = ["id,lon,lat", *(f"e{i:04d},{lon},{lat}" for i, (lon, lat) in enumerate(lonlat))]
    path.write_text("\n".join(rows) + "\n")
    return path


def overrides(fake, out: Path, points: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"sampling.points={points}",
        "sampling.region=null",
        f"source.earthengine.url={fake.url}",
        f"source.earthengine.service_account_key={fake.key}",
        "source.earthengine.project=soil-project",
        "shard.max_samples=4",
        *extra,
    ]


def ledger(out: Path) -> dict[str, str]:
    return {r["id"]: r["reason"] for r in map(json.loads, (out / "ledger.jsonl").read_text().splitlines())}


def test_pack_through_the_real_client_gives_scaled_reflectance_indices_dem_and_climate(fake, tmp_path):
    out = tmp_path / "shards"
    pts = points_csv(tmp_path / "p.csv", [(10.0, 50.0), (-3.7, 40.4), (25.0, 65.5), (13.4, 52.5), (2.3, 48.9)])
    manifest = pack(load_config(PackConfig, EUROPE, overrides(fake, out, pts)))
    assert fake.violations == []
    assert manifest["samples"] == 5 and manifest["sources"]["kind"] == "earthengine"
    assert manifest["sources"]["versions"]["landsat"] == "LANDSAT/LC08/C02/T1_L2"
    assert [c["kind"] for c in fake.calls].count("value") == 5 and [c["kind"] for c in fake.calls].count("pixels") == 5
    assert {c["crs"] for c in fake.calls if c["kind"] == "pixels"} == {
        "EPSG:32632",
        "EPSG:32630",
        "EPSG:32635",
        "EPSG:32633",
        "EPSG:32631",
    }
    got = shard_samples(out)["e0002"]  # 65.5 N: north of SRTM's reach, the DEM still answers
    raw = default_pixels("", 25.0, 65.5, 64)
    reflectance = {b: raw[b].astype(np.float32) * 2.75e-5 - 0.2 for b in SR_BANDS}
    expected = {
        **reflectance,
        **compute_indices(reflectance, SCHEMA.channels),
        "elevation": raw["elevation"],
        "slope": raw["slope"],
    }
    image = got["image.npy"].astype(np.float32)
    for k, name in enumerate(SCHEMA.channels):
        np.testing.assert_allclose(image[k], expected[name], rtol=1e-3, atol=1e-3, err_msg=name)
    meta = got["meta.json"]
    assert meta["scene_date"] == "2015-01-10" and meta["source"] == "earthengine"
    assert meta["qa"]["rule"] == "winter" and meta["qa"]["scene"] == "LC08_195026_20150110"
    climate = got["climate.npy"]
    swe = SCHEMA.climate_variables.index("swe")
    assert (climate[:, swe] == 0).all()  # TerraClimate's true zeros stay zeros (the seed wrote -999)
    aet = SCHEMA.climate_variables.index("aet")
    np.testing.assert_allclose(climate[:, aet], (100 * np.arange(1, SCHEMA.n_months + 1) + aet) * 0.1, rtol=1e-6)


def test_scene_choice_is_the_clearest_winter_scene_else_the_lowest_ndvi():
    summer = [
        {"id": "a", "date": "2015-07-01", "clear": 1.0, "ndvi": 0.6},
        {"id": "b", "date": "2015-09-01", "clear": 0.9, "ndvi": 0.2},
        {"id": "c", "date": "2015-10-01", "clear": 0.5, "ndvi": 0.1},
    ]
    winter = [
        {"id": "w1", "date": "2015-01-05", "clear": 0.85, "ndvi": 0.4},
        {"id": "w2", "date": "2015-12-20", "clear": 0.95, "ndvi": 0.5},
        {"id": "w3", "date": "2015-02-11", "clear": 0.3, "ndvi": 0.0},
    ]
    assert choose_scene(summer + winter, [12, 1, 2], 0.8) == (winter[1], "winter")
    assert choose_scene(summer + winter[2:], [12, 1, 2], 0.8) == (summer[1], "lowest_ndvi")
    with pytest.raises(Rejected) as err:
        choose_scene([], [12, 1, 2], 0.8)
    assert err.value.reason == "no_scene"
    with pytest.raises(Rejected) as err:
        choose_scene([summer[2], winter[2]], [12, 1, 2], 0.8)
    assert err.value.reason == "cloud"


def test_clouds_are_masked_too_cloudy_no_scene_and_no_climate_are_rejected_with_reasons(fake, tmp_path):
    def scenes(lon, lat, year):
        if lon > 14:  # no winter scene: the barest summer scene is taken
            return [
                {"id": f"LC08_X_{year}0601", "date": f"{year}-06-01", "clear": 1.0, "ndvi": 0.5},
                {"id": f"LC08_X_{year}0815", "date": f"{year}-08-15", "clear": 0.9, "ndvi": 0.2},
            ]
        return [] if lon < 6 else [{"id": f"LC08_X_{year}0110", "date": f"{year}-01-10", "clear": 1.0, "ndvi": 0.3}]

    def pixels(scene, lon, lat, size):
        out = default_pixels(scene, lon, lat, size)
        cloudy_rows = {8: 4, 9: 40}.get(int(lon), 0)  # 4/64 rows cloudy: masked; 40/64: rejected
        out["QA_PIXEL"][:cloudy_rows] |= 1 << 3
        return out

    def climate(lon, lat, months, variables):
        values = {f"{m.replace('-', '')}_{v}": 7 for m in months for v in variables}
        if int(lon) == 7:
            values[f"{months[3].replace('-', '')}_pr"] = None  # masked: the sea
        return values

    fake.scenes_for, fake.pixels_for, fake.climate_for = scenes, pixels, climate
    out = tmp_path / "shards"
    pts = points_csv(tmp_path / "p.csv", [(5.0, 50.0), (7.0, 50.0), (8.0, 50.0), (9.0, 50.0), (15.0, 50.0)])
    manifest = pack(load_config(PackConfig, EUROPE, overrides(fake, out, pts)))
    assert fake.violations == []
    assert ledger(out) == {"e0000": "no_scene", "e0001": "nodata", "e0003": "cloud"}
    assert manifest["samples"] == 2
    got = shard_samples(out)
    masked = got["e0002"]
    assert masked["meta.json"]["qa"]["image_nonfinite"] == 4 * 64 * SCHEMA.n_channels - 4 * 64 * 2  # not the DEM
    assert (masked["image.npy"][:5, :4] == 0).all() and (masked["image.npy"][:5, 4:] != 0).all()
    assert masked["meta.json"]["qa"]["clear_fraction"] == pytest.approx(60 / 64)
    bare = got["e0004"]["meta.json"]
    assert (bare["scene_date"], bare["qa"]["rule"]) == ("2015-08-15", "lowest_ndvi")
    assert [c["scene"] for c in fake.calls if c["kind"] == "pixels" and c["lon"] > 14] == ["LC08_X_20150815"]


def test_decode_climate_keeps_zeros_applies_each_scale_and_names_a_missing_value():
    schema = SampleSchema(climate_variables=("pdsi", "swe"), months=("2015-01", "2015-02"))
    values = {"201501_pdsi": -250, "201501_swe": 0, "201502_pdsi": 0, "201502_swe": 12}
    got = decode_climate(values, schema)
    np.testing.assert_allclose(got, [[-250 * CLIMATE_BY_NAME["pdsi"].scale, 0], [0, 12 * CLIMATE_BY_NAME["swe"].scale]])
    with pytest.raises(Rejected, match="swe for 2015-02"):
        decode_climate({**values, "201502_swe": None}, schema)


def test_429_and_5xx_are_retried_with_backoff_and_a_persistent_failure_is_recorded(fake, tmp_path):
    pts = points_csv(tmp_path / "p.csv", [(10.0, 50.0)])
    fake.faults = [429, 503]
    out = tmp_path / "retried"
    manifest = pack(load_config(PackConfig, EUROPE, overrides(fake, out, pts, "source.earthengine.max_retries=3")))
    assert manifest["samples"] == 1
    assert [c.get("status") for c in fake.calls[:2]] == [429, 503]
    fake.faults = [503]
    out = tmp_path / "failed"
    pack(load_config(PackConfig, EUROPE, overrides(fake, out, pts, "source.earthengine.max_retries=0")))
    record = json.loads((out / "ledger.jsonl").read_text())
    assert record["id"] == "e0000" and record["reason"] == "error" and "HTTP 503" in record["detail"]


@pytest.mark.slow
def test_the_in_flight_budget_is_shared_by_every_mpi_rank_and_thread(fake, tmp_path):
    fake.latency_s = 0.05
    pts = points_csv(tmp_path / "p.csv", [(5.0 + 0.1 * i, 50.0) for i in range(24)])
    budget = ("source.earthengine.max_in_flight=3", "source.earthengine.threads=4")
    mpirun_pack(2, EUROPE, *overrides(fake, tmp_path / "shards", pts, *budget), cwd=REPO, timeout=300)
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["samples"] == 24
    api_calls = [c for c in fake.calls if c["kind"] in ("value", "pixels")]
    assert len(api_calls) == 48
    assert fake.max_in_flight == 3  # 2 ranks x 4 threads want 8; the shared budget holds them to 3


@pytest.mark.slow
def test_an_auth_failure_is_a_clear_error_before_any_work_and_shows_no_secret(fake, tmp_path):
    fake.reject_auth = True
    out = tmp_path / "shards"
    pts = points_csv(tmp_path / "p.csv", [(10.0, 50.0)])
    argv = [sys.executable, "-m", "soilnet.cli", "pack", "--config", str(EUROPE), *overrides(fake, out, pts)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cannot authenticate with service-account key" in proc.stderr and str(fake.key) in proc.stderr
    private_key = json.loads(fake.key.read_text())["private_key"]
    body = [line for line in private_key.splitlines() if "PRIVATE KEY" not in line]
    for text in (proc.stdout, proc.stderr):
        assert "PRIVATE KEY" not in text and not any(line in text for line in body)
    assert not list(out.glob("shard-*")) and not list((out / ".parts").glob("*.json"))
    assert fake.calls == []


def test_the_europe_config_packs_points_sampled_in_the_seed_polygon(fake, tmp_path, shared_data):
    region = shared_data / "regions" / "Europe.geojson"
    out = tmp_path / "shards"
    cfg = load_config(
        PackConfig,
        EUROPE,
        [
            f"output_dir={out}",
            f"sampling.region={region}",
            "sampling.n=6",
            f"source.earthengine.url={fake.url}",
            f"source.earthengine.service_account_key={fake.key}",
        ],
    )
    assert cfg.source.earthengine.year == 2015 and cfg.source.earthengine.max_in_flight == 40
    manifest = pack(cfg)
    assert manifest["samples"] == 6 and fake.violations == []
    west, south, east, north = shapely.unary_union(
        [shapely.geometry.shape(f["geometry"]) for f in json.loads(region.read_text())["features"]]
    ).bounds
    assert all(west <= c["lon"] <= east and south <= c["lat"] <= north for c in fake.calls)
