"""``soilnet predict-map``: SOC over a regular grid, as a Cloud-Optimized GeoTIFF plus a PNG preview.

The grid lives on a Lambert azimuthal equal-area plane centred on the region (every cell covers the same area,
which SOC stock totals need), with square cells of ``--resolution`` metres; cells whose centre falls outside
the region are nodata. Work goes tile by tile (``--tile-size`` cells square): for each cell the data source
builds the same sample a shard holds (patch and climate at the cell centre, through the shards sources
interface and the packer's own sample builder, so the synthetic world, local rasters and Earth Engine share this
code path; this is the one place the library reaches into ``shards/``, lazily) and the fine-tuned model predicts
in batches. Each finished tile is written atomically to ``<out>.parts/``; a rerun (after a kill,
or after ``--max-tiles``) skips finished tiles. The COG is assembled only when every tile is done.

Bands: 1 prediction, 2 lower and 3 upper bound of the split-conformal interval saved with the model, in the
target's unit; nodata NaN.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.io import MemoryFile

from soilnet.evaluate.conformal import intervals

log = logging.getLogger("soilnet.maps")

# (lon (N,), lat (N,)) -> (image (N, C, H, W) | None, climate (N, T, F) | None, ok (N,) bool)
Acquire = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray | None, np.ndarray | None, np.ndarray]]
BANDS = ("prediction", "lower", "upper")


class MapError(ValueError):
    """A region, grid or resume state that cannot be mapped."""


@dataclass(frozen=True)
class Grid:
    """A north-up grid: ``width`` x ``height`` cells of ``resolution`` metres, top-left corner ``(x0, y0)``."""

    crs: str
    x0: float
    y0: float
    resolution: float
    width: int
    height: int
    tile_size: int

    @property
    def transform(self):
        return Affine(self.resolution, 0.0, self.x0, 0.0, -self.resolution, self.y0)

    def tiles(self) -> list[tuple[int, int]]:
        """``(row, col)`` of each tile, row-major."""
        return [
            (r, c)
            for r in range(math.ceil(self.height / self.tile_size))
            for c in range(math.ceil(self.width / self.tile_size))
        ]

    def tile_window(self, row: int, col: int) -> tuple[slice, slice]:
        t = self.tile_size
        return slice(row * t, min((row + 1) * t, self.height)), slice(col * t, min((col + 1) * t, self.width))


def read_region(path: str | Path):
    """The union of the (multi)polygons of a GeoJSON file, in lon/lat degrees (parsed as ``soilnet sample`` does)."""
    from shards.sample import load_polygons

    return shapely.union_all(load_polygons(path))


def plan_grid(region, resolution_m: float, tile_size: int = 256) -> tuple[Grid, object]:
    """The grid covering ``region`` (lon/lat) and the region projected onto the grid's plane."""
    if resolution_m <= 0:
        raise MapError(f"--resolution must be positive metres, got {resolution_m}")
    c = region.centroid
    crs = f"+proj=laea +lat_0={c.y:.6f} +lon_0={c.x:.6f} +datum=WGS84 +units=m +no_defs"
    fwd = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    projected = shapely.transform(shapely.segmentize(region, 0.05), fwd.transform, interleaved=False)
    minx, miny, maxx, maxy = projected.bounds
    x0 = math.floor(minx / resolution_m) * resolution_m
    y0 = math.ceil(maxy / resolution_m) * resolution_m
    width = max(1, math.ceil((maxx - x0) / resolution_m))
    height = max(1, math.ceil((y0 - miny) / resolution_m))
    return Grid(crs, x0, y0, float(resolution_m), width, height, tile_size), projected


def tile_cells(grid: Grid, projected, row: int, col: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inside-mask ``(h, w)`` bool and the lon/lat of the inside cells' centres, for one tile."""
    rs, cs = grid.tile_window(row, col)
    ys = grid.y0 - (np.arange(rs.start, rs.stop) + 0.5) * grid.resolution
    xs = grid.x0 + (np.arange(cs.start, cs.stop) + 0.5) * grid.resolution
    xx, yy = np.meshgrid(xs, ys)
    inside = shapely.contains_xy(projected, xx, yy)
    inv = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True)
    lon, lat = inv.transform(xx[inside], yy[inside])
    return inside, np.asarray(lon), np.asarray(lat)


def _atomic_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
    tmp.replace(path)


