"""``soilnet pack``: points -> samples from a source -> WebDataset shards, a manifest, statistics and a ledger.

Which point lands in which shard depends only on the point list and ``shard.max_samples``: shard ``k`` holds
points ``[k * max_samples, (k + 1) * max_samples)``. Workers (MPI ranks or Slurm array tasks) take shards
round-robin, so any number of them produces the same shards. A shard is written by webdataset's ``TarWriter``
to a temporary name, fsynced and renamed; only then is its part record (sample count, sha256, partial
statistics, rejections) written, atomically. A rerun skips every shard that has its part record, so a job killed
at any moment (kill -9 included) reruns to the same result. The manifest is written last, from the part records.
A full disk stops the pack with an error naming the file and the free space, and leaves no partial file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import pandas as pd
import webdataset as wds

from shards import stats
from shards.parallel import Workers, workers_from_env
from shards.sample import filters_from_args, sample_region
from shards.sources import earthengine, rasters, stac
from shards.sources.base import Patch, Rejected, Source
from shards.sources.synthetic import SyntheticWorld, sample_bbox
from soilnet import __version__
from soilnet.atomic import atomic_file
from soilnet.config.base import ConfigError, save_resolved, to_plain
from soilnet.config.pack import PackConfig
from soilnet.progress import Progress
from soilnet.schema import SampleSchema

FORMAT = "soilnet-shards/1"
PARTS = ".parts"


class Provenance(Protocol):
    """What a manifest records of where its samples came from: a :class:`Source`, or an import's plan."""

    name: str

    def versions(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Points:
    """The point list: ``ids`` (str, no dots), ``lon`` and ``lat`` in degrees (WGS84)."""

    ids: np.ndarray
    lon: np.ndarray
    lat: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def load_points(cfg: PackConfig) -> Points:
    """From ``sampling.points`` (parquet/csv with id, lon, lat), a ``sampling.region``, or the synthetic bbox."""
    s = cfg.sampling
    if s.points:
        path = Path(s.points)
        if not path.is_file():
            raise ConfigError(f"sampling.points: file not found: {path}")
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={"id": str})
        missing = {"id", "lon", "lat"} - set(table.columns)
        if missing:
            raise ConfigError(f"{path}: missing columns {sorted(missing)}; it has {list(table.columns)}")
        ids = table["id"].astype(str).to_numpy()
        bad = [i for i in ids if "." in i]
        if bad:
            raise ConfigError(f"{path}: point ids may not contain dots (WebDataset keys), e.g. {bad[:3]}")
        return Points(ids, table["lon"].to_numpy(float), table["lat"].to_numpy(float))
    if s.region:
        table = sample_region(s.region, s.n, s.seed, filters_from_args(s))
        return Points(table["id"].to_numpy(), table["lon"].to_numpy(float), table["lat"].to_numpy(float))
    if cfg.source.kind != "synthetic":
        raise ConfigError("sampling: set sampling.region or sampling.points (only the synthetic world has a bbox)")
    lon, lat = sample_bbox(cfg.source.bbox, s.n, s.seed)
    return Points(np.array([f"p{i:010d}" for i in range(s.n)]), lon, lat)


def _synthetic(cfg: PackConfig, schema: SampleSchema) -> Source:
    return SyntheticWorld(schema, cfg.source.seed, cfg.source.bbox)


def _rasters(cfg: PackConfig, schema: SampleSchema) -> Source:
    return rasters.from_config(schema, cfg.source.rasters)


def _earthengine(cfg: PackConfig, schema: SampleSchema) -> Source:
    return earthengine.from_config(schema, cfg.source.earthengine, cfg.output_dir)


def _stac(cfg: PackConfig, schema: SampleSchema) -> Source:
    return stac.from_config(schema, cfg.source.stac)


# ``source.kind`` -> the source it builds
SOURCES: dict[str, Callable[[PackConfig, SampleSchema], Source]] = {
    "synthetic": _synthetic,
    "rasters": _rasters,
    "earthengine": _earthengine,
    "stac": _stac,
}


