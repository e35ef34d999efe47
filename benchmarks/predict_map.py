"""``soilnet predict-map`` from local rasters: the tile path's cells/s against the per-point path's, and its peak
memory for a map 4 times larger, in one run on the same model and rasters.

Builds in a temporary folder (``--out`` keeps it):

- a tiny fine-tuned model: synthetic-world labelled shards (``--train`` samples; the schema below, 8 x 8 patches of
  30 m, 12 months), fine-tuned by ``soilnet finetune`` with the default tiny CNN + GRU for a few epochs;
- local rasters in LAEA Europe (EPSG:3035): a tiled GeoTIFF mosaic of the schema's channels at 30 m covering the
  larger map and a halo, and one monthly climate COG per variable (EPSG:4326); the model's pack config is pointed
  at them with ``source.kind=rasters`` (as a user maps from local rasters);
- two square regions of ``--cells`` and ``--large-cells`` cells at ``--resolution`` metres (default 30 m: a cell
  per pixel; the patches of neighbouring cells overlap, as in a 30 m map).

Then times, each the real job (:func:`soilnet.jobs.predict_map.predict_map`, CPU, ``--batch-size``):

- ``cells_per_s``: the tile path over the whole ``--cells`` map, assembly (VRT -> COG, preview) included, in a
  process of its own;
- ``vs_per_point``: the tile path's cells/s over the per-point path's (``--per-point``: every cell warped onto its
  UTM patch by the packer's sample builder), both on the same first ``--per-point-tiles`` tiles of
  ``--per-point-tile-size`` cells square of the ``--cells`` map (the per-point path is too slow for the whole map),
  alternated ``--repeats`` times, medians;
- ``peak_rss_ratio``: the peak RSS (``ru_maxrss`` of the child) of the tile path mapping ``--large-cells`` over that
  of ``--cells``, each in its own process;
- ``tile_read_cells_per_s``: the tile path's data side alone (window read, patches, climate; a model of zeros) over
  the ``--cells`` map, and ``reference_read_cells_per_s``: the same with the reference schema (14 channels, 64 x 64
  patches, 61 months x 14 variables) over ``--reference-cells`` cells at each ``--reference-resolutions``, from
  rasters of their own: what one CPU core feeds a device when the real model maps (docs/scaling.md).

Last stdout line: one JSON object. Targets (issue #17): ``vs_per_point`` >= 20, ``peak_rss_ratio`` <= 1.25.

    .venv/bin/python benchmarks/predict_map.py            # 1 M and 4 M cells: 4-7 minutes on 2 CPUs
    .venv/bin/python benchmarks/predict_map.py --cells 20000 --large-cells 80000 --train 60   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import shapely
import torch
from pyproj import Transformer
from rasterio.transform import from_origin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards.pack import pack  # noqa: E402
from shards.sources.rasters import from_config as rasters_source  # noqa: E402
from soilnet.cli import main as soilnet_main  # noqa: E402
from soilnet.config.pack import PackConfig, RastersConfig  # noqa: E402
from soilnet.evaluate.maps import TILE_GDAL_CACHE_MB, gdal_cache, plan_grid, tile_bands  # noqa: E402
from soilnet.evaluate.tiles import TileAcquire  # noqa: E402
from soilnet.jobs.predict_map import predict_map, source_tiles  # noqa: E402
from soilnet.regions import read_region  # noqa: E402
from soilnet.schema import SampleSchema, month_range  # noqa: E402
from soilnet.train.regressor import MODEL_FILE, load_model  # noqa: E402

CRS = "EPSG:3035"
CENTRE = (4_300_020.0, 2_700_000.0)  # LAEA Europe metres, inside the synthetic world's default bbox (~10 E, 47 N)
SCHEMA = {
    "channels": ["SR_B4", "SR_B5", "NDVI", "elevation"],
    "climate_variables": ["pr", "tmmn", "tmmx"],
    "first_month": "2014-01",
    "last_month": "2014-12",
    "patch_size": 8,
}
FINETUNE = [
    "train.epochs=3",
    "train.batch_size=32",
    "train.threads=1",
    "eval.split.folds=2",
    "eval.split.block_km=150",
    "eval.split.buffer_km=20",
    "eval.baseline.n_estimators=10",
    "eval.plots=false",
]


def schema() -> SampleSchema:
    s = SCHEMA
    months = month_range(str(s["first_month"]), str(s["last_month"]))
    return SampleSchema(tuple(s["channels"]), tuple(s["climate_variables"]), months, int(s["patch_size"]))


def build_model(d: Path, n_train: int) -> Path:
    """A fine-tuning output_dir on ``n_train`` synthetic-world samples (a labelled manifest with its pack config)."""
    cfg = PackConfig.model_validate(
        {
            "output_dir": str(d / "shards"),
            "schema": SCHEMA,
            "sampling": {"n": n_train, "seed": 0},
            "source": {"kind": "synthetic", "seed": 0},
            "shard": {"max_samples": 1000},
        }
    )
    pack(cfg)
    out = d / "model"
    (d / "finetune.yaml").write_text(json.dumps({"modalities": "both", "data": {"target": "soc"}}))
    argv = ["finetune", "--config", str(d / "finetune.yaml"), f"data.shards={d / 'shards'}", f"output_dir={out}"]
    if soilnet_main([*argv, *FINETUNE]) != 0:
        raise RuntimeError("soilnet finetune failed")
    return out


def square(cells: int, resolution: float) -> tuple[float, float, float, float]:
    """``(left, bottom, right, top)`` in EPSG:3035 of a square of ``cells`` cells centred on :data:`CENTRE`, its
    edges on the grid's cell edges."""
    side = math.ceil(math.sqrt(cells)) * resolution
    left = math.floor((CENTRE[0] - side / 2) / resolution) * resolution
    top = math.floor((CENTRE[1] + side / 2) / resolution) * resolution
    return left, top - side, left + side, top


