"""Earth Engine acquisition against the quota ceiling, with the fake service and an injected latency.

The fake (tests/shards/fake_earthengine.py) runs in its own process and answers every API call after
``--latency-s``; ``soilnet pack`` runs from ``configs/preprocess/europe.yaml`` through the real earthengine-api
client, on ``--workers`` MPI ranks (1: a plain process) that share ``--max-in-flight`` request slots. The ceiling
is what the quota allows: ``max_in_flight / latency / requests_per_sample`` samples/s (2 requests per sample).
The achieved rate is measured by the fake: points over the time from the first API call to the last answer, so
the workers' start-up (imports, authentication) is excluded and staggered workers are not double counted.

Last stdout line: one JSON object; ``vs_quota_ceiling`` = achieved / ceiling.

    .venv/bin/python benchmarks/ee_acquire.py --n 800 --latency-s 0.3 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REQUESTS_PER_SAMPLE = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=800, help="points to pack")
    parser.add_argument("--latency-s", type=float, default=0.3, help="injected latency of every API call")
    parser.add_argument("--max-in-flight", type=int, default=40, help="the project's concurrent-request quota")
    parser.add_argument(
        "--workers",
        type=int,
        default=2 if shutil.which("mpirun") else 1,
        help="MPI ranks (default 2 with mpirun; one process is CPU-bound near 50/s)",
    )
    parser.add_argument("--threads", type=int, default=0, help="threads per worker (default: quota / workers)")
    return parser.parse_args()


def write_points(path: Path, n: int) -> None:
    """``n`` random points over Europe, seeded."""
    rng = np.random.default_rng(0)
    lon, lat = rng.uniform(-9, 30, n), rng.uniform(36, 70, n)
    rows = ["id,lon,lat", *(f"b{i:07d},{x:.5f},{y:.5f}" for i, (x, y) in enumerate(zip(lon, lat, strict=True)))]
    path.write_text("\n".join(rows) + "\n")


def pack_command(args: argparse.Namespace, d: Path, url: str, threads: int) -> tuple[list[str], dict[str, str]]:
    """``soilnet pack`` against the fake at ``url`` (under mpirun for more than one worker), and its environment."""
    overrides = [
        f"output_dir={d / 'shards'}",
        f"sampling.points={d / 'points.csv'}",
        "sampling.region=null",
        f"source.earthengine.url={url}",
        f"source.earthengine.service_account_key={d / 'key.json'}",
        "source.earthengine.project=bench",
        f"source.earthengine.max_in_flight={args.max_in_flight}",
        f"source.earthengine.threads={threads}",
        f"shard.max_samples={max(1, args.n // (4 * args.workers))}",
    ]
    argv = [sys.executable, "-m", "soilnet.cli", "pack", "--config", "configs/preprocess/europe.yaml"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.workers > 1:
        if shutil.which("mpirun") is None:
            sys.exit("--workers > 1 needs mpirun (Debian's openmpi-bin)")
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        argv = ["mpirun", "-n", str(args.workers), "--oversubscribe", *argv]
    return [*argv, *overrides], env


def acquire(args: argparse.Namespace, threads: int) -> tuple[float, dict]:
    """Pack ``--n`` points against a fake Earth Engine; the wall time with start-up and the fake's statistics."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        fake = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests/shards/fake_earthengine.py"),
                "--key",
                str(d / "key.json"),
                "--latency-s",
                str(args.latency_s),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert fake.stdout is not None
            url = fake.stdout.readline().strip()
            write_points(d / "points.csv", args.n)
            argv, env = pack_command(args, d, url, threads)
            wall = time.perf_counter()
            subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - wall
            with urllib.request.urlopen(url + "/stats") as answer:
                stats = json.load(answer)
        finally:
            fake.kill()
            fake.wait()
    return wall, stats


def main() -> None:
    args = parse_args()
    threads = args.threads or -(-args.max_in_flight // args.workers)
    wall, stats = acquire(args, threads)
    ceiling = args.max_in_flight / args.latency_s / REQUESTS_PER_SAMPLE
    achieved = args.n / (stats["last_answer_s"] - stats["first_call_s"])
    result = {
        "samples": args.n,
        "workers": args.workers,
        "threads_per_worker": threads,
        "latency_s": args.latency_s,
        "max_in_flight": args.max_in_flight,
        "observed_max_in_flight": stats["max_in_flight"],
        "requests_per_sample": REQUESTS_PER_SAMPLE,
        "ceiling_samples_per_s": round(ceiling, 2),
        "achieved_samples_per_s": round(achieved, 2),
        "wall_s_with_startup": round(wall, 1),
        "fake_mean_answer_s": round(stats["mean_answer_s"], 4),
        "violations": len(stats["violations"]),
        "vs_quota_ceiling": round(achieved / ceiling, 3),
    }
    print(f"acquired {args.n} points at {achieved:.1f} samples/s; the quota allows {ceiling:.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
