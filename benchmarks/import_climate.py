"""Import speed on the seed's climate layout: ``soilnet import-soilnet`` against the seed's per-point lookups.

Writes ``--sites`` synthetic sites as the seed's 13 ``RaCA_<var>.csv`` files (``tests/seed_layout.py``: unordered
``YYYYMMDD`` columns, ``system:index``, ``SOCstock100`` with empty cells, duplicated IDs, -999, no coordinates),
then runs the documented command as a user does:

    soilnet import-soilnet --climate DIR --id-column rcasiteid --target-column SOCstock100 --out DIR

The baseline, measured in the same run on the same tables, is the seed's way of building a climate array: a
pandas ``.loc`` lookup per point and per variable (what the import did before it stacked the tables), timed on
``--baseline-sites`` points.

    .venv/bin/python benchmarks/import_climate.py [--sites 20000] [--baseline-sites 500]

The last line printed is one JSON object: ``samples_per_s`` (CSV parsing to manifest, shard writing included, with
the command's imports loaded), ``command_samples_per_s`` (the whole command in a fresh interpreter, whose start-up
loads torch through webdataset: about 3 s), ``baseline_samples_per_s``, and ``vs_per_point_lookup``, the ratio of
``samples_per_s`` to the baseline.
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
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import seed_layout  # noqa: E402


def per_point_lookups(folder: Path, n: int) -> float:
    """Samples/s of the seed's approach: ``table.loc[id, months]`` per point and variable."""
    from shards.import_soilnet import read_climate

    climate = read_climate(folder, "rcasiteid", {})
    ids = climate.ids[:n]
    months = list(climate.months)
    start = time.perf_counter()
    for pid in ids:
        np.stack([climate.tables[v].loc[pid, months].to_numpy(dtype=float) for v in climate.variables], axis=1)
    return len(ids) / (time.perf_counter() - start)


def import_in_process(climate: Path, out: Path) -> float:
    """Seconds of ``soilnet import-soilnet`` inside this process (its imports already loaded), CSVs to manifest."""
    from soilnet.cli import main as soilnet

    start = time.perf_counter()
    soilnet(seed_layout.raca_import_argv(climate, out))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=20000)
    p.add_argument("--baseline-sites", type=int, default=500)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="import_bench_"))
    try:
        seed_layout.write_raca(work / "climate", args.sites)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "soilnet.cli", *seed_layout.raca_import_argv(work / "climate", work / "cold")],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        command_s = time.perf_counter() - start
        seconds = import_in_process(work / "climate", work / "shards")
        samples = json.loads((work / "shards" / "manifest.json").read_text())["samples"]
        baseline = per_point_lookups(work / "climate", args.baseline_sites)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = args.sites / seconds
    print(
        json.dumps(
            {
                "sites": args.sites,
                "samples": samples,
                "seconds": round(seconds, 2),
                "samples_per_s": round(rate),
                "command_s": round(command_s, 2),
                "command_samples_per_s": round(args.sites / command_s),
                "baseline_samples_per_s": round(baseline, 1),
                "vs_per_point_lookup": round(rate / baseline, 1),
                "pandas": pd.__version__,
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
