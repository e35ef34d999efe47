"""Packing throughput from the local-raster source vs raw rasterio window reads of the same windows, same run.

Writes a tiled GeoTIFF mosaic (all schema channels, LAEA Europe, 30 m) and one climate COG per variable
(EPSG:4326) to a temporary folder, samples points inside the mosaic, then times, in one process:

- ``pack``: ``shards.pack.pack`` from the raster source (warp onto the UTM patch grid, climate pixel reads,
  float16 encoding, statistics, WebDataset ShardWriter with fsync + rename);
- ``raw``: plain ``rasterio`` windowed reads of the same footprints in the mosaic's own CRS (no warp) and the same
  climate pixels: the floor any raster packer pays.

Last stdout line: one JSON object; ``vs_raw_reads`` = pack samples/s / raw samples/s (per process).

    .venv/bin/python benchmarks/pack.py --n 400
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin
from rasterio.windows import from_bounds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.pack import pack  # noqa: E402
from shards.parallel import Workers  # noqa: E402
from soilnet.config.pack import PackConfig  # noqa: E402
from soilnet.schema import SampleSchema, month_range  # noqa: E402

X0, Y0, PX, SIZE = 4_300_000.0, 2_700_000.0, 30.0, 4096


def write_world(d: Path, schema: SampleSchema) -> tuple[Path, list[Path], str]:
    rng = np.random.default_rng(0)
    mosaic = d / "mosaic.tif"
    with rasterio.open(
        mosaic,
        "w",
        driver="GTiff",
        width=SIZE,
        height=SIZE,
        count=schema.n_channels,
        dtype="float32",
        crs="EPSG:3035",
        transform=from_origin(X0, Y0, PX, PX),
        nodata=-9999.0,
        tiled=True,
        blockxsize=256,
        blockysize=256,
    ) as dst:
        for k in range(schema.n_channels):
            dst.write(rng.random((SIZE, SIZE), dtype=np.float32), k + 1)
    first = schema.months[0]
    files = []
    for var in schema.climate_variables:
        path = d / f"{var}.tif"
        data = rng.integers(0, 1000, (schema.n_months, 80, 80)).astype(np.int16)
        geo = from_origin(8.0, 49.0, 0.05, 0.05)
        with rasterio.open(
            path,
            "w",
            driver="COG",
            width=80,
            height=80,
            count=schema.n_months,
            dtype="int16",
            crs="EPSG:4326",
            transform=geo,
            nodata=-32768,
        ) as dst:
            dst.write(data)
        files.append(path)
    return mosaic, files, first


def points(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    margin = 2000.0
    x = X0 + margin + rng.random(n) * (SIZE * PX - 2 * margin)
    y = Y0 - margin - rng.random(n) * (SIZE * PX - 2 * margin)
    lon, lat = Transformer.from_crs("EPSG:3035", "EPSG:4326", always_xy=True).transform(x, y)
    return pd.DataFrame({"id": [f"p{i:010d}" for i in range(n)], "lon": lon, "lat": lat})


def bench_raw(pts: pd.DataFrame, mosaic: Path, climate: list[Path], schema: SampleSchema) -> float:
    half = schema.patch_size * schema.pixel_size_m / 2.0
    to_laea = Transformer.from_crs("EPSG:4326", "EPSG:3035", always_xy=True)
    start = time.perf_counter()
    with rasterio.open(mosaic) as src:
        clim = [rasterio.open(p) for p in climate]
        for lon, lat in zip(pts.lon, pts.lat, strict=True):
            x, y = to_laea.transform(lon, lat)
            src.read(window=from_bounds(x - half, y - half, x + half, y + half, src.transform))
            for c in clim:
                row, col = c.index(lon, lat)
                c.read(window=((row, row + 1), (col, col + 1)))
        for c in clim:
            c.close()
    return len(pts) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="points")
    args = ap.parse_args()
    schema = SampleSchema(months=month_range("2010-01", "2010-12"))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        mosaic, climate, first = write_world(d, schema)
        pts = points(args.n)
        pts.to_csv(d / "points.csv", index=False)
        cfg = PackConfig.model_validate(
            {
                "output_dir": str(d / "out"),
                "schema": {"first_month": schema.months[0], "last_month": schema.months[-1]},
                "sampling": {"points": str(d / "points.csv")},
                "source": {
                    "kind": "rasters",
                    "rasters": {
                        "images": [{"path": str(mosaic), "bands": list(schema.channels)}],
                        "climate": [
                            {"path": str(p), "variable": v, "first_month": first}
                            for p, v in zip(climate, schema.climate_variables, strict=True)
                        ],
                    },
                },
                "shard": {"max_samples": 100},
            }
        )
        raw = bench_raw(pts, mosaic, climate, schema)
        start = time.perf_counter()
        manifest = pack(cfg, Workers(0, 1))
        packed = args.n / (time.perf_counter() - start)
        assert manifest is not None and manifest["samples"] == args.n, "every benchmark point must pack"
        print(f"{'pack':>10}: {packed:10.1f} samples/s\n{'raw reads':>10}: {raw:10.1f} samples/s")
        print(
            json.dumps(
                {
                    "samples": args.n,
                    "pack": round(packed, 2),
                    "raw_reads": round(raw, 2),
                    "vs_raw_reads": round(packed / raw, 4),
                }
            )
        )


if __name__ == "__main__":
    main()
