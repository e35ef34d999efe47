"""import-soilnet: the seed's real patch + LUCAS CSV, and synthetic climate CSVs (shuffled dates, -999, duplicates)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shards.import_soilnet import run_cli, variable_of
from soilnet import schema as S

sys.path.insert(0, str(Path(__file__).parent))
from shard_reader import shard_samples  # noqa: E402

SEED_ID = "40463116"


def _climate_csv(path, ids, id_col, value, extra=None, seed=0):
    """Date columns 20100101..20101201 in shuffled order; value(i, month) in stored (unscaled) units."""
    rng = np.random.default_rng(seed)
    dates = [f"2010{m:02d}01" for m in range(1, 13)]
    order = rng.permutation(len(dates))
    rows = []
    for i, pid in enumerate(ids):
        row = {id_col: pid, **{dates[k]: value(i, k) for k in order}}
        row.update((extra or {}).get(pid, {}))
        rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)


def _args(**kw):
    base = dict(images=None, climate=None, points=None, id_column="Point_ID", target_column=None, target_name=None,
                lon_column=None, lat_column=None, out=None, max_samples=2)  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_variable_from_file_name(tmp_path):
    assert variable_of(tmp_path / "aet.csv") == "aet"
    assert variable_of(tmp_path / "RaCA_aet.csv") == "aet"
    assert variable_of(tmp_path / "_tmmx_filled.csv") == "tmmx"
    with pytest.raises(ValueError, match="cannot tell the climate variable"):
        variable_of(tmp_path / "weather.csv")


def test_real_seed_patch_and_lucas(shared_data, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / f"{SEED_ID}_150107.tif").symlink_to(shared_data / "soilnet_sample" / f"{SEED_ID}_150107.tif")
    lucas = pd.read_csv(shared_data / "lucas" / "LUCAS_2015_all.csv", encoding="utf-8-sig", dtype={"Point_ID": str})
    ids = [SEED_ID, *lucas.Point_ID.iloc[:3]]  # three LUCAS points without a patch -> no_scene
    climate = tmp_path / "climate"
    climate.mkdir()
    _climate_csv(climate / "aet.csv", ids, "Point_ID", lambda i, k: -999 if k == 0 else 100 * (k + 1))
    _climate_csv(climate / "tmmx.csv", ids, "Point_ID", lambda i, k: 50 + k, seed=1)
    out = tmp_path / "out"
    run_cli(_args(images=str(images), climate=str(climate), points=str(shared_data / "lucas" / "LUCAS_2015_all.csv"),
                  target_column="OC", out=str(out)))  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"] == ["image", "climate"]
    assert manifest["schema"]["climate_variables"] == ["aet", "tmmx"]  # only the variables present
    assert manifest["schema"]["months"][0] == "2010-01" and len(manifest["schema"]["months"]) == 12
    assert manifest["schema"]["channels"] == [c.name for c in S.CHANNELS][:12]  # 12-band export: no DEM
    samples = shard_samples(out)
    assert manifest["samples"] == 1 and list(samples) == [SEED_ID]
    s = samples[SEED_ID]
    assert s["image.npy"].shape == (12, 64, 64) and s["image.npy"].dtype == np.float16
    meta = s["meta.json"]
    assert meta["scene_date"] == "2015-01-07" and meta["targets"] == {"soc": 20.0}
    assert abs(meta["lon"] - 6.0729) < 1e-3 and abs(meta["lat"] - 51.0887) < 1e-3
    np.testing.assert_allclose(s["climate.npy"][:, 0], [0.0] + [10.0 * (k + 1) for k in range(1, 12)], rtol=1e-6)
    np.testing.assert_allclose(s["climate.npy"][:, 1], [5.0 + 0.1 * k for k in range(12)], rtol=1e-5)
    assert meta["qa"]["climate_minus999"] == 1
    # NDVI recomputed from the reflectance with the schema's normalised difference
    img = s["image.npy"].astype(np.float32)
    ndvi = S.normalized_difference(img[4], img[3])
    np.testing.assert_allclose(img[11], ndvi, atol=2e-3)
    ledger = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in ledger) == ["no_scene"] * 3


def test_climate_only_raca_with_duplicates(tmp_path):
    climate = tmp_path / "climate"
    climate.mkdir()
    ids = ["C1", "C2", "C2", "C3"]  # C2 duplicated
    soc = {"C1": {"SOCstock100": 50.0}, "C2": {"SOCstock100": 70.0}, "C3": {"SOCstock100": 90.0}}
    _climate_csv(climate / "RaCA_pr.csv", ids, "rcasiteid", lambda i, k: 10 * i + k, extra=soc)
    _climate_csv(climate / "_tmmn_filled.csv", ids, "rcasiteid", lambda i, k: -999, seed=2)
    points = tmp_path / "raca.csv"
    pd.DataFrame({"rcasiteid": ["C1", "C2", "C3"], "lon": [-100.0, -99.0, -98.0], "lat": [40.0, 41.0, 42.0]}).to_csv(
        points, index=False
    )
    out = tmp_path / "out"
    run_cli(_args(climate=str(climate), points=str(points), id_column="rcasiteid", out=str(out)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"] == ["climate"]
    assert manifest["schema"]["climate_variables"] == ["pr", "tmmn"]
    assert manifest["samples"] == 3 and manifest["targets"] == ["soc_stock"]
    assert manifest["import"]["duplicates"] == {"RaCA_pr.csv": ["C2"], "_tmmn_filled.csv": ["C2"]}
    samples = shard_samples(out)
    assert set(samples) == {"C1", "C2", "C3"}
    assert all("image.npy" not in s for s in samples.values())
    np.testing.assert_allclose(samples["C2"]["climate.npy"][:, 0], [10 + k for k in range(12)])  # first C2 row
    np.testing.assert_allclose(samples["C3"]["climate.npy"][:, 1], 0.0)  # -999 -> 0
    assert samples["C3"]["meta.json"]["targets"] == {"soc_stock": 90.0}


def test_missing_id_column_names_the_file(tmp_path):
    climate = tmp_path / "climate"
    climate.mkdir()
    _climate_csv(climate / "aet.csv", ["a"], "PointID", lambda i, k: 1)
    with pytest.raises(ValueError, match=r"aet\.csv: no ID column 'Point_ID'"):
        run_cli(_args(climate=str(climate), points=str(tmp_path / "p.csv"), out=str(tmp_path / "o")))


def test_rerun_resumes_and_physical_units_are_kept(tmp_path):
    climate = tmp_path / "climate"
    climate.mkdir()
    ids = [f"P{i}" for i in range(5)]
    _climate_csv(climate / "tmmx.csv", ids, "Point_ID", lambda i, k: 20.5 + i)
    points = tmp_path / "p.csv"
    pd.DataFrame({"Point_ID": ids, "long": np.arange(5.0), "lat": np.full(5, 50.0), "OC": np.arange(5.0) + 1}).to_csv(
        points, index=False, encoding="utf-8-sig"
    )
    out = tmp_path / "out"
    args = _args(climate=str(climate), points=str(points), target_column="OC", out=str(out), climate_units="physical")
    run_cli(args)
    first = json.loads((out / "manifest.json").read_text())
    (out / ".parts" / "shard-000001.tar.json").unlink()  # as if killed before shard 1 was recorded
    (out / "shard-000001.tar").unlink()
    run_cli(args)
    again = json.loads((out / "manifest.json").read_text())
    assert again["shards"] == first["shards"] and again["samples"] == 5
    assert first["import"]["climate_units"] == "physical"
    samples = shard_samples(out)
    np.testing.assert_allclose(samples["P3"]["climate.npy"][:, 0], 23.5)
    assert samples["P3"]["meta.json"]["targets"] == {"soc": 4.0}


def test_fourteen_band_patch_and_a_corrupt_one(tmp_path):
    # The corrupt patch sorts first: the import still takes the channels from the readable one.
    import rasterio
    from pyproj import Transformer
    from rasterio.transform import from_origin

    images, climate = tmp_path / "images", tmp_path / "climate"
    images.mkdir()
    climate.mkdir()
    lon, lat = 10.0, 48.0
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(lon, lat)
    n, px = 110, 30.0
    data = np.stack([np.full((n, n), 0.01 * (b + 1)) for b in range(14)]).astype(np.float64)
    data[12] = 350.0  # elevation (m)
    grid = from_origin(x - n * px / 2, y + n * px / 2, px, px)
    with rasterio.open(images / "B_150301.tif", "w", driver="GTiff", width=n, height=n, count=14, dtype="float64",
                       crs="EPSG:3857", transform=grid) as dst:  # fmt: skip
        dst.write(data)
        dst.descriptions = tuple(c.name for c in S.CHANNELS)
    (images / "A_150302.tif").write_bytes(b"II*\x00" + b"\x00" * 32)
    _climate_csv(climate / "aet.csv", ["B", "A"], "Point_ID", lambda i, k: 1)
    points = tmp_path / "p.csv"
    pd.DataFrame({"Point_ID": ["B", "A"], "lon": [lon, lon + 0.1], "lat": [lat, lat]}).to_csv(points, index=False)
    out = tmp_path / "out"
    run_cli(_args(images=str(images), climate=str(climate), points=str(points), out=str(out)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"]["channels"] == [c.name for c in S.CHANNELS] and manifest["samples"] == 1
    img = shard_samples(out)["B"]["image.npy"].astype(np.float32)
    np.testing.assert_allclose(img[12], 350.0)
    ledger = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 1 and ledger[0]["id"] == "A" and ledger[0]["reason"] == "error"
    assert "A_150302.tif" in ledger[0]["detail"]
