"""``soilnet verify --shards DIR``: every shard of a manifest checked against the sha256 the packer recorded.

The loader finds a sample whose tar headers, ``.npy`` headers or sizes are damaged (and replaces it), but not a
flipped bit inside a sample's values: only the checksum of the whole shard shows that. Run it after copying a
shard set, or when a run reports corrupt samples or a non-finite loss.
"""

from __future__ import annotations

import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from soilnet.data.shards import manifest_path, read_manifest


@dataclass(frozen=True)
class ShardCheck:
    """One manifest entry: ``problem`` is None for a shard whose sha256 matches, else what is wrong."""

    name: str
    samples: int
    size: int  # bytes read (0 when missing)
    problem: str | None


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)  # hashlib releases the GIL for large blocks: threads hash shards in parallel
    return h.hexdigest()


def check_shard(folder: Path, entry: dict) -> ShardCheck:
    name, samples = str(entry.get("name")), int(entry.get("samples") or 0)
    path = folder / name
    want = entry.get("sha256")
    if not path.is_file():
        return ShardCheck(name, samples, 0, f"missing: {path} does not exist")
    size = path.stat().st_size
    if not want:
        return ShardCheck(name, samples, size, "the manifest records no sha256 for it")
    try:
        got = sha256_of(path)
    except OSError as err:
        return ShardCheck(name, samples, size, f"unreadable: {err}")
    if got != want:
        return ShardCheck(name, samples, size, f"sha256 {got} where the manifest records {want} ({size} bytes)")
    return ShardCheck(name, samples, size, None)


def verify(shards: str | Path, workers: int = 4) -> tuple[Path, list[ShardCheck]]:
    """(the manifest, one check per manifest entry in manifest order); ``workers`` threads hash shards at once."""
    manifest, folder = read_manifest(shards)
    entries = manifest.get("shards") or []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        checks = list(pool.map(lambda e: check_shard(folder, e), entries))
    return manifest_path(shards), checks


def run_cli(args) -> int:
    """Prints one line per bad or missing shard, then a one-line summary; returns 1 if any shard is bad, else 0."""
    where, checks = verify(args.shards, args.workers)
    bad = [c for c in checks if c.problem]
    for c in bad:
        print(f"BAD {c.name}: {c.problem}", file=sys.stderr)
    total = sum(c.size for c in checks)
    samples = sum(c.samples for c in checks)
    if bad:
        lost = sum(c.samples for c in bad)
        print(f"{len(bad)} of {len(checks)} shards bad ({lost} of {samples} samples) against {where}")
        return 1
    print(f"{len(checks)} shards ok ({samples} samples, {total / 2**20:.1f} MiB) against {where}")
    return 0