def write_region(path: Path, bounds: tuple[float, float, float, float], resolution: float) -> Path:
    """A GeoJSON square in lon/lat whose projection onto EPSG:3035 is ``bounds`` shrunk by a quarter cell (so the
    grid holds exactly its cells)."""
    box = shapely.box(*bounds).buffer(-resolution / 4, join_style="mitre")
    inv = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    lonlat = shapely.transform(shapely.segmentize(box, resolution * 4), inv.transform, interleaved=False)
    path.write_text(json.dumps(shapely.geometry.mapping(lonlat)))
    return path


def write_rasters(d: Path, bounds: tuple[float, float, float, float], s: SampleSchema) -> dict:
    """The mosaic (the schema's channels, float32, 30 m, 256-pixel tiles, EPSG:3035) over ``bounds`` and a halo,
    and one climate COG per variable, in ``d``; returns their ``source.rasters`` config."""
    d.mkdir(parents=True, exist_ok=True)
    px, halo = s.pixel_size_m, s.patch_size * s.pixel_size_m + 300.0
    left, bottom, right, top = bounds[0] - halo, bounds[1] - halo, bounds[2] + halo, bounds[3] + halo
    width, height = round((right - left) / px), round((top - bottom) / px)
    rng = np.random.default_rng(0)
    profile = dict(driver="GTiff", width=width, height=height, count=s.n_channels, dtype="float32", crs=CRS)
    profile.update(transform=from_origin(left, top, px, px), nodata=-9999.0, tiled=True, blockxsize=256)
    profile.update(blockysize=256)
    mosaic = d / "mosaic.tif"
    with rasterio.open(mosaic, "w", **profile) as dst:
        for k, name in enumerate(s.channels):
            scale = 1000.0 if name == "elevation" else 1.0
            for r0 in range(0, height, 1024):
                h = min(1024, height - r0)
                band = (rng.random((h, width), dtype=np.float32) * 0.2 + 0.3) * scale
                dst.write(band, k + 1, window=((r0, r0 + h), (0, width)))
    inv = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    w, so, e, n = inv.transform_bounds(left, bottom, right, top)
    geo = from_origin(math.floor(w) - 1, math.ceil(n) + 1, 1 / 24, 1 / 24)  # TerraClimate's 1/24 degree
    cw, ch = int((math.ceil(e) - math.floor(w) + 2) * 24), int((math.ceil(n) - math.floor(so) + 2) * 24)
    climate = []
    for v in s.climate_variables:
        data = rng.integers(0, 300, (s.n_months, ch, cw)).astype(np.int16)
        cog = dict(driver="COG", width=cw, height=ch, count=s.n_months, dtype="int16", crs="EPSG:4326")
        with rasterio.open(d / f"{v}.tif", "w", transform=geo, nodata=-32768, **cog) as dst:
            dst.write(data)
        climate.append({"path": str(d / f"{v}.tif"), "variable": v, "first_month": s.months[0], "scale": 0.1})
    return {"images": [{"path": str(mosaic), "bands": list(s.channels)}], "climate": climate}


