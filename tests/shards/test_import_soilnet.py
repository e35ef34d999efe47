"""import-soilnet: the seed's real patch + LUCAS CSV, and synthetic climate CSVs (shuffled dates, -999, duplicates)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shards import import_soilnet
from shards.import_soilnet import run_cli, variable_of
from soilnet.schema import CHANNELS, CLIMATE_BY_NAME, normalized_difference

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
    base = dict(
        images=None,
        climate=None,
        points=None,
        id_column="Point_ID",
        target_column=None,
        target_name=None,
        lon_column=None,
        lat_column=None,
        out=None,
        max_samples=2,
        climate_units="stored",
        require_target=False,
    )
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
    run_cli(
        _args(
            images=str(images),
            climate=str(climate),
            points=str(shared_data / "lucas" / "LUCAS_2015_all.csv"),
            target_column="OC",
            out=str(out),
        )
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"] == ["image", "climate"]
    assert manifest["schema"]["climate_variables"] == ["aet", "tmmx"]  # only the variables present
    assert manifest["schema"]["months"][0] == "2010-01" and len(manifest["schema"]["months"]) == 12
    assert manifest["schema"]["channels"] == [c.name for c in CHANNELS][:12]  # 12-band export: no DEM
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
    ndvi = normalized_difference(img[4], img[3])
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
    with rasterio.open(
        images / "B_150301.tif",
        "w",
        driver="GTiff",
        width=n,
        height=n,
        count=14,
        dtype="float64",
        crs="EPSG:3857",
        transform=grid,
    ) as dst:
        dst.write(data)
        dst.descriptions = tuple(c.name for c in CHANNELS)
    (images / "A_150302.tif").write_bytes(b"II*\x00" + b"\x00" * 32)
    _climate_csv(climate / "aet.csv", ["B", "A"], "Point_ID", lambda i, k: 1)
    points = tmp_path / "p.csv"
    pd.DataFrame({"Point_ID": ["B", "A"], "lon": [lon, lon + 0.1], "lat": [lat, lat]}).to_csv(points, index=False)
    out = tmp_path / "out"
    run_cli(_args(images=str(images), climate=str(climate), points=str(points), out=str(out)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"]["channels"] == [c.name for c in CHANNELS] and manifest["samples"] == 1
    img = shard_samples(out)["B"]["image.npy"].astype(np.float32)
    np.testing.assert_allclose(img[12], 350.0)
    ledger = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 1 and ledger[0]["id"] == "A" and ledger[0]["reason"] == "error"
    assert "A_150302.tif" in ledger[0]["detail"]


# ---- the seed's exact layout: every shape the seed publishes ----------------------------------------------------

sys.path.insert(0, str(Path(__file__).parents[1]))
import seed_layout  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


# `soilnet import-soilnet` of the seed's RaCA climate CSVs: the folder comes next
RACA_IMPORT = ("import-soilnet", "--id-column", "rcasiteid", "--target-column", "SOCstock100", "--climate")


def _soilnet(*argv: str) -> str:
    """The documented command line, run as a user runs it (a subprocess of ``soilnet.cli``)."""
    proc = subprocess.run([sys.executable, "-m", "soilnet.cli", *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def raca(tmp_path_factory):
    """40 sites in the seed's RaCA layout: 2 duplicated, 2 all -999, some empty targets, no coordinates."""
    folder = tmp_path_factory.mktemp("raca") / "climate"
    truth = seed_layout.write_raca(folder, 40, seed=3, empty_target_share=0.15)
    return folder, truth