def make_source(cfg: PackConfig, schema: SampleSchema) -> Source:
    return SOURCES[cfg.source.kind](cfg, schema)


def _no_space(err: OSError, path: Path) -> OSError:
    """The error for a full disk (or quota) while writing ``path``: the path and the space left."""
    usage = shutil.disk_usage(path.parent)
    code = err.errno or errno.ENOSPC
    return OSError(
        code,
        f"writing {path}: {os.strerror(code)} (removed; now {usage.free / 2**20:.1f} MiB free of "
        f"{usage.total / 2**20:.1f} MiB on the file system of {path.parent}). Free space (or set output_dir "
        "elsewhere) and rerun the same command: complete shards are kept, this one is written again",
    )


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """:func:`soilnet.atomic.atomic_file`, with a full disk (ENOSPC, EDQUOT) named: the path and the free space."""
    try:
        with atomic_file(path) as f:
            yield f
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(err, path) from err
        raise


def _atomic_json(path: Path, obj) -> None:
    with _atomic_file(path) as f:
        f.write(json.dumps(obj).encode())


def _write_shard(path: Path, samples: list[dict]) -> None:
    """``samples`` as one WebDataset tar at ``path`` (written whole or not at all; fixed mtime: same bytes on every
    run). webdataset's ShardWriter is not used: for an empty shard it would also create the next shard's file."""
    with _atomic_file(path) as f, wds.TarWriter(f, mtime=0) as sink:  # int: a float mtime costs a pax header per member
        for sample in samples:
            sink.write(sample)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_sample(source: Source, schema: SampleSchema, pid: str, lon: float, lat: float, on_nonfinite: str) -> dict:
    """One shard sample from ``source`` at (lon, lat); raises :class:`Rejected`."""
    patch = source.patch(lon, lat)
    climate = source.climate(lon, lat)
    targets = source.targets(lon, lat, patch, climate)
    modalities = getattr(source, "modalities", ("image", "climate"))
    return build_sample(
        schema,
        pid,
        lon,
        lat,
        patch if "image" in modalities else None,
        climate if "climate" in modalities else None,
        targets,
        on_nonfinite,
        source.name,
    )