def rasters_overrides(rasters: dict) -> list[str]:
    """The pack-config overrides that make ``rasters`` (a ``source.rasters`` config) the model's data source."""
    return ["source.kind=rasters", f"source.rasters={json.dumps(rasters)}"]


def map_once(spec: dict) -> dict:
    """One ``predict_map`` run as ``spec`` says (a fresh ``out``); its summary and this process's peak RSS (MiB)."""
    torch.set_num_threads(spec["threads"])
    kw = {k: spec[k] for k in ("max_tiles", "tile_size", "per_point", "batch_size")}
    args = (spec["model"], spec["region"], spec["resolution"], spec["out"])
    summary = predict_map(*args, overrides=spec["overrides"], crs=CRS, **kw)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "cells": summary["cells"],
        "seconds": summary["seconds"],
        "cells_per_s": summary["cells"] / max(summary["seconds"], 1e-9),
        "complete": summary["complete"],
        "peak_rss_mib": rss,
    }


def map_in_child(spec: dict) -> dict:
    """:func:`map_once` in a process of its own (its ``ru_maxrss`` is that map's alone)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child map failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def zeros(image, climate) -> np.ndarray:
    """A stand-in model: 0 for every cell."""
    return np.zeros(len(image if image is not None else climate))


def data_side_rate(grid, projected, acquire: TileAcquire, batch_size: int) -> float:
    """Cells/s of every tile of ``grid`` through :func:`~soilnet.evaluate.maps.tile_bands` with :func:`zeros` as
    the model: the window read, the patches cut and stored as float16, the climate, the bands (no file written)."""
    start, cells = time.perf_counter(), 0
    with gdal_cache(TILE_GDAL_CACHE_MB):  # as the job's tiles read
        for row, col in grid.tiles():
            cells += tile_bands(grid, projected, row, col, acquire, zeros, 1.0, "original", batch_size)[1]["cells"]
    return cells / (time.perf_counter() - start)


def read_rate(model_dir: Path, region: Path, overrides: list[str], args) -> float:
    """Cells/s of the tile path's data side alone: every tile of ``region`` read, cut into patches and given its
    climate (:func:`~soilnet.evaluate.maps.tile_bands` with a model that returns zeros): what a CPU core feeds a
    device."""
    model = load_model(model_dir / MODEL_FILE, device="cpu")
    lonlat = read_region(region)
    grid, projected = plan_grid(lonlat, args.resolution, args.tile_size, CRS)
    acquire = source_tiles(model_dir, model, overrides, args.batch_size, False, lonlat)
    return data_side_rate(grid, projected, acquire, args.batch_size)


def reference_read_rate(d: Path, resolution: float, cells: int, args) -> float:
    """:func:`read_rate` with the reference schema (14 channels, 64 x 64 patches of 30 m, 61 months x 14 climate
    variables) at ``resolution`` over ``cells`` cells, from its own rasters in ``d``: what one CPU core feeds a device
    when the real model maps (no model needed: the data side only)."""
    s = SampleSchema()
    bounds = square(cells, resolution)
    source = rasters_source(s, RastersConfig.model_validate(write_rasters(d, bounds, s)))
    region = read_region(write_region(d / "region.geojson", bounds, resolution))
    grid, projected = plan_grid(region, resolution, 256, CRS)
    acquire = TileAcquire(source, s.patch_size, s.pixel_size_m, batch_size=args.batch_size)
    return data_side_rate(grid, projected, acquire, args.batch_size)


def reference_reads(d: Path, args) -> dict:
    """``reference_read_cells_per_s``: :func:`reference_read_rate` at each ``--reference-resolutions``."""
    if args.reference_cells <= 0:
        return {}
    rates = {
        f"{r:g}": round(reference_read_rate(d / f"{r:g}m", r, args.reference_cells, args), 1)
        for r in args.reference_resolutions
    }
    return {"reference_cells": args.reference_cells, "reference_read_cells_per_s": rates}


def spec_for(d: Path, name: str, region: Path, model: Path, overrides: list[str], args, **kw) -> dict:
    spec = {"model": str(model), "region": str(region), "resolution": args.resolution, "out": str(d / f"{name}.tif")}
    spec.update(overrides=overrides, max_tiles=None, tile_size=args.tile_size, per_point=False)
    spec.update(batch_size=args.batch_size, threads=args.threads, **kw)
    return spec


def compare_paths(d: Path, region: Path, model: Path, overrides: list[str], args) -> dict:
    """The tile path and the per-point path on the same first ``--per-point-tiles`` tiles of ``region``, alternated
    ``--repeats`` times (fresh outputs each time, in this process), medians: a shared machine's load drifts."""
    subset = dict(max_tiles=args.per_point_tiles, tile_size=args.per_point_tile_size)
    tile, point = [], []
    for k in range(args.repeats):
        for runs, per_point in ((tile, False), (point, True)):
            name = f"subset_{'point' if per_point else 'tile'}_{k}"
            runs.append(map_once(spec_for(d, name, region, model, overrides, args, per_point=per_point, **subset)))
    cells = {r["cells"] for r in tile + point}
    if len(cells) != 1:
        raise RuntimeError(f"the two paths mapped different numbers of cells: {sorted(cells)}")
    t, p = (float(np.median([r["cells_per_s"] for r in runs])) for runs in (tile, point))
    return {
        "per_point_subset_cells": cells.pop(),
        "repeats": args.repeats,
        "tile_subset_cells_per_s": round(t, 1),
        "per_point_cells_per_s": round(p, 1),
        "vs_per_point": round(t / p, 2),
    }