def predict_tiles(
    grid: Grid,
    projected,
    acquire: Acquire,
    predict: Callable[[np.ndarray | None, np.ndarray | None], np.ndarray],
    half_width: float,
    parts: Path,
    space: str = "original",
    batch_size: int = 256,
    max_tiles: int | None = None,
) -> dict:
    """Predict every unfinished tile into ``parts/`` (``r{row}_c{col}.npz``); return counts."""
    parts.mkdir(parents=True, exist_ok=True)
    done = skipped = new = failed = cells = 0
    for row, col in grid.tiles():
        path = parts / f"r{row:04d}_c{col:04d}.npz"
        if path.exists():
            skipped += 1
            continue
        if max_tiles is not None and new >= max_tiles:
            break
        inside, lon, lat = tile_cells(grid, projected, row, col)
        out = np.full((len(BANDS), *inside.shape), np.nan, dtype=np.float32)
        values = np.full(len(lon), np.nan)
        for start in range(0, len(lon), batch_size):
            sl = slice(start, start + batch_size)
            image, climate, ok = acquire(lon[sl], lat[sl])
            failed += int(np.sum(~ok))
            if ok.any():
                pred = predict(None if image is None else image[ok], None if climate is None else climate[ok])
                chunk = np.full(len(ok), np.nan)
                chunk[ok] = pred
                values[sl] = chunk
        lower, upper = intervals(values, half_width, space=space)
        out[0][inside] = values
        out[1][inside] = lower
        out[2][inside] = upper
        _atomic_npz(path, bands=out)
        new += 1
        cells += len(lon)
        done += 1
        log.info("tile (%d, %d): %d cells", row, col, len(lon))
    total = len(grid.tiles())
    finished = sum(1 for r, c in grid.tiles() if (parts / f"r{r:04d}_c{c:04d}.npz").exists())
    return {"tiles": total, "finished": finished, "new": new, "reused": skipped, "cells": cells, "failed": failed}


def assemble(grid: Grid, parts: Path) -> np.ndarray:
    """The full ``(3, height, width)`` float32 map from finished tiles."""
    full = np.full((len(BANDS), grid.height, grid.width), np.nan, dtype=np.float32)
    for row, col in grid.tiles():
        rs, cs = grid.tile_window(row, col)
        with np.load(parts / f"r{row:04d}_c{col:04d}.npz") as z:
            full[:, rs, cs] = z["bands"]
    return full


