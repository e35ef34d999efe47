"""SOC maps over a regular grid: the grid, its tiles, their assembly, the Cloud-Optimized GeoTIFF and a preview.

The grid lives on a Lambert azimuthal equal-area plane centred on the region (every cell covers the same area,
which SOC stock totals need), with square cells of ``--resolution`` metres; cells whose centre falls outside
the region are nodata. Work goes tile by tile (``--tile-size`` cells square): for each cell an ``acquire``
function builds the inputs (``soilnet predict-map``, :mod:`soilnet.jobs.predict_map`, passes one that builds the
same sample a shard holds, through the shards sources) and a ``predict`` function maps them to SOC in batches.
Each finished tile is written atomically to ``<out>.parts/``; a rerun (after a kill, or after ``--max-tiles``)
skips finished tiles. The COG is assembled only when every tile is done.

Bands: 1 prediction, 2 lower and 3 upper bound of the split-conformal interval saved with the model, in the
target's unit; nodata NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.io import MemoryFile

from soilnet.atomic import atomic_file, atomic_path
from soilnet.evaluate.conformal import intervals
from soilnet.evaluate.plots import _save, plt
from soilnet.progress import Progress

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
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def predict_tile(
    grid: Grid,
    projected,
    row: int,
    col: int,
    acquire: Acquire,
    predict: Callable[[np.ndarray | None, np.ndarray | None], np.ndarray],
    half_width: float,
    space: str = "original",
    batch_size: int = 256,
) -> tuple[np.ndarray, int, int]:
    """One tile's bands ``(3, h, w)`` float32 (NaN outside the region and where acquisition failed), the number
    of cells inside the region and the number that failed."""
    failed = 0
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
    return out, len(lon), failed


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
    """Predict every unfinished tile into ``parts/`` (``r{row}_c{col}.npz``); return counts. Reports the tiles
    done of those to do (:mod:`soilnet.progress`)."""
    parts.mkdir(parents=True, exist_ok=True)
    done = skipped = new = failed = cells = 0
    todo = sum(1 for r, c in grid.tiles() if not (parts / f"r{r:04d}_c{c:04d}.npz").exists())
    progress = Progress("predict-map", todo if max_tiles is None else min(todo, max_tiles), "tile")
    for row, col in grid.tiles():
        path = parts / f"r{row:04d}_c{col:04d}.npz"
        if path.exists():
            skipped += 1
            continue
        if max_tiles is not None and new >= max_tiles:
            break
        args = (acquire, predict, half_width, space, batch_size)
        out, n_cells, n_failed = predict_tile(grid, projected, row, col, *args)
        failed += n_failed
        _atomic_npz(path, bands=out)
        new += 1
        cells += n_cells
        done += 1
        log.info("tile (%d, %d): %d cells", row, col, n_cells)
        progress.update(1)
    progress.close()
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
    with MemoryFile() as mem, atomic_path(path) as tmp:
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
    return path


def write_preview(path: Path, bands: np.ndarray, unit: str, level: float | None) -> Path:
    """PNG with the prediction and the interval width."""
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


def write_map(out: Path, grid: Grid, parts: Path, target: dict, conformal: dict, tags: dict) -> dict:
    """Assemble the finished tiles into the COG ``out`` and its PNG preview; ``tags`` are added to the COG's.

    ``target`` (``name``, ``unit``) and ``conformal`` (``level``, ``half_width``) describe the model's prediction.
    """
    bands = assemble(grid, parts)
    level = conformal.get("level")
    unit = target.get("unit", "")
    pct = int(round((level or 0) * 100))
    tags = {
        "target": target.get("name"),
        "unit": unit,
        "interval_level": level,
        "half_width": float(conformal.get("half_width", math.nan)),
        **tags,
    }
    write_cog(out, bands, grid, tags, (f"{target.get('name')} ({unit})", f"lower {pct} %", f"upper {pct} %"))
    preview = write_preview(out.with_suffix(".png"), bands, unit, level)
    return {"preview": str(preview), "cells_predicted": int(np.isfinite(bands[0]).sum())}
