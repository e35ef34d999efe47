"""Faults injected into packing: kill -9 at chosen points, a full disk, a source that throws on one point, an
empty shard among workers, Slurm arrays with a step, and a request budget on a file system without locks.

Each test injects the fault into a real ``soilnet pack`` (a real process where it is killed, a real tmpfs that
fills) and checks that nothing is lost: the rerun's shards (sha256), part records, ledger and manifest (less its
``output_dir``) equal an uninterrupted run's.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

import shards.budget
import shards.pack
from shards.budget import InFlightBudget
from shards.pack import load_points, pack, summary
from shards.parallel import Workers, array_task, workers_from_env
from shards.sources.base import Rejected
from soilnet.config import load_config
from soilnet.config.base import ConfigError
from soilnet.config.pack import PackConfig

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs/preprocess/demo.yaml"
N, PER_SHARD = 96, 16  # six shards
SETTINGS = [f"sampling.n={N}", f"shard.max_samples={PER_SHARD}"]


def cfg_for(out: Path) -> PackConfig:
    return load_config(PackConfig, DEMO, [f"output_dir={out}", *SETTINGS])


def cli(out: Path) -> list[str]:
    return ["pack", "--config", str(DEMO), f"output_dir={out}", *SETTINGS]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outcome(out: Path) -> dict:
    """Everything a pack leaves that must not depend on how it got there: shard and part record bytes, the
    ledger, and the manifest less its ``output_dir``; plus any temporary file left behind (there must be none)."""
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["output_dir"]
    return {
        "shards": {p.name: sha256(p) for p in sorted(out.glob("shard-*"))},
        "parts": {p.name: sha256(p) for p in sorted((out / ".parts").iterdir())},
        "ledger": (out / "ledger.jsonl").read_text(),
        "manifest": manifest,
        "leftovers": sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp")),
    }


def shard_ids(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return sorted({m.name.split(".")[0] for m in tf.getmembers()})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted single-process pack: what every faulted run must end with."""
    out = tmp_path_factory.mktemp("reference")
    pack(cfg_for(out))
    return out