def build_sample(
    schema: SampleSchema,
    pid: str,
    lon: float | None,
    lat: float | None,
    patch: Patch | None,
    climate: np.ndarray | None,
    targets: dict[str, float],
    on_nonfinite: str,
    source_name: str,
    qa: dict | None = None,
) -> dict:
    """The shard sample (``__key__``, ``image.npy`` unless ``patch`` is None, ``climate.npy`` unless ``climate`` is
    None, ``meta.json``). ``image``: ``(C, H, W)``, stored float16; ``climate``: ``(T, F)`` float32. ``lon``/``lat``
    None: a data set without coordinates. ``targets`` empty: an unlabelled sample. Raises :class:`Rejected`."""
    arrays = {}
    if patch is not None:
        schema.check_image(patch.image, f"point {pid}: image")
        arrays["image"] = patch.image
    if climate is not None:
        schema.check_climate(climate, f"point {pid}: climate")
        arrays["climate"] = climate
    qa = {**(patch.qa if patch is not None else {}), **(qa or {})}
    for name, arr in arrays.items():
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            if on_nonfinite == "reject":
                raise Rejected("nonfinite", f"{bad} NaN/inf values in the {name}")
            qa[f"{name}_nonfinite"] = bad
    meta = {
        "id": pid,
        "lon": None if lon is None else float(lon),
        "lat": None if lat is None else float(lat),
        "scene_date": patch.scene_date if patch is not None else None,
        "source": source_name,
        "qa": qa,
    }
    if targets:
        meta["targets"] = targets
    sample: dict[str, Any] = {"__key__": pid}
    if patch is not None:
        sample["image.npy"] = np.nan_to_num(patch.image, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float16)
    if climate is not None:
        sample["climate.npy"] = np.nan_to_num(climate, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    sample["meta.json"] = meta
    return sample


def _partial_stats(samples: list[dict], schema: SampleSchema) -> dict:
    """Per-channel, per-variable and per-target statistics of one shard's samples (targets: labelled ones only)."""
    out: dict = {"image": {}, "climate": {}, "targets": {}}
    if not samples:
        return out
    if "image.npy" in samples[0]:
        images = np.stack([s["image.npy"] for s in samples]).astype(np.float32)
        for k, name in enumerate(schema.channels):
            out["image"][name] = stats.describe(images[:, k])
    if "climate.npy" in samples[0]:
        climates = np.stack([s["climate.npy"] for s in samples])
        for k, name in enumerate(schema.climate_variables):
            out["climate"][name] = stats.describe(climates[..., k])
    targets = [s["meta.json"].get("targets", {}) for s in samples]
    for name in sorted({t for tmap in targets for t in tmap}):
        out["targets"][name] = stats.describe(np.array([tmap[name] for tmap in targets if name in tmap]))
    return out


def acquire(source: Source, points: Points, i: int, on_nonfinite: str) -> dict:
    """Point ``i`` as a shard sample, or its ledger record (``id``, ``reason``, ``detail``)."""
    pid = str(points.ids[i])
    try:
        return make_sample(source, source.schema, pid, points.lon[i], points.lat[i], on_nonfinite)
    except Rejected as err:
        return {"id": pid, "reason": err.reason, "detail": err.detail}
    except Exception as err:  # a broken point must not stop the other 10 million; it is recorded
        return {"id": pid, "reason": "error", "detail": f"{type(err).__name__}: {err}"}


def acquire_in_order(fn: Callable[[int], dict], indices: Iterable[int], threads: int) -> Iterator[dict]:
    """``fn`` over ``indices``, results in order; ``threads > 1`` keeps that many calls running, across shard
    boundaries, with a bounded look-ahead (a remote source waits on the network, not on this CPU)."""
    if threads <= 1:
        yield from map(fn, indices)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future] = deque()
        for i in indices:
            pending.append(pool.submit(fn, i))
            if len(pending) >= 4 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def shard_points(k: int, n_points: int, max_samples: int) -> range:
    return range(k * max_samples, min((k + 1) * max_samples, n_points))


def pack_shard(
    k: int, results: Iterator[dict], count: int, cfg: PackConfig, schema: SampleSchema, out: Path, progress: Progress
) -> dict:
    """Write shard ``k`` from the next ``count`` results (its points) and return its part record."""
    samples: list[dict] = []
    rejected: list[dict] = []
    for _ in range(count):
        result = next(results)
        (samples if "__key__" in result else rejected).append(result)
        progress.update(1)
    name = f"shard-{k:06d}.tar"
    _write_shard(out / name, samples)  # an empty shard is written too, so shard numbers stay dense
    part = {
        "name": name,
        "samples": len(samples),
        "sha256": _sha256(out / name),
        "ids": [s["__key__"] for s in samples],
        "stats": _partial_stats(samples, schema),
        "rejected": rejected,
    }
    _atomic_json(out / PARTS / f"{name}.json", part)
    return part


def pack_shards(
    todo: list[int], points: Points, source: Source, cfg: PackConfig, out: Path, progress: Progress
) -> Iterator[dict]:
    """Write the shards ``todo`` in order, yielding each part record; points are acquired in order on
    ``source.concurrency`` threads (1 when the source does not say)."""
    size = cfg.shard.max_samples
    indices = (i for k in todo for i in shard_points(k, len(points), size))
    results = acquire_in_order(
        lambda i: acquire(source, points, i, cfg.shard.on_nonfinite), indices, getattr(source, "concurrency", 1)
    )
    for k in todo:
        yield pack_shard(k, results, len(shard_points(k, len(points), size)), cfg, source.schema, out, progress)