def test_fixture_has_the_seed_layout(raca):
    folder, truth = raca
    header = (folder / "RaCA_pr.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["system:index", "SOCstock100", "rcasiteid"] and len(header) == 64
    dates = header[:61]
    assert sorted(dates) == seed_layout.SEED_DATES and dates != seed_layout.SEED_DATES  # unordered YYYYMMDD
    table = pd.read_csv(folder / "RaCA_pr.csv", dtype={"system:index": str})
    assert table.rcasiteid.duplicated().sum() == 2 and not table["system:index"].duplicated().any()
    assert (table[dates] == -999).any().any() and table.SOCstock100.isna().any()
    assert not {"lon", "lat", "long", "latitude"} & set(header)


@pytest.mark.slow
def test_climate_only_without_coordinates_takes_the_target_from_the_climate_csvs(raca, tmp_path):
    folder, truth = raca
    out = tmp_path / "shards"
    printed = _soilnet(
        *RACA_IMPORT,
        str(folder),
        "--out",
        str(out),
        "--max-samples",
        "16",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["import"]
    assert manifest["modalities"] == ["climate"] and info["coordinates"] == "none"
    assert "random folds only" in printed and "climate_missing 2" in printed
    assert manifest["schema"]["climate_variables"] == list(seed_layout.RACA_VARIABLES)
    assert manifest["schema"]["months"][0] == "2010-01" and manifest["schema"]["months"][-1] == "2015-01"
    samples = shard_samples(out)
    kept = [i for i in truth["ids"] if i not in truth["all_missing"]]
    assert list(samples) == sorted(samples, key=truth["ids"].index) and set(samples) == set(kept)
    ledger = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in ledger) == sorted(truth["all_missing"])
    assert {r["reason"] for r in ledger} == {"climate_missing"}
    # unordered date columns land in month order, scaled from stored units; -999 -> 0; first row of a duplicate
    k = manifest["schema"]["climate_variables"].index("pr")
    for pid in [*truth["duplicated"], kept[0]]:
        expected = truth["stored"]["pr"][truth["ids"].index(pid)] * CLIMATE_BY_NAME["pr"].scale
        np.testing.assert_allclose(samples[pid]["climate.npy"][:, k], expected, rtol=1e-6)
    # targets: empty cells stay unlabelled (no crash), the others are the soc_stock target
    empty = set(truth["empty_target"]) - set(truth["all_missing"])
    assert empty and all("targets" not in samples[i]["meta.json"] for i in empty)
    labelled = [i for i in kept if i not in empty]
    for pid in labelled:
        assert samples[pid]["meta.json"]["targets"] == {
            "soc_stock": pytest.approx(truth["soc"][truth["ids"].index(pid)])
        }
    assert info["counts"]["targets"]["missing"] == len(empty) and info["counts"]["targets"]["labelled"] == len(labelled)
    assert manifest["targets"] == ["soc_stock"] and manifest["stats"]["targets"]["soc_stock"]["count"] == len(labelled)
    assert all(s["meta.json"]["lon"] is None and s["meta.json"]["lat"] is None for s in samples.values())
    assert info["duplicates"]["RaCA_pr.csv"] == sorted(truth["duplicated"])


def test_minus999_all_year_in_one_variable_is_a_zero_and_in_every_variable_a_missing_record(tmp_path):
    ids = ["A1", "A2", "A3"]
    stored = {"pr": np.full((3, 61), 50.0), "swe": np.full((3, 61), 20.0)}
    stored["swe"][1] = 0.0  # snow-free all year: written as -999, a true zero
    stored["pr"][2] = stored["swe"][2] = 0.0  # every variable, every month: a missing record
    for var, values in stored.items():
        seed_layout.write_climate_csv(tmp_path / "c" / f"RaCA_{var}.csv", ids, values, targets=[10.0, 20.0, 30.0])
    out = tmp_path / "out"
    run_cli(_args(climate=str(tmp_path / "c"), id_column="rcasiteid", out=str(out)))
    manifest = json.loads((out / "manifest.json").read_text())
    samples = shard_samples(out)
    assert set(samples) == {"A1", "A2"}
    np.testing.assert_array_equal(samples["A2"]["climate.npy"][:, 1], 0.0)
    assert samples["A2"]["meta.json"]["qa"]["climate_minus999"] == 61
    counts = manifest["import"]["counts"]
    assert counts["climate_missing"] == 1 and counts["variable_all_minus999"] == {"swe": 1}
    assert [json.loads(x)["reason"] for x in (out / "ledger.jsonl").read_text().splitlines()] == ["climate_missing"]


def test_require_target_drops_missing_nan_and_negative_targets_into_the_ledger(tmp_path):
    ids = ["B1", "B2", "B3", "B4"]
    seed_layout.write_climate_csv(
        tmp_path / "c" / "RaCA_tmmx.csv", ids, np.full((4, 61), 250.0), targets=[12.5, None, -3.0, 40.0]
    )
    text = (tmp_path / "c" / "RaCA_tmmx.csv").read_text().replace(",,B2", ",NaN,B2")  # a literal NaN cell too
    (tmp_path / "c" / "RaCA_tmmx.csv").write_text(text)
    keep, drop = tmp_path / "keep", tmp_path / "drop"
    run_cli(_args(climate=str(tmp_path / "c"), id_column="rcasiteid", out=str(keep)))
    run_cli(_args(climate=str(tmp_path / "c"), id_column="rcasiteid", out=str(drop), require_target=True))
    kept = shard_samples(keep)
    assert set(kept) == set(ids) and "targets" not in kept["B3"]["meta.json"]
    counts = json.loads((keep / "manifest.json").read_text())["import"]["counts"]["targets"]
    assert counts["labelled"] == 2 and counts["negative"] == 1 and counts["missing"] + counts["nan"] == 1
    assert set(shard_samples(drop)) == {"B1", "B4"}
    ledger = [json.loads(x) for x in (drop / "ledger.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["reason"]) for r in ledger) == [("B2", "no_target"), ("B3", "no_target")]


def test_images_only_takes_coordinates_from_the_patches(tmp_path):
    lucas = {"40463116": (6.0729, 51.0887), "30003118": (-3.5, 40.2)}
    for pid, (lon, lat) in lucas.items():
        seed_layout.write_seed_patch(tmp_path / "img" / f"{pid}_150107.tif", lon, lat)
    seed_layout.write_seed_patch(tmp_path / "img" / "40463116_140107.tif", 0.0, 0.0)  # an older scene: not used
    out = tmp_path / "out"
    _soilnet("import-soilnet", "--images", str(tmp_path / "img"), "--out", str(out))  # no ID column to name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"] == ["image"] and manifest["import"]["coordinates"] == "images"
    assert manifest["schema"]["channels"] == list(seed_layout.SEED_BANDS) and manifest["targets"] == []
    samples = shard_samples(out)
    for pid, (lon, lat) in lucas.items():
        meta = samples[pid]["meta.json"]
        assert meta["lon"] == pytest.approx(lon, abs=1e-6) and meta["lat"] == pytest.approx(lat, abs=1e-6)
        assert meta["scene_date"] == "2015-01-07" and "climate.npy" not in samples[pid]
        assert samples[pid]["image.npy"].shape == (12, 64, 64)


def test_images_with_a_lucas_csv_and_no_climate(tmp_path):
    seed_layout.write_seed_patch(tmp_path / "img" / "40463116_150107.tif", 6.0729, 51.0887)
    points = tmp_path / "LUCAS.csv"
    pd.DataFrame(
        {
            "OID_": [1, 2],
            "Point_ID": ["40463116", "40463117"],
            "long": [6.0729, 6.1],
            "lat": [51.0887, 51.1],
            "OC": [20.0, 31.0],
        }
    ).to_csv(points, index=False, encoding="utf-8-sig")
    out = tmp_path / "out"
    _soilnet(
        "import-soilnet",
        "--images",
        str(tmp_path / "img"),
        "--points",
        str(points),
        "--id-column",
        "Point_ID",
        "--target-column",
        "OC",
        "--out",
        str(out),
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"] == ["image"] and manifest["import"]["coordinates"] == "points"
    assert shard_samples(out)["40463116"]["meta.json"]["targets"] == {"soc": 20.0}
    assert manifest["import"]["counts"]["not_in_points"] == 0


def test_images_and_climate_without_points(tmp_path):
    ids = ["P1", "P2"]
    seed_layout.write_seed_patch(tmp_path / "img" / "P1_150107.tif", 10.0, 48.0)
    seed_layout.write_climate_csv(tmp_path / "c" / "aet.csv", ids, np.full((2, 61), 300.0), "Point_ID")
    out = tmp_path / "out"
    run_cli(_args(images=str(tmp_path / "img"), climate=str(tmp_path / "c"), out=str(out)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"] == ["image", "climate"] and manifest["import"]["coordinates"] == "images"
    samples = shard_samples(out)
    assert set(samples) == {"P1"} and samples["P1"]["meta.json"]["lon"] == pytest.approx(10.0)
    assert [json.loads(x)["reason"] for x in (out / "ledger.jsonl").read_text().splitlines()] == ["no_scene"]


def test_a_failure_in_a_late_shard_loses_nothing_and_the_rerun_completes_it(raca, tmp_path, monkeypatch):
    folder, _ = raca
    args = dict(climate=str(folder), id_column="rcasiteid", target_column="SOCstock100", max_samples=8)
    run_cli(_args(**args, out=str(tmp_path / "ref")))
    real = import_soilnet.pack_shard  # the packer's shard writer, as the import calls it

    def disk_gone(k, *a, **kw):
        if k == 3:
            raise OSError(28, "No space left on device")
        return real(k, *a, **kw)

    monkeypatch.setattr(import_soilnet, "pack_shard", disk_gone)
    with pytest.raises(OSError, match="No space left"):
        run_cli(_args(**args, out=str(tmp_path / "out")))
    written = sorted(p.name for p in (tmp_path / "out" / ".parts").glob("shard-*.json"))
    assert written == [f"shard-{k:06d}.tar.json" for k in range(3)]
    before = {k: (tmp_path / "out" / f"shard-{k:06d}.tar").stat().st_mtime_ns for k in range(3)}
    monkeypatch.setattr(import_soilnet, "pack_shard", real)
    run_cli(_args(**args, out=str(tmp_path / "out")))
    assert {k: (tmp_path / "out" / f"shard-{k:06d}.tar").stat().st_mtime_ns for k in range(3)} == before  # kept
    ref, again = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("ref", "out"))
    assert again["shards"] == ref["shards"] and again["stats"] == ref["stats"]
    with pytest.raises(ValueError, match="other arguments \\(max_samples"):
        run_cli(_args(**{**args, "max_samples": 4}, out=str(tmp_path / "out")))


@pytest.mark.slow
def test_import_then_finetune_the_documented_raca_config(raca, tmp_path):
    folder, _ = raca
    shards = tmp_path / "shards"
    _soilnet(
        *RACA_IMPORT,
        str(folder),
        "--out",
        str(shards),
    )
    config = REPO / "configs" / "finetune" / "raca_climate.yaml"
    run = tmp_path / "ft"
    quick = ["train.epochs=1", "eval.split.folds=2", "eval.baseline.n_estimators=10"]
    _soilnet("finetune", "--config", str(config), f"data.shards={shards}", f"output_dir={run}", *quick)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"]["kind"] == "random" and metrics["model"]["n"] > 20
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "soilnet.cli",
            "finetune",
            "--config",
            str(config),
            f"data.shards={shards}",
            f"output_dir={tmp_path / 'sp'}",
            "eval.split.kind=spatial",
            *quick,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "import.coordinates is 'none'" in proc.stderr


@pytest.mark.slow
def test_the_seed_raca_development_half_imports_as_documented(shared_data, tmp_path):
    folder = shared_data / "raca_dev"
    out = tmp_path / "shards"
    printed = _soilnet(
        *RACA_IMPORT,
        str(folder),
        "--out",
        str(out),
    )
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["import"]["counts"]
    assert manifest["schema"]["climate_variables"] == list(seed_layout.RACA_VARIABLES)
    assert len(manifest["schema"]["months"]) == 61 and manifest["import"]["coordinates"] == "none"
    rejected = sum(1 for _ in (out / "ledger.jsonl").read_text().splitlines())
    assert manifest["samples"] + rejected == counts["points"] > 3000
    assert counts["targets"]["labelled"] > 2900 and counts["variable_all_minus999"]["swe"] > 100
    assert manifest["import"]["duplicates"] and "coordinates: none" in printed
    config = REPO / "configs" / "finetune" / "raca_climate.yaml"
    quick = ["train.epochs=1", "eval.split.folds=2", "eval.baseline.n_estimators=10"]
    _soilnet("finetune", "--config", str(config), f"data.shards={out}", f"output_dir={tmp_path / 'ft'}", *quick)
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["model"]["n"] == counts["targets"]["labelled"]