def run(d: Path, args) -> dict:
    """Build the model, rasters and regions in ``d``; time the maps (see the module docstring)."""
    s = schema()
    model = build_model(d, args.train)
    small, large = square(args.cells, args.resolution), square(args.large_cells, args.resolution)
    overrides = rasters_overrides(write_rasters(d, large, s))
    r_small = write_region(d / "small.geojson", small, args.resolution)
    r_large = write_region(d / "large.geojson", large, args.resolution)
    t_small = map_in_child(spec_for(d, "small", r_small, model, overrides, args))
    t_large = map_in_child(spec_for(d, "large", r_large, model, overrides, args))
    return {
        "cells": t_small["cells"],
        "large_cells": t_large["cells"],
        "resolution_m": args.resolution,
        "batch_size": args.batch_size,
        "cells_per_s": round(t_small["cells_per_s"], 1),
        "large_cells_per_s": round(t_large["cells_per_s"], 1),
        **compare_paths(d, r_small, model, overrides, args),
        "peak_rss_mib": round(t_small["peak_rss_mib"], 1),
        "large_peak_rss_mib": round(t_large["peak_rss_mib"], 1),
        "peak_rss_ratio": round(t_large["peak_rss_mib"] / t_small["peak_rss_mib"], 4),
        "tile_read_cells_per_s": round(read_rate(model, r_small, overrides, args), 1),
        "threads": args.threads,
        **reference_reads(d / "reference", args),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=1_000_000, help="cells of the map timed and of the RSS baseline")
    ap.add_argument("--large-cells", type=int, default=4_000_000, help="cells of the larger map (peak RSS)")
    ap.add_argument("--resolution", type=float, default=30.0, help="map cell size, metres")
    ap.add_argument("--tile-size", type=int, default=256, help="predict-map --tile-size of the timed maps")
    ap.add_argument("--batch-size", type=int, default=256, help="predict-map --batch-size")
    ap.add_argument("--per-point-tiles", type=int, default=1, help="tiles of the subset both paths map")
    ap.add_argument("--repeats", type=int, default=3, help="alternations of the two paths on the subset")
    ap.add_argument("--per-point-tile-size", type=int, default=64, help="their size in cells")
    ap.add_argument("--reference-cells", type=int, default=2500, help="cells of each reference-schema read (0: none)")
    ap.add_argument(
        "--reference-resolutions",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[1000.0, 100.0],
        help="map resolutions (m) of the reference-schema reads, comma-separated",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every map (the same for both paths)")
    ap.add_argument("--train", type=int, default=200, help="labelled samples the tiny model is fine-tuned on")
    ap.add_argument("--out", help="keep the model, rasters and maps here (default: a temporary folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one map, as JSON
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        print(json.dumps(map_once(json.loads(args.child))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.out) if args.out else Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        result = run(d, args)
        result["wall_s"] = round(time.perf_counter() - start, 1)
    print(
        f"tile path: {result['cells_per_s']:,.0f} cells/s over {result['cells']:,} cells; per-point: "
        f"{result['per_point_cells_per_s']:,.0f} cells/s on {result['per_point_subset_cells']:,} cells "
        f"(x{result['vs_per_point']}); peak RSS {result['peak_rss_mib']:.0f} -> {result['large_peak_rss_mib']:.0f} MiB"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
