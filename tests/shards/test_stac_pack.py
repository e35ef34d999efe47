"""``soilnet pack`` from the STAC source (configs/preprocess/europe_stac.yaml) on real HTTP: lineage, the ledger's
reasons, 503 then success, a persistent failure, signed-URL tokens kept out of every output, the per-host limit,
an unreachable catalogue, kill -9 and rerun, two MPI ranks, and a truncated COG.

Runs that count HTTP requests are separate processes: GDAL's cache would serve a file already read in this one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.pack import pack
from soilnet.config import load_config
from soilnet.config.pack import PackConfig

sys.path.insert(0, str(Path(__file__).parent))
from shard_reader import mpirun_pack, shard_samples  # noqa: E402
from test_stac_world import build, points_csv, serving  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs/preprocess/europe_stac.yaml"
NAMES = ["clouds", "clear", "cloudy", "bare", "nowhere", "sea"]
TOKEN = "sig-7f3a9c0e51d2b8"  # what the test's signing hook appends; it must appear in no output


def sign(href: str) -> str:
    """The test's URL-signing hook (``source.stac.sign: test_stac_pack.sign``): a SAS-like token."""
    return f"{href}{'&' if '?' in href else '?'}token={TOKEN}&se=2099-01-01"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with serving(build(tmp_path_factory.mktemp("stac-pack-world"))) as w:
        yield w


@pytest.fixture(autouse=True)
def no_faults(world):
    yield
    world.server.clear_faults()


def settings(world, out: Path, names: list[str], *extra: str) -> list[str]:
    pts = points_csv(out.parent / f"{out.name}.csv", world, names)
    return world.overrides(out, pts, "source.stac.sign=null", "source.stac.threads=4", *extra)


def cli(world, out: Path, names: list[str], *extra: str, **kwargs) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "soilnet.cli", "pack", "--config", str(CONFIG), *settings(world, out, names, *extra)]
    paths = [str(REPO), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def ledger(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "ledger.jsonl").read_text().splitlines())}