def write_manifest(cfg: PackConfig, out: Path, schema: SampleSchema, n_shards: int, source: Provenance) -> dict | None:
    """Merge every part record into ``manifest.json`` and ``ledger.jsonl``; None while parts are missing."""
    part_files = [out / PARTS / f"shard-{k:06d}.tar.json" for k in range(n_shards)]
    if not all(p.exists() for p in part_files):
        return None
    parts = [json.loads(p.read_text()) for p in part_files]
    merged = stats.merge_tree([p["stats"] for p in parts])
    manifest = {
        "format": FORMAT,
        "schema": schema.to_dict(),
        "modalities": list(getattr(source, "modalities", ["image", "climate"])),
        "image_encoding": {"dtype": cfg.shard.image_dtype},
        "targets": sorted(merged.get("targets", {})),
        "shards": [{"name": p["name"], "samples": p["samples"], "sha256": p["sha256"]} for p in parts],
        "samples": sum(p["samples"] for p in parts),
        "stats": merged,
        "config": to_plain(cfg),
        "sources": {
            "kind": source.name,
            "versions": {"soilnet": __version__, "webdataset": wds.__version__, **source.versions()},
        },
    }
    with _atomic_file(out / "ledger.jsonl") as f:
        for p in parts:
            for r in p["rejected"]:
                f.write((json.dumps({**r, "shard": p["name"]}) + "\n").encode())
    _atomic_json(out / "manifest.json", manifest)
    return manifest


def pack(cfg: PackConfig, workers: Workers | None = None) -> dict | None:
    """Pack this worker's shards; the worker that completes the set writes and returns the manifest."""
    workers = workers or workers_from_env()
    schema = cfg.schema_.build()
    out = Path(cfg.output_dir)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    if workers.rank == 0:
        save_resolved(cfg, out)
    source = make_source(cfg, schema)  # first: a bad source (e.g. Earth Engine auth) fails before any work
    points = load_points(cfg)
    if len(points) == 0:
        raise ConfigError("sampling: no points to pack")
    n_shards = -(-len(points) // cfg.shard.max_samples)
    mine = [k for k in range(n_shards) if k % workers.world == workers.rank]
    todo = [k for k in mine if not (out / PARTS / f"shard-{k:06d}.tar.json").exists()]
    skipped = len(mine) - len(todo)
    for stale in out.glob("shard-*.tar.*.tmp"):  # a killed writer's leftovers; never listed anywhere
        if int(stale.name[6:12]) in todo:
            stale.unlink()
    total = sum(len(shard_points(k, len(points), cfg.shard.max_samples)) for k in todo)
    start = time.time()
    packed = rejected = 0
    # every worker (MPI rank, Slurm array task) reports its own part, in its own log
    with Progress(f"pack[{workers.rank}/{workers.world}]", total, "sample") as progress:
        for part in pack_shards(todo, points, source, cfg, out, progress):
            packed += part["samples"]
            rejected += len(part["rejected"])
    rate = (packed + rejected) / max(time.time() - start, 1e-9)
    print(
        f"pack[{workers.rank}/{workers.world}]: {len(todo)} shard(s) written, {skipped} already complete; "
        f"{packed} packed, {rejected} rejected ({rate:.0f} samples/s)",
        file=sys.stderr,
    )
    workers.barrier()
    if workers.rank != 0 and workers.world > 1 and not workers.is_array:
        return None
    return write_manifest(cfg, out, schema, n_shards, source)


def summary(manifest: dict, out: Path) -> str:
    reasons: dict[str, int] = {}
    ledger = out / "ledger.jsonl"
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            r = json.loads(line)["reason"]
            reasons[r] = reasons.get(r, 0) + 1
    failed = reasons.pop("error", 0)
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none"
    return (
        f"packed {manifest['samples']} samples in {len(manifest['shards'])} shards; rejected: {by_reason}; "
        f"failed: {failed}. Manifest: {out / 'manifest.json'}"
    )
