"""STAC acquisition against the local-raster source and Earth Engine, on the same points, in one run.

Writes a test world into a temporary folder (tests/shards/cog_kit.py, zarr_kit.py): two Landsat 8 C2 L2 scenes of
one path/row over the same ground (a clear winter scene, a greener summer one; one COG per band, UTM 32N, 30 m),
GLO-30 DEM tiles and a TerraClimate Zarr store; then ``--n`` random points inside the scene at ``--km2-per-point``
(1 km² each by default: 10 M samples over Europe's 10 M km²). Three runs of ``soilnet pack`` over those points,
each on ``--workers`` MPI ranks (1: a plain process):

- ``stac``: the STAC source (``source.kind: stac``; ``--threads`` and ``--max-per-host`` per rank, by default
  those of configs/preprocess/europe_stac.yaml) against the fake STAC API (tests/shards/fake_stac.py), the
  scenes, DEM and Zarr store served by nginx with range requests, every request (catalogue, COG, Zarr) answered
  after ``--delay-s`` (50 ms, the latency of object storage) by the delaying proxy (tests/shards/http_server.py);
- ``local``: the local-raster source reading the same scene and DEM from disk (cog_kit.local_rasters: the
  reflectance, indices, elevation and slope on the scene's grid) and the same climate as GeoTIFFs;
- ``earthengine``: the Earth Engine source against its fake service (tests/shards/fake_earthengine.py, in its own
  process) at ``--ee-latency-s`` (300 ms) per request and its quota of ``--ee-max-in-flight`` (40) requests in
  flight, as benchmarks/ee_acquire.py runs it.

Each rate is the packing loop's, from every rank's own report (``pack[r/w]: ... N samples/s``, whole samples/s, so
about 1 sample/s of rounding per rank): points over the slowest rank's loop time, start-up (imports, catalogue
check, authentication) excluded in all three alike.

Last stdout line: one JSON object; ``samples_per_s`` (the STAC rate), ``vs_local`` (target >= 0.7: the network is
not what limits it) and ``vs_earthengine`` (target >= 2).

    .venv/bin/python benchmarks/stac_acquire.py --n 1000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "shards"))

from cog_kit import corner_point, dem_covering, landsat_scene, local_rasters, scene_grid  # noqa: E402
from fake_stac import DEM_COLLECTION, LANDSAT_COLLECTION, FakeStac, dem_item, landsat_item  # noqa: E402
from http_server import nginx_binary, serve_directory  # noqa: E402
from zarr_kit import climate_geotiffs, terraclimate_zarr  # noqa: E402

from soilnet.schema import PATCH_SIZE, PIXEL_SIZE_M, SampleSchema  # noqa: E402

LON, LAT = 8.5, 47.2  # Switzerland, UTM zone 32N
YEAR = 2015
RANK_LINE = re.compile(r"pack\[(\d+)/(\d+)\]: .*?(\d+) packed, (\d+) rejected \((\d+) samples/s\)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=800, help="points to pack (the same in all three runs)")
    parser.add_argument("--km2-per-point", type=float, default=1.0, help="ground area per point (density)")
    parser.add_argument(
        "--workers", type=int, default=2 if shutil.which("mpirun") else 1, help="MPI ranks in every run"
    )
    parser.add_argument("--delay-s", type=float, default=0.05, help="the HTTP server's delay per request")
    parser.add_argument("--threads", type=int, default=16, help="STAC: threads per process (europe_stac.yaml's)")
    parser.add_argument(
        "--max-per-host", type=int, default=8, help="STAC: requests in flight per host and process (europe_stac.yaml's)"
    )
    parser.add_argument("--ee-latency-s", type=float, default=0.3, help="Earth Engine: latency of every API call")
    parser.add_argument("--ee-max-in-flight", type=int, default=40, help="Earth Engine: the concurrent-request quota")
    parser.add_argument("--skip-ee", action="store_true", help="leave the Earth Engine run out")
    return parser.parse_args()


@dataclass
class World:
    """The files of the test world and the points, as ``(lon, lat)`` pairs."""

    www: Path
    winter: object
    summer: object
    dem: list
    store: object
    images: list
    climate: list
    points: list[tuple[float, float]]


def build_world(d: Path, args: argparse.Namespace, schema: SampleSchema) -> World:
    """Scenes large enough for ``n`` points at the density asked, plus a margin for the patch and the DEM."""
    side_px = math.ceil(math.sqrt(args.n * args.km2_per_point) * 1000 / PIXEL_SIZE_M) + 2 * PATCH_SIZE
    size = (side_px, side_px)
    crs, transform = scene_grid(LON, LAT, side_px, side_px)
    www = d / "www"
    winter = landsat_scene(www, crs, transform, size, date=f"{YEAR}-01-10", ndvi=0.3)
    summer = landsat_scene(www, crs, transform, size, date=f"{YEAR}-07-02", ndvi=0.7, seed=1)
    dem = dem_covering(www, winter.bounds_lonlat(), size_deg=0.1)
    west, south, east, north = winter.bounds_lonlat()
    store = terraclimate_zarr(www / "terraclimate.zarr", schema, (west - 0.1, south - 0.1, east + 0.1, north + 0.1))
    images = local_rasters(winter, dem, d / "local", schema)
    climate = climate_geotiffs(store, d / "local")
    rng = np.random.default_rng(0)
    low, high = PATCH_SIZE, side_px - PATCH_SIZE
    rows, cols = rng.uniform(low, high, args.n), rng.uniform(low, high, args.n)
    points = [corner_point(crs, transform, r, c) for r, c in zip(rows, cols, strict=True)]
    return World(www, winter, summer, dem, store, images, climate, points)


def write_points(path: Path, points: list[tuple[float, float]]) -> Path:
    rows = ["id,lon,lat", *(f"b{i:07d},{x:.7f},{y:.7f}" for i, (x, y) in enumerate(points))]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_config(d: Path, name: str, points: Path, source: dict, max_samples: int) -> Path:
    """A pack config for one run: the points, ``source``, ``max_samples`` per shard."""
    cfg = {
        "output_dir": str(d / name / "shards"),
        "sampling": {"points": str(points), "region": None},
        "source": source,
        "shard": {"max_samples": max_samples, "on_nonfinite": "mask"},
    }
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_pack(config: Path, workers: int, overrides: tuple[str, ...] = ()) -> dict:
    """``soilnet pack`` on ``workers`` ranks: the loop's rate over all ranks, the wall time, the CPU time of every
    rank per point (start-up included: an upper bound of the loop's), packed and rejected."""
    argv = [sys.executable, "-m", "soilnet.cli", "pack", "--config", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if workers > 1:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        argv = ["mpirun", "-n", str(workers), "--oversubscribe", *argv]
    wall, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # every rank, start-up included
    if done.returncode != 0:
        sys.exit(f"pack failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-4000:]}")
    ranks = [tuple(int(v) for v in m.groups()) for m in RANK_LINE.finditer(done.stderr)]
    if len(ranks) != workers:
        sys.exit(f"expected {workers} rank reports in pack's stderr, found {len(ranks)}:\n{done.stderr[-4000:]}")
    points = sum(p + r for _, _, p, r, _ in ranks)
    loop_s = max((p + r) / max(rate, 1) for _, _, p, r, rate in ranks)
    packed, rejected = sum(r[2] for r in ranks), sum(r[3] for r in ranks)
    return {"samples_per_s": points / loop_s, "wall_s": wall, "cpu_s": cpu_s, "packed": packed, "rejected": rejected}


def pack_twice(d: Path, name: str, points: tuple[Path, Path], source: dict, args: argparse.Namespace, log=None):
    """Pack all points (shards of a quarter of a rank's points), then one point per rank: the CPU time between
    the two is the packing loop's, start-up excluded; ``cores / loop CPU per sample`` is the rate these cores
    would give the source with nothing else running (the machine's other load excluded). ``log()``, if given,
    is called between the runs (the request log of the first)."""
    every, one_per_rank = points
    full = run_pack(write_config(d, name, every, source, max(1, args.n // (4 * args.workers))), args.workers)
    extra = log() if log else {}
    start = run_pack(write_config(d, f"{name}-startup", one_per_rank, source, 1), args.workers)
    loop_ms = 1000 * (full["cpu_s"] - start["cpu_s"]) / (args.n - args.workers)
    full.update(
        startup_cpu_s=start["cpu_s"],
        cpu_ms_per_sample_loop=loop_ms,
        cpu_bound_samples_per_s=(os.cpu_count() or 1) * 1000 / max(loop_ms, 1e-3),
        **extra,
    )
    return full


def stac_run(d: Path, world: World, points: tuple[Path, Path], args: argparse.Namespace) -> dict:
    """Pack from the STAC source with every HTTP request delayed by ``--delay-s``."""
    with serve_directory(world.www, delay_s=args.delay_s) as server, FakeStac(latency_s=args.delay_s) as stac:
        stac.add(LANDSAT_COLLECTION, [landsat_item(s, server.href) for s in (world.winter, world.summer)])
        stac.add(DEM_COLLECTION, [dem_item(t, server.href) for t in world.dem])
        source = {
            "kind": "stac",
            "stac": {
                "url": stac.url,
                "year": YEAR,
                "climate_store": server.href("terraclimate.zarr"),
                "threads": args.threads,
                "max_per_host": args.max_per_host,
            },
        }
        server_cpu = time.process_time()  # this process: the proxy and the fake catalogue, the "remote" side

        def log() -> dict:
            stats = http_stats(server.requests, args.n)
            stats.update(server_cpu_s=time.process_time() - server_cpu, http_max_in_flight=server.max_in_flight)
            stats.update(stac_searches=len(stac.first_searches()), stac_violations=len(stac.violations))
            return stats

        return pack_twice(d, "stac", points, source, args, log)


def http_stats(requests: list, n: int) -> dict:
    """What the packers asked of the file server: requests (per sample), HEAD probes, bytes, and how many asked
    again for a range already fetched (by another thread or rank, or after a cache eviction)."""
    distinct = {(r.path, r.range) for r in requests if r.method == "GET"}
    gets = sum(r.method == "GET" for r in requests)
    return {
        "http_requests": len(requests),
        "http_requests_per_sample": round(len(requests) / max(n, 1), 2),
        "http_head": sum(r.method == "HEAD" for r in requests),
        "http_repeated_gets": gets - len(distinct),
        "http_mb": round(sum(r.nbytes for r in requests) / 1e6, 1),
    }


def local_run(d: Path, world: World, points: tuple[Path, Path], args: argparse.Namespace) -> dict:
    """Pack from the local-raster source: the same scene, DEM and climate, from disk."""
    source = {
        "kind": "rasters",
        "rasters": {
            "images": [{"path": str(p), "bands": bands} for p, bands in world.images],
            "climate": [{"path": str(p), "variable": v, "first_month": m, "scale": s} for p, v, m, s in world.climate],
            "scene_date": world.winter.date,
        },
    }
    return pack_twice(d, "local", points, source, args)


def ee_run(d: Path, points: tuple[Path, Path], args: argparse.Namespace) -> dict:
    """Pack from the Earth Engine source against its fake at ``--ee-latency-s``, under its quota."""
    key = d / "ee-key.json"
    fake = subprocess.Popen(
        [sys.executable, str(REPO / "tests/shards/fake_earthengine.py"), "--key", str(key)]
        + ["--latency-s", str(args.ee_latency_s)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert fake.stdout is not None
        url = fake.stdout.readline().strip()
        threads = -(-args.ee_max_in_flight // args.workers)
        ee = {"url": url, "service_account_key": str(key), "project": "bench", "year": YEAR}
        ee.update(max_in_flight=args.ee_max_in_flight, threads=threads, budget_dir=str(d / "ee-budget"))
        result = pack_twice(d, "earthengine", points, {"kind": "earthengine", "earthengine": ee}, args)
        result["threads"] = threads
    finally:
        fake.kill()
        fake.wait()
    return result


def rounded(run: dict | None) -> dict | None:
    return run and {k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()}


def summary(args: argparse.Namespace, stac: dict, local: dict, ee: dict | None, world: dict) -> dict:
    """The JSON line: the three runs, the measured ratios, and the ratio the CPU times give on idle cores (each
    source at ``cores / loop CPU per sample``, Earth Engine at most at its quota's ceiling)."""
    ceiling = args.ee_max_in_flight / args.ee_latency_s / 2  # 2 requests per sample
    idle = None
    if ee:
        idle = stac["cpu_bound_samples_per_s"] / min(ee["cpu_bound_samples_per_s"], ceiling)
    return {
        "samples": args.n,
        "workers": args.workers,
        "cores": os.cpu_count(),
        "threads_per_worker": args.threads,
        "max_per_host": args.max_per_host,
        "delay_s": args.delay_s,
        "km2_per_point": args.km2_per_point,
        **world,
        "stac": rounded(stac),
        "local": rounded(local),
        "earthengine": rounded(ee),
        "ee_latency_s": args.ee_latency_s,
        "ee_max_in_flight": args.ee_max_in_flight,
        "ee_quota_ceiling_samples_per_s": round(ceiling, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "samples_per_s": round(stac["samples_per_s"], 2),
        "vs_local": round(stac["samples_per_s"] / local["samples_per_s"], 3),
        "vs_earthengine": ee and round(stac["samples_per_s"] / ee["samples_per_s"], 3),
        "vs_earthengine_idle_cores": idle and round(idle, 3),
    }


def main() -> None:
    args = parse_args()
    if nginx_binary() is None:
        sys.exit("stac_acquire: nginx is not installed (Debian package nginx; scripts/setup.sh installs it as root)")
    schema = SampleSchema()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="stac-acquire-") as tmp:
        d = Path(tmp)
        built = time.perf_counter()
        world = build_world(d, args, schema)
        points = write_points(d / "points.csv", world.points), write_points(d / "one.csv", world.points[: args.workers])
        built = time.perf_counter() - built
        served_mb = sum(p.stat().st_size for p in world.www.rglob("*") if p.is_file()) / 1e6
        stac = stac_run(d, world, points, args)
        local = local_run(d, world, points, args)
        ee = None if args.skip_ee else ee_run(d, points, args)
    about = {"world_build_s": round(built, 1), "served_mb": round(served_mb, 1), "load_average_at_start": load}
    result = summary(args, stac, local, ee, about)
    rates = f"STAC {stac['samples_per_s']:.1f}, local {local['samples_per_s']:.1f}"
    rates += f", Earth Engine {ee['samples_per_s']:.1f}" if ee else ""
    print(f"packed {args.n} points on {args.workers} process(es): {rates} samples/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