def outcome(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["output_dir"], manifest["config"]["sampling"]["points"]  # where, not what
    del manifest["config"]["source"]["stac"]["threads"]  # how many at once, not what
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*"))}
    return {"shards": shards, "ledger": (out / "ledger.jsonl").read_text(), "manifest": manifest}


def test_pack_records_lineage_and_the_other_sources_rejection_reasons(world, tmp_path):
    out = tmp_path / "shards"
    manifest = pack(load_config(PackConfig, CONFIG, settings(world, out, NAMES)))
    assert manifest["samples"] == 3 and manifest["sources"]["kind"] == "stac"
    assert manifest["sources"]["versions"]["stac_api"] == world.stac.url
    assert {k: r["reason"] for k, r in ledger(out).items()} == {
        "cloudy": "cloud",
        "nowhere": "no_scene",
        "sea": "nodata",
    }
    samples = shard_samples(out)
    meta = samples["bare"]["meta.json"]
    b3 = world.scenes["B3"]
    assert meta["source"] == "stac" and meta["scene_date"] == "2015-08-10" and meta["qa"]["scene"] == b3.id
    assert meta["qa"]["assets"]["SR_B4"] == world.server.href(b3.files["SR_B4"])
    assert samples["clouds"]["meta.json"]["qa"]["image_nonfinite"] == 768 * 12  # on_nonfinite: mask; 12 spectral
    assert world.stac.violations == []


@pytest.mark.slow
def test_a_503_is_retried_and_a_persistent_failure_is_recorded_in_the_ledger(world, tmp_path):
    b3 = world.scenes["B3"]
    world.server.fail(f"*/{b3.files['SR_B6'].name}", status=503, times=2)
    world.server.reset_log()
    proc = cli(world, tmp_path / "retried", ["bare"])
    assert proc.returncode == 0, proc.stderr
    statuses = [r.status for r in world.server.requests_to(f"*/{b3.files['SR_B6'].name}")]
    assert statuses[:2] == [503, 503] and statuses[2] in (200, 206)
    assert len(shard_samples(tmp_path / "retried")) == 1
    world.server.fail(f"*/{b3.files['SR_B6'].name}", status=503, times=None)
    proc = cli(
        world, tmp_path / "failed", ["bare", "clear"], "source.stac.max_retries=1", "source.stac.retry_delay_s=0.05"
    )
    assert proc.returncode == 0, proc.stderr
    record = ledger(tmp_path / "failed")["bare"]
    assert record["reason"] == "error" and b3.files["SR_B6"].name in record["detail"] and "503" in record["detail"]
    assert list(shard_samples(tmp_path / "failed")) == ["clear"]  # the run went on


@pytest.mark.slow
def test_signed_urls_are_used_but_their_tokens_never_reach_logs_ledger_or_manifest(world, tmp_path):
    for pattern in ("/scenes/*", "/dem/*", "/terraclimate.zarr/*"):
        world.server.require_query(pattern, "token", TOKEN)
    world.server.fail(f"*/{world.scenes['A1'].files['SR_B2'].name}", status=503, times=None)  # an error message
    out = tmp_path / "signed"
    proc = cli(world, out, ["clear", "bare"], "source.stac.sign=test_stac_pack.sign", "source.stac.max_retries=0")
    assert proc.returncode == 0, proc.stderr
    assert ledger(out)["clear"]["reason"] == "error" and list(shard_samples(out)) == ["bare"]
    assert all(r.status != 403 for r in world.server.requests)  # every file was read with its token
    texts = [proc.stdout, proc.stderr] + [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()]
    assert not [t for t in texts if TOKEN in t]


ZARR_METADATA = re.compile(r"\.zarr/(zarr\.json|\.zgroup|\.zattrs|\.zmetadata)$")


def max_overlap(requests) -> int:
    """The most of ``requests`` (the proxy's log) that were in flight at one moment."""
    events = sorted([(r.received_s, 1) for r in requests] + [(r.answered_s, -1) for r in requests])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


@pytest.mark.slow
def test_threads_are_held_to_the_per_host_limit(world, tmp_path):
    """8 threads, ``max_per_host: 1``: one request in flight to the file server at a time, a read of a window over
    several COG tiles included (its ranges go one after another). Only opening the Zarr store, once per process,
    probes its metadata files at once (zarr's own open)."""
    world.server.reset_log()
    proc = cli(
        world,
        tmp_path / "limited",
        ["clouds", "clear", "bare"] * 1,
        "source.stac.threads=8",
        "source.stac.max_per_host=1",
    )
    assert proc.returncode == 0, proc.stderr
    reads = [r for r in world.server.requests if not ZARR_METADATA.search(r.path)]
    assert len(reads) > 20 and max_overlap(reads) == 1


@pytest.mark.slow
def test_an_unreachable_catalogue_is_one_error_before_any_packing(world, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/api/stac/v1"
    out = tmp_path / "dead"
    proc = cli(world, out, ["clear"], f"source.stac.url={dead}", "source.stac.max_retries=0")
    assert proc.returncode == 2
    assert f"cannot reach the STAC API {dead} (collection 'landsat-c2-l2')" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("shard-*")) and not list((out / ".parts").glob("*.json"))


KILL_POINTS = ["clouds", "clear", "bare", "cloudy", "sea", "nowhere"] * 2


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "shards"
    pack(load_config(PackConfig, CONFIG, settings(world, out, KILL_POINTS, "shard.max_samples=2")))
    return out


@pytest.mark.slow
def test_kill_9_then_rerun_packs_every_point_exactly_once(world, reference, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "soilnet.cli", "pack", "--config", str(CONFIG)]
    argv += settings(world, out, KILL_POINTS, "shard.max_samples=2", "source.stac.threads=1")
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / ".parts").glob("*.json")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True, timeout=300)
    assert outcome(out) == outcome(reference)
    ids = [k for k in shard_samples(out)]
    assert len(ids) == len(set(ids))


@pytest.mark.mpi
@pytest.mark.slow
def test_two_mpi_ranks_give_the_same_shards_as_one(world, reference, tmp_path):
    out = tmp_path / "two"
    mpirun_pack(2, CONFIG, *settings(world, out, KILL_POINTS, "shard.max_samples=2"), cwd=REPO, timeout=300)
    assert len(list((out / ".parts").glob("*.json"))) == 6
    assert outcome(out) == outcome(reference)


@pytest.mark.slow
def test_a_truncated_cog_fails_its_points_with_the_file_named(world, tmp_path):
    """Last in this module: it cuts a served file on disk."""
    b3 = world.scenes["B3"]
    world.server.truncate(b3.files["SR_B7"], b3.files["SR_B7"].stat().st_size // 2)
    out = tmp_path / "truncated"
    proc = cli(world, out, ["bare", "clear"], "source.stac.max_retries=0")
    assert proc.returncode == 0, proc.stderr
    record = ledger(out)["bare"]
    assert record["reason"] == "error" and b3.files["SR_B7"].name in record["detail"]
    assert list(shard_samples(out)) == ["clear"]