def write_cog(path: Path, bands: np.ndarray, grid: Grid, tags: dict, band_names: tuple[str, ...]) -> Path:
    """Write ``bands`` ``(B, H, W)`` float32 as a tiled, DEFLATE-compressed COG with overviews, atomically."""
    profile = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": bands.shape[0],
        "dtype": "float32",
        "crs": grid.crs,
        "transform": grid.transform,
        "nodata": float("nan"),
    }
    block = 256 if min(grid.width, grid.height) >= 512 else 16
    levels = max(1, int(math.log2(max(1, min(grid.width, grid.height) // block))))
    tmp = path.with_name(path.stem + ".tmp.tif")
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(bands)
            for i, name in enumerate(band_names, start=1):
                dst.set_band_description(i, name)
            dst.update_tags(**{k: str(v) for k, v in tags.items()})
        with mem.open() as src:
            rasterio.shutil.copy(
                src,
                tmp,
                driver="COG",
                BLOCKSIZE=block,
                OVERVIEW_COUNT=levels,
                COMPRESS="DEFLATE",
                PREDICTOR="YES",
                RESAMPLING="AVERAGE",
            )
    tmp.replace(path)
    return path


def write_preview(path: Path, bands: np.ndarray, unit: str, level: float | None) -> Path:
    """PNG with the prediction and the interval width."""
    from soilnet.evaluate.plots import _save, plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, data, title in (
        (axes[0], bands[0], f"prediction ({unit})"),
        (axes[1], bands[2] - bands[1], f"{int(round((level or 0) * 100))} % interval width ({unit})"),
    ):
        im = ax.imshow(data, cmap="viridis")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def _fingerprint(grid: Grid, model_file: Path) -> dict:
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    return {"grid": asdict(grid), "model_sha256": digest}


def predict_map(
    checkpoint: str | Path,
    region_path: str | Path,
    resolution_m: float,
    out: str | Path,
    acquire: Acquire | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    batch_size: int = 256,
    tile_size: int = 256,
    max_tiles: int | None = None,
) -> dict:
    """Map a fine-tuned model (a fine-tuning ``output_dir``) over a GeoJSON region; see the module docstring.

    ``acquire`` defaults to the data source the model's training shards were packed from (with ``overrides`` of
    that pack config). Returns a summary; ``complete`` is False when ``max_tiles`` stopped it early.
    """
    from soilnet.train.finetune import MODEL_FILE, load_model

    out = Path(out)
    model_file = Path(checkpoint) / MODEL_FILE if Path(checkpoint).is_dir() else Path(checkpoint)
    model = load_model(model_file)
    grid, projected = plan_grid(read_region(region_path), resolution_m, tile_size)
    if acquire is None:
        acquire = source_acquire(Path(checkpoint), model, list(overrides))
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(grid, model_file)
    fp_path = parts / "grid.json"
    if fp_path.exists():
        if json.loads(fp_path.read_text()) != json.loads(json.dumps(fp)):
            raise MapError(f"{parts} holds tiles of another grid or model; delete it or choose another --out")
    else:
        fp_path.write_text(json.dumps(fp, indent=2))
    q = float(model.conformal.get("half_width", math.nan))
    start = time.time()
    space = model.conformal.get("space", "original")
    summary = predict_tiles(grid, projected, acquire, model.predict, q, parts, space, batch_size, max_tiles)
    summary.update(
        out=str(out), seconds=round(time.time() - start, 1), complete=summary["finished"] == summary["tiles"]
    )
    if not summary["complete"]:
        return summary
    bands = assemble(grid, parts)
    level = model.conformal.get("level")
    unit = model.target.get("unit", "")
    pct = int(round((level or 0) * 100))
    tags = {
        "target": model.target.get("name"),
        "unit": unit,
        "interval_level": level,
        "half_width": q,
        "checkpoint": str(checkpoint),
        "region": str(region_path),
        "resolution_m": resolution_m,
    }
    write_cog(out, bands, grid, tags, (f"{model.target.get('name')} ({unit})", f"lower {pct} %", f"upper {pct} %"))
    summary["preview"] = str(write_preview(out.with_suffix(".png"), bands, unit, level))
    summary["cells_predicted"] = int(np.isfinite(bands[0]).sum())
    return summary


def source_acquire(checkpoint: Path, model, overrides: list[str]) -> Acquire:
    """Acquisition through the shards sources interface, configured like the model's training shards.

    The pack config comes from the manifest of the fine-tuning run's ``data.shards`` (``key=value`` overrides
    apply to it, e.g. ``source.kind=rasters``); each cell is built by the packer's own ``make_sample``, so a map
    cell holds exactly what a shard sample would. A point the source rejects becomes a nodata cell.
    """
    import yaml

    from shards.pack import make_sample, make_source
    from shards.sources.base import Rejected
    from soilnet.config.base import ConfigError, apply_override
    from soilnet.config.pack import PackConfig
    from soilnet.data.manifest import read_manifest

    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: --checkpoint must be a fine-tuning output_dir")
    shards = (yaml.safe_load(cfg_file.read_text()) or {}).get("data", {}).get("shards")
    manifest, _ = read_manifest(shards)
    tree = manifest.get("config")
    if not isinstance(tree, dict):
        raise MapError(f"the manifest of {shards} holds no pack config, so the data source is unknown")
    for ov in overrides:
        apply_override(tree, ov)
    try:
        pack_cfg = PackConfig.model_validate(tree)
    except ValueError as err:
        raise ConfigError(f"pack config of {shards} (with overrides {overrides}): {err}") from err
    source = make_source(pack_cfg, model.schema)
    on_nonfinite = getattr(pack_cfg.shard, "on_nonfinite", "mask")
    use_image, use_climate = "image" in model.modalities, "climate" in model.modalities

    def acquire(lon: np.ndarray, lat: np.ndarray):
        images, climates, ok = [], [], np.zeros(len(lon), dtype=bool)
        c, h, w = model.schema.image_shape
        for i, (x, y) in enumerate(zip(lon, lat, strict=True)):
            try:
                sample = make_sample(source, model.schema, f"cell{i}", float(x), float(y), on_nonfinite)
                ok[i] = True
                image, climate = sample["image.npy"], sample["climate.npy"]
            except Rejected:
                image = np.zeros((c, h, w), np.float16)
                climate = np.zeros(model.schema.climate_shape, np.float32)
            images.append(image)
            climates.append(climate)
        return (np.stack(images) if use_image else None, np.stack(climates) if use_climate else None, ok)

    return acquire


def run_cli(args) -> int:
    """``soilnet predict-map`` (arguments defined in :mod:`soilnet.cli`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = predict_map(
        args.checkpoint,
        args.region,
        args.resolution,
        args.out,
        overrides=list(args.overrides),
        batch_size=args.batch_size,
        tile_size=getattr(args, "tile_size", 256),
        max_tiles=getattr(args, "max_tiles", None),
    )
    if summary["complete"]:
        print(
            f"soilnet predict-map: wrote {summary['out']} and {summary['preview']} "
            f"({summary['new']} new tiles, {summary['reused']} reused, {summary['failed']} cells failed)"
        )
        return 0
    print(
        f"soilnet predict-map: stopped after {summary['new']} new tiles; {summary['finished']} of {summary['tiles']} "
        "done. Rerun the same command to finish."
    )
    return 3
