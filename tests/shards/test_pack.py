"""Packing the synthetic world: the shard format, resumability after kill -9, and worker-count independence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from shards.pack import pack
from soilnet.config import load_config
from soilnet.config.pack import PackConfig

sys.path.insert(0, str(Path(__file__).parent))
from shard_reader import mpirun_pack  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs/preprocess/demo.yaml"


def demo_cfg(out: Path, *overrides: str) -> PackConfig:
    return load_config(PackConfig, DEMO, [f"output_dir={out}", "sampling.n=40", "shard.max_samples=16", *overrides])


def shard_contents(out: Path) -> dict[str, list[str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    contents = {}
    for s in manifest["shards"]:
        with tarfile.open(out / s["name"]) as tf:
            contents[s["name"]] = sorted({m.name.split(".")[0] for m in tf.getmembers()})
    return contents


def test_demo_pack_writes_the_documented_format(tmp_path):
    manifest = pack(demo_cfg(tmp_path))
    assert manifest["samples"] == 40 and [s["samples"] for s in manifest["shards"]] == [16, 16, 8]
    assert manifest["schema"]["channels"][-1] == "slope" and manifest["targets"] == ["soc"]
    assert set(manifest["stats"]["image"]) == set(manifest["schema"]["channels"])
    assert manifest["stats"]["climate"]["tmmx"]["count"] == 40 * 61
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "ledger.jsonl").exists()
    sample = next(iter(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False).decode()))
    assert "." not in sample["__key__"]
    assert sample["image.npy"].shape == (14, 64, 64) and sample["image.npy"].dtype == np.float16
    assert sample["climate.npy"].shape == (61, 14) and sample["climate.npy"].dtype == np.float32
    meta = sample["meta.json"]
    assert {"id", "lon", "lat", "scene_date", "source", "qa", "targets"} <= set(meta) and meta["targets"]["soc"] > 0


def test_channel_subset_by_name_is_packed_in_schema_order(tmp_path):
    manifest = pack(demo_cfg(tmp_path, "schema.channels=[NDVI, SR_B4]", "schema.climate_variables=[pr, aet]"))
    assert manifest["schema"]["channels"] == ["SR_B4", "NDVI"]
    assert manifest["schema"]["climate_variables"] == ["aet", "pr"]
    sample = next(iter(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False).decode()))
    assert sample["image.npy"].shape == (2, 64, 64) and sample["climate.npy"].shape == (61, 2)


def test_rerun_skips_complete_shards_and_gives_the_same_manifest(tmp_path):
    first = pack(demo_cfg(tmp_path))
    mtime = (tmp_path / "shard-000000.tar").stat().st_mtime_ns
    second = pack(demo_cfg(tmp_path))
    assert second == first
    assert (tmp_path / "shard-000000.tar").stat().st_mtime_ns == mtime


def test_kill_9_then_rerun_packs_every_point_exactly_once(tmp_path):
    reference = tmp_path / "reference"
    pack(demo_cfg(reference, "sampling.n=96"))
    out = tmp_path / "killed"
    argv = [
        sys.executable,
        "-m",
        "soilnet.cli",
        "pack",
        "--config",
        str(DEMO),
        f"output_dir={out}",
        "sampling.n=96",
        "shard.max_samples=16",
    ]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((out / ".parts").glob("*.json")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # nothing half-visible: no manifest before every shard is done
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
    assert shard_contents(out) == shard_contents(reference)
    ids = [i for names in shard_contents(out).values() for i in names]
    assert len(ids) == len(set(ids)) == 96
    got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    assert got["shards"] == want["shards"] and got["stats"] == want["stats"]  # same bytes (sha256), same stats


@pytest.mark.mpi
def test_two_mpi_ranks_give_the_same_shards_and_statistics_as_one(tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    mpirun_pack(2, DEMO, f"output_dir={two}", "sampling.n=40", "shard.max_samples=16", cwd=REPO, timeout=180)
    pack(demo_cfg(one))
    parts = sorted((two / ".parts").glob("*.json"))
    assert len(parts) == 3
    assert shard_contents(two) == shard_contents(one)
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m2["stats"] == m1["stats"] and m2["shards"] == m1["shards"]


class NaNSource:
    """A source whose patch has 3 NaN pixels and whose climate has one inf: the packer's policy decides."""

    name = "nan-test"

    def __init__(self):
        from soilnet.schema import SampleSchema

        self.schema = SampleSchema()

    def patch(self, lon, lat):
        from shards.sources.base import Patch

        image = np.ones(self.schema.image_shape, dtype=np.float32)
        image[0, 0, :3] = np.nan
        return Patch(image=image)

    def climate(self, lon, lat):
        climate = np.ones(self.schema.climate_shape, dtype=np.float32)
        climate[2, 1] = np.inf
        return climate

    def targets(self, lon, lat, patch, climate):
        return {}


def test_nan_and_inf_are_rejected_or_masked_to_zero_and_counted_as_configured():
    from shards.pack import make_sample
    from shards.sources.base import Rejected

    source = NaNSource()
    with pytest.raises(Rejected) as err:
        make_sample(source, source.schema, "p1", 10.0, 50.0, "reject")
    assert err.value.reason == "nonfinite" and "3 NaN/inf values in the image" in err.value.detail
    sample = make_sample(source, source.schema, "p1", 10.0, 50.0, "mask")
    assert sample["meta.json"]["qa"] == {"image_nonfinite": 3, "climate_nonfinite": 1}
    assert (sample["image.npy"][0, 0, :3] == 0).all() and sample["image.npy"][0, 0, 3] == 1
    assert sample["climate.npy"][2, 1] == 0 and np.isfinite(sample["climate.npy"]).all()