# -- kill -9 ---------------------------------------------------------------------------------------------------
# A wrapper around the real CLI that SIGKILLs its own process at one point of the write path: after shard K's
# rename but before its part record, or in the middle of shard K's tar (some samples written, no rename yet).
KILLER = """
import os, sys
import webdataset as wds
import shards.pack

where, k, per_shard = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if where == "before-part-record":
    atomic_json = shards.pack._atomic_json
    def _atomic_json(path, obj):
        if path.name == f"shard-{k:06d}.tar.json":
            os.kill(os.getpid(), 9)
        atomic_json(path, obj)
    shards.pack._atomic_json = _atomic_json
else:  # mid-shard: the 6th sample of shard k
    write, calls = wds.TarWriter.write, [0]
    def counting_write(self, obj):
        calls[0] += 1
        if calls[0] == k * per_shard + 6:
            self.stream.flush()  # some of the shard on disk, as a real crash would leave it
            os.kill(os.getpid(), 9)
        return write(self, obj)
    wds.TarWriter.write = counting_write
from soilnet.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before-part-record", "mid-shard"])
def test_kill_9_in_the_write_path_then_rerun_equals_an_uninterrupted_run(reference, tmp_path, where):
    out, k = tmp_path / "killed", 2
    argv = [sys.executable, "-c", KILLER, where, str(k), str(PER_SHARD), *cli(out)]
    killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    parts = sorted(p.name for p in (out / ".parts").glob("*.json"))
    assert parts == [f"shard-{i:06d}.tar.json" for i in range(k)]  # shard k's record never written
    assert not (out / "manifest.json").exists()
    if where == "before-part-record":
        assert sha256(out / f"shard-{k:06d}.tar") == sha256(reference / f"shard-{k:06d}.tar")  # renamed, unrecorded
    else:
        (partial,) = out.glob(f"shard-{k:06d}.tar.*.tmp")
        assert partial.stat().st_size > 0 and not (out / f"shard-{k:06d}.tar").exists()
    rerun = subprocess.run(
        [sys.executable, "-m", "soilnet.cli", *cli(out)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"{N // PER_SHARD - k} shard(s) written, {k} already complete" in rerun.stderr
    assert outcome(out) == outcome(reference)


# -- a full disk -----------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path, reference):
    """A tmpfs that holds about two and a half shards; remount it with ``size=`` to give the space back."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size = int(2.5 * (reference / "shard-000000.tar").stat().st_size)
    if shutil.which("mount") is None:
        pytest.skip("no mount command to create a small tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_with_a_clear_error_and_the_rerun_with_space_back_completes(reference, small_disk):
    out = small_disk / "shards"
    full = subprocess.run(
        [sys.executable, "-m", "soilnet.cli", *cli(out)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert full.returncode == 2, full.stderr  # the CLI's "bad input or environment" exit, not a traceback
    assert "Traceback" not in full.stderr
    assert f"writing {out / 'shard-000002.tar'}: No space left on device" in full.stderr
    assert "MiB free of" in full.stderr and "rerun the same command" in full.stderr
    assert not list(out.rglob("*.tmp"))  # the half-written shard is gone, not left to be mistaken for data
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    rerun = subprocess.run(
        [sys.executable, "-m", "soilnet.cli", *cli(out)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "4 shard(s) written, 2 already complete" in rerun.stderr
    assert outcome(out) == outcome(reference)


# -- a source that throws on one point -------------------------------------------------------------------------
class ThrowsOnOnePoint:
    """The real configured source, except that ``patch`` raises at one longitude (a bug, a corrupt tile)."""

    def __init__(self, inner, bad_lon: float, concurrency: int):
        self.inner, self.bad_lon, self.concurrency = inner, bad_lon, concurrency

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def patch(self, lon, lat):
        if lon == self.bad_lon:
            raise RuntimeError("tile decoder crashed")
        return self.inner.patch(lon, lat)


@pytest.mark.parametrize("threads", [1, 4])
def test_a_source_exception_on_one_point_goes_to_the_ledger_and_the_run_completes(
    reference, tmp_path, monkeypatch, threads
):
    cfg = cfg_for(tmp_path)
    points = load_points(cfg)
    bad = 20  # in shard 1
    real = shards.pack.make_source
    monkeypatch.setattr(shards.pack, "make_source", lambda c, s: ThrowsOnOnePoint(real(c, s), points.lon[bad], threads))
    manifest = pack(cfg)
    assert manifest["samples"] == N - 1
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert ledger == [
        {
            "id": str(points.ids[bad]),
            "reason": "error",
            "detail": "RuntimeError: tile decoder crashed",
            "shard": "shard-000001.tar",
        }
    ]
    assert "failed: 1" in summary(manifest, tmp_path)
    got, want = outcome(tmp_path), outcome(reference)
    for name in want["shards"]:
        if name != "shard-000001.tar":
            assert got["shards"][name] == want["shards"][name], name
    assert shard_ids(tmp_path / "shard-000001.tar") == sorted(
        set(shard_ids(reference / "shard-000001.tar")) - {str(points.ids[bad])}
    )


# -- an empty shard --------------------------------------------------------------------------------------------
class RejectsFirstShard:
    """The real source, rejecting every point of shard 0 (all water, say): shard 0 is written empty."""

    def __init__(self, inner, rejected_lons: set[float]):
        self.inner, self.rejected_lons = inner, rejected_lons

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def patch(self, lon, lat):
        if lon in self.rejected_lons:
            raise Rejected("water", "no land in the patch")
        return self.inner.patch(lon, lat)


def test_an_empty_shard_does_not_overwrite_the_next_shard_written_by_another_worker(reference, tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path)
    rejected = set(load_points(cfg).lon[:PER_SHARD].tolist())
    real = shards.pack.make_source
    monkeypatch.setattr(shards.pack, "make_source", lambda c, s: RejectsFirstShard(real(c, s), rejected))
    assert pack(cfg, Workers(rank=1, world=2, is_array=True)) is None  # shards 1, 3, 5
    manifest = pack(cfg, Workers(rank=0, world=2, is_array=True))  # shards 0 (empty), 2, 4, and the manifest
    assert [s["samples"] for s in manifest["shards"]] == [0] + [PER_SHARD] * 5
    on_disk = {p.name: sha256(p) for p in sorted(tmp_path.glob("shard-*"))}
    assert on_disk == {s["name"]: s["sha256"] for s in manifest["shards"]}  # no stray file, none overwritten
    assert on_disk["shard-000001.tar"] == sha256(reference / "shard-000001.tar")


# -- Slurm arrays ----------------------------------------------------------------------------------------------
def slurm_env(task: int, indices: list[int], step: int) -> dict[str, str]:
    """What Slurm sets in an array task (as observed with Slurm 22-24: STEP is 1 for a list such as 1,3,5)."""
    return {
        "SLURM_ARRAY_JOB_ID": "7",
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MIN": str(min(indices)),
        "SLURM_ARRAY_TASK_MAX": str(max(indices)),
        "SLURM_ARRAY_TASK_COUNT": str(len(indices)),
        "SLURM_ARRAY_TASK_STEP": str(step),
    }


@pytest.mark.parametrize(
    ("spec", "indices", "step"),
    [
        ("0-6:2", [0, 2, 4, 6], 2),
        ("1,3,5", [1, 3, 5], 1),
        ("0-30:2", list(range(0, 31, 2)), 2),
        ("3-9", list(range(3, 10)), 1),
        ("5", [5], 1),
    ],
)
def test_array_tasks_are_numbered_by_their_position_among_the_arrays_indices(spec, indices, step):
    ranks = [array_task(slurm_env(task, indices, step)) for task in indices]
    assert ranks == [(r, len(indices)) for r in range(len(indices))], spec


@pytest.mark.parametrize(
    ("spec", "indices", "step", "failing"),
    [("1,2,9", [1, 2, 9], 1, [2]), ("1-7:2,20", [1, 3, 5, 7, 20], 2, [1, 3, 5, 7, 20])],
)  # 1,2,9 looks like 1,5,9 to tasks 1 and 9 (ranks 0 and 2 of 3, their own shards); task 2 has no place
def test_an_array_with_uneven_indices_fails_naming_the_variables(spec, indices, step, failing):
    for task in failing:
        with pytest.raises(ConfigError, match="not evenly spaced") as err:
            array_task(slurm_env(task, indices, step))
        assert f"SLURM_ARRAY_TASK_ID={task}" in str(err.value) and "SLURM_ARRAY_TASK_COUNT" in str(err.value)
        assert "--array=A-B:STEP" in str(err.value)


def test_no_index_set_makes_two_tasks_pack_the_same_shards():
    """Over every set of up to 5 indices in 0..9: the tasks that get a rank get distinct ranks below the count,
    and every task gets one only when the indices are evenly spaced (then no shard is left without a packer)."""
    for size in range(1, 6):
        for indices in itertools.combinations(range(10), size):
            ranks = []
            for task in indices:
                try:
                    ranks.append(array_task(slurm_env(task, list(indices), 1))[0])
                except ConfigError:
                    pass
            assert len(set(ranks)) == len(ranks) and all(0 <= r < size for r in ranks), indices
            even = size == 1 or len({b - a for a, b in itertools.pairwise(indices)}) == 1
            assert (len(ranks) == size) == even, indices


def test_workers_from_env_reads_a_stepped_array(monkeypatch):
    for key, value in slurm_env(30, list(range(0, 31, 2)), 2).items():
        monkeypatch.setenv(key, value)
    workers = workers_from_env()
    assert (workers.rank, workers.world, workers.is_array) == (15, 16, True)  # not "rank 30 of 16"


# -- the request budget ----------------------------------------------------------------------------------------
def enolck(fd, cmd, *args):
    raise OSError(errno.ENOLCK, "No locks available")


def test_a_budget_on_a_file_system_without_locks_fails_at_once_naming_the_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(shards.budget.fcntl, "lockf", enolck)  # as an NFS mount without a lock manager answers
    with pytest.raises(OSError) as err:
        InFlightBudget(tmp_path / "budget", 4)
    assert err.value.errno == errno.ENOLCK
    message = str(err.value)
    assert str(tmp_path / "budget") in message and "ENOLCK" in message
    assert all(fs in message for fs in ("local disk", "NFSv4", "Lustre", "flock", "GPFS", "budget_dir"))


def test_a_lock_error_in_a_request_fails_instead_of_waiting_forever(tmp_path, monkeypatch):
    budget = InFlightBudget(tmp_path, 2)
    monkeypatch.setattr(shards.budget.fcntl, "lockf", enolck)
    raised: list[BaseException] = []

    def request():
        try:
            with budget.slot():
                pass
        except OSError as err:
            raised.append(err)

    worker = threading.Thread(target=request, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "slot() still waiting on a lock error"
    assert len(raised) == 1 and raised[0].errno == errno.ENOLCK and str(tmp_path) in str(raised[0])


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_slot_held_by_another_process_is_waited_for_not_an_error(tmp_path):
    budget = InFlightBudget(tmp_path, 1)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "slot-0000.lock"), "1.0"], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    with budget.slot() as k:  # EAGAIN/EACCES until the holder exits and the kernel drops its lock
        assert k == 0
    assert holder.wait(timeout=30) == 0
    assert time.monotonic() - start > 0.5  # it waited for the holder (which held it 1 s): busy, not broken
