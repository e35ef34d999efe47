"""SOC maps over a regular grid: the grid, its tiles, their assembly, the Cloud-Optimized GeoTIFF and a preview.

The grid is north-up in a projected CRS (``--crs``, any EPSG code; default EPSG:3035 inside Europe, else a named
Lambert azimuthal equal-area CRS centred on the region), with square cells of ``--resolution`` metres whose edges
fall on an alignment origin; cells whose centre falls outside the region are nodata. Work goes tile by tile
(``--tile-size`` cells square, :func:`tile_bands`): the tile path (:mod:`soilnet.evaluate.tiles`) cuts every
cell's patch from one windowed read, the per-point path calls an ``acquire`` function per batch of cells; a
``predict`` function maps the inputs to SOC in batches. Each finished tile is written atomically to
``<out>.parts/`` as a GeoTIFF (:func:`tile_writer`); :mod:`soilnet.jobs.map_tasks` runs the tiles (spread over
tasks; a rerun, after a kill or after ``--max-tiles``, skips finished tiles). The COG is assembled when every tile
is done, streamed from a VRT of the tiles through GDAL's COG driver (docs/maps.md).

Bands (:data:`BANDS`): 1 prediction, 2 lower and 3 upper bound of the split-conformal interval saved with the
model, in the target's unit; 4 the area of applicability (1 inside, 0 outside: an ``applicability`` function of
the same model inputs, :mod:`soilnet.evaluate.aoa`); nodata NaN.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from pyproj.crs import ProjectedCRS
from pyproj.crs.coordinate_operation import LambertAzimuthalEqualAreaConversion
from pyproj.exceptions import CRSError

from soilnet.atomic import atomic_path, write_text
from soilnet.evaluate.conformal import intervals
from soilnet.evaluate.plots import _save, plt
from soilnet.evaluate.tiles import Batch, TileAcquire

log = logging.getLogger("soilnet.maps")

# (lon (N,), lat (N,)) -> (image (N, C, H, W) | None, climate (N, T, F) | None, ok (N,) bool)
Acquire = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray | None, np.ndarray | None, np.ndarray]]
# (image (N, C, H, W) | None, climate (N, T, F) | None), the model's inputs -> 1 inside the area of applicability,
# 0 outside (N,)
Applicability = Callable[[np.ndarray | None, np.ndarray | None], np.ndarray]
# The COG's bands, in order; a new band appends its name here, its values in tile_bands and its description in
# write_map.
BANDS = ("prediction", "lower", "upper", "aoa")
AOA_DESCRIPTION = "aoa (1 inside, 0 outside)"
COG_BLOCK = 512
# GDAL's block cache (MiB) while assembling, and while computing tiles (a tile's window is read once; GDAL's
# default, 5 % of the node's memory, would keep every raster block a map reads, gigabytes on a GPU node; too small
# a cache decodes a row of blocks again for each band and strip): bounds the memory whatever the map's size
GDAL_CACHE_MB = 64
TILE_GDAL_CACHE_MB = 256


def gdal_cache(mib: int) -> rasterio.Env:
    """A rasterio environment with GDAL's block cache at ``mib`` MiB (rasterio takes GDAL_CACHEMAX in bytes: a
    bare 64 would be 64 bytes, no cache at all)."""
    return rasterio.Env(GDAL_CACHEMAX=mib * 2**20)


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


EUROPE = "EPSG:3035"


def default_crs(region) -> str:
    """EPSG:3035 (ETRS89 / LAEA Europe) for a region inside its area of use; else a Lambert azimuthal equal-area
    CRS centred on the region, named ``SoilNet LAEA <lat> <lon>`` in its WKT (GIS shows the name and the
    projection, not "unknown")."""
    west, south, east, north = region.bounds
    aw, as_, ae, an = -35.58, 24.6, 44.83, 84.73  # EPSG:3035's area of use
    if aw <= west and east <= ae and as_ <= south and north <= an:
        return EUROPE
    c = region.centroid
    conv = LambertAzimuthalEqualAreaConversion(
        latitude_natural_origin=round(c.y, 4), longitude_natural_origin=round(c.x, 4)
    )
    return ProjectedCRS(conv, name=f"SoilNet LAEA {c.y:.4f} {c.x:.4f}", geodetic_crs=CRS("EPSG:4326")).to_wkt()


def plan_grid(
    region,
    resolution_m: float,
    tile_size: int = 256,
    crs: str | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
) -> tuple[Grid, object]:
    """The grid covering ``region`` (lon/lat) and the region projected onto the grid's plane.

    ``crs``: any CRS pyproj knows (``EPSG:5070``), default :func:`default_crs`; cell edges fall on ``origin``
    plus whole multiples of ``resolution_m``, so maps of neighbouring regions line up."""
    if resolution_m <= 0:
        raise MapError(f"--resolution must be positive metres, got {resolution_m}")
    crs = crs or default_crs(region)
    try:
        if not CRS(crs).is_projected:
            raise MapError(f"--crs {crs} is not a projected CRS (the grid needs metres)")
    except CRSError as err:
        raise MapError(f"--crs {crs}: {err}") from None
    fwd = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    projected = shapely.transform(shapely.segmentize(region, 0.05), fwd.transform, interleaved=False)
    minx, miny, maxx, maxy = projected.bounds
    ox, oy = origin
    x0 = ox + math.floor((minx - ox) / resolution_m) * resolution_m
    y0 = oy + math.ceil((maxy - oy) / resolution_m) * resolution_m
    width = max(1, math.ceil((maxx - x0) / resolution_m))
    height = max(1, math.ceil((y0 - miny) / resolution_m))
    return Grid(crs, x0, y0, float(resolution_m), width, height, tile_size), projected


def tile_centres(grid: Grid, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates of one tile's cell centres: ``xs`` of its columns, ``ys`` of its rows."""
    rs, cs = grid.tile_window(row, col)
    ys = grid.y0 - (np.arange(rs.start, rs.stop) + 0.5) * grid.resolution
    xs = grid.x0 + (np.arange(cs.start, cs.stop) + 0.5) * grid.resolution
    return xs, ys


def tile_cells(grid: Grid, projected, row: int, col: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inside-mask ``(h, w)`` bool and the lon/lat of the inside cells' centres, for one tile."""
    xs, ys = tile_centres(grid, row, col)
    xx, yy = np.meshgrid(xs, ys)
    inside = shapely.contains_xy(projected, xx, yy)
    inv = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True)
    lon, lat = inv.transform(xx[inside], yy[inside])
    return inside, np.asarray(lon), np.asarray(lat)


def tile_path(parts: Path, row: int, col: int) -> Path:
    """The finished tile's GeoTIFF in ``parts/``."""
    return parts / f"r{row:04d}_c{col:04d}.tif"


def write_tile(parts: Path, grid: Grid, row: int, col: int, bands: np.ndarray) -> Path:
    """One tile's ``(B, h, w)`` float32 bands as a GeoTIFF on the grid, written atomically."""
    rs, cs = grid.tile_window(row, col)
    path = tile_path(parts, row, col)
    profile = {"driver": "GTiff", "width": cs.stop - cs.start, "height": rs.stop - rs.start, "count": len(bands)}
    profile.update(dtype="float32", crs=grid.crs, nodata=float("nan"), compress="DEFLATE")
    with (
        atomic_path(path) as tmp,
        rasterio.open(tmp, "w", transform=grid.transform @ Affine.translation(cs.start, rs.start), **profile) as dst,
    ):
        dst.write(bands.astype(np.float32))
    return path


def point_batches(acquire: Acquire, lon: np.ndarray, lat: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """The per-point path in batches: ``acquire`` builds each cell's inputs on its own."""
    for start in range(0, len(lon), batch_size):
        idx = np.arange(start, min(start + batch_size, len(lon)))
        image, climate, ok = acquire(lon[idx], lat[idx])
        yield idx, image, climate, ok


def tile_bands(
    grid: Grid,
    projected,
    row: int,
    col: int,
    acquire,
    predict,
    half_width: float,
    space: str,
    batch_size: int = 256,
    applicability: Applicability | None = None,
) -> tuple[np.ndarray, dict]:
    """One tile's ``(len(BANDS), h, w)`` bands and its counts (``cells``, ``failed``). ``acquire``: a
    :class:`~soilnet.evaluate.tiles.TileAcquire` (the tile path) or an :data:`Acquire` (the per-point path).
    ``applicability`` flags each batch of cells from the very inputs ``predict`` gets (band 4; NaN without it)."""
    inside, lon, lat = tile_cells(grid, projected, row, col)
    if isinstance(acquire, TileAcquire):
        xs, ys = tile_centres(grid, row, col)
        batches = acquire.batches(grid.crs, xs, ys, inside, lon, lat)
    else:
        batches = point_batches(acquire, lon, lat, batch_size)
    values, flags = np.full(len(lon), np.nan), np.full(len(lon), np.nan)
    failed = 0
    for idx, image, climate, ok in batches:
        failed += int(np.sum(~ok))
        if ok.any():
            img, clim = (None if image is None else image[ok]), (None if climate is None else climate[ok])
            values[idx[ok]] = predict(img, clim)
            if applicability is not None:
                flags[idx[ok]] = applicability(img, clim)
    lower, upper = intervals(values, half_width, space=space)
    out = np.full((len(BANDS), *inside.shape), np.nan, dtype=np.float32)
    for band, data in zip(out, (values, lower, upper, flags), strict=True):
        band[inside] = data
    return out, {"cells": len(lon), "failed": failed}


# (row, col) -> (cells inside the region, cells whose acquisition failed), the tile written to ``parts/``: the
# ``compute_tile`` of the one tile loop, :func:`soilnet.jobs.map_tasks.run_tiles`
ComputeTile = Callable[[int, int], tuple[int, int]]


def tile_writer(
    grid: Grid,
    projected,
    parts: Path,
    acquire,
    predict: Callable[[np.ndarray | None, np.ndarray | None], np.ndarray],
    half_width: float,
    space: str = "original",
    batch_size: int = 256,
    applicability: Applicability | None = None,
) -> ComputeTile:
    """What computes one tile: its bands (:func:`tile_bands`) written atomically to ``parts/`` (:func:`write_tile`),
    returning its cells and failed cells, under a GDAL block cache of :data:`TILE_GDAL_CACHE_MB`. The loop over
    tiles, their resumption and spreading over tasks is :func:`soilnet.jobs.map_tasks.run_tiles`'s."""

    def compute_tile(row: int, col: int) -> tuple[int, int]:
        args = (acquire, predict, half_width, space, batch_size, applicability)
        with gdal_cache(TILE_GDAL_CACHE_MB):
            bands, counts = tile_bands(grid, projected, row, col, *args)
            write_tile(parts, grid, row, col, bands)
        return counts["cells"], counts["failed"]

    return compute_tile


def tiles_vrt(path: Path, grid: Grid, parts: Path, names: tuple[str, ...], units: tuple[str, ...], tags: dict) -> Path:
    """A GDAL VRT mosaic of the finished tiles (relative paths) with band descriptions, units, NaN nodata and
    ``tags`` as dataset metadata; GDAL reads it window by window, so nothing holds the map."""
    t = grid.transform
    meta = "".join(f"<MDI key={quoteattr(str(k))}>{escape(str(v))}</MDI>" for k, v in tags.items())
    bands = []
    for b, (name, unit) in enumerate(zip(names, units, strict=True), start=1):
        sources = []
        for row, col in grid.tiles():
            rs, cs = grid.tile_window(row, col)
            w, h = cs.stop - cs.start, rs.stop - rs.start
            sources.append(
                f'<SimpleSource><SourceFilename relativeToVRT="1">{tile_path(parts, row, col).name}</SourceFilename>'
                f'<SourceBand>{b}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                f'<DstRect xOff="{cs.start}" yOff="{rs.start}" xSize="{w}" ySize="{h}"/></SimpleSource>'
            )
        bands.append(
            f'<VRTRasterBand dataType="Float32" band="{b}"><Description>{escape(name)}</Description>'
            f"<NoDataValue>nan</NoDataValue><UnitType>{escape(unit)}</UnitType>{''.join(sources)}</VRTRasterBand>"
        )
    write_text(
        path,
        f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">'
        f"<SRS>{escape(CRS(grid.crs).to_wkt())}</SRS><GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>"
        f"<Metadata>{meta}</Metadata>{''.join(bands)}</VRTDataset>",
    )
    return path


def write_cog(path: Path, source: Path, grid: Grid) -> Path:
    """``source`` (the tiles' VRT) through GDAL's COG driver: 512-pixel blocks, DEFLATE, overviews down to one
    block (at least one level), written atomically. GDAL streams it: memory does not grow with the map."""
    levels = max(1, math.ceil(math.log2(max(grid.width, grid.height, 1) / COG_BLOCK)))
    with atomic_path(path) as tmp, gdal_cache(GDAL_CACHE_MB):
        rasterio.shutil.copy(
            str(source),
            tmp,
            driver="COG",
            BLOCKSIZE=COG_BLOCK,
            OVERVIEW_COUNT=levels,
            COMPRESS="DEFLATE",
            PREDICTOR="YES",
            RESAMPLING="AVERAGE",
            NUM_THREADS="ALL_CPUS",
        )
    return path


def read_preview(path: Path, max_side: int = 1024) -> np.ndarray:
    """The COG's bands decimated to at most ``max_side`` pixels a side (GDAL reads its overviews)."""
    with rasterio.open(path) as src:
        f = max(1, math.ceil(max(src.width, src.height) / max_side))
        return src.read(out_shape=(src.count, max(1, src.height // f), max(1, src.width // f)), masked=True).filled(
            np.nan
        )


def _limits(data: np.ndarray) -> tuple[float | None, float | None, str]:
    """Colour limits: ``None`` (matplotlib's) unless the finite values are constant; then a band around them and
    a note (else the colour bar would show float noise)."""
    ok = data[np.isfinite(data)]
    if ok.size == 0:
        return None, None, " (no data)"
    lo, hi = float(ok.min()), float(ok.max())
    if hi - lo > 1e-6 * max(1.0, abs(hi)):
        return None, None, ""
    pad = max(abs(hi) * 0.05, 1e-3)
    return lo - pad, lo + pad, f" (constant {lo:.4g})"


def write_preview(path: Path, bands: np.ndarray, unit: str, level: float | None) -> Path:
    """PNG with the prediction, the interval width and the area of applicability (overviews average it: a
    zoomed-out pixel shows the fraction of its cells inside)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, data, title in (
        (axes[0], bands[0], f"prediction ({unit})"),
        (axes[1], bands[2] - bands[1], f"{int(round((level or 0) * 100))} % interval width ({unit})"),
    ):
        vmin, vmax, note = _limits(data)
        im = ax.imshow(data, cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title(title + note)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    im = axes[2].imshow(bands[3], cmap="RdYlGn", vmin=0, vmax=1)  # a fixed range: 0 outside .. 1 inside
    axes[2].set_title("area of applicability (1 inside, 0 outside)" + _limits(bands[3])[2])
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    fig.colorbar(im, ax=axes[2], shrink=0.8, ticks=[0, 1])
    return _save(fig, path)


def fingerprint(grid: Grid, model_file: Path) -> dict:
    """What a map's tiles depend on: the grid, the model file's SHA-256 and the band set (recorded in the parts
    folder's ``grid.json`` and the COG's tag; :mod:`soilnet.jobs.map_tasks` refuses tiles or a map of another)."""
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    return {"grid": asdict(grid), "model_sha256": digest, "bands": list(BANDS)}


def write_map(out: Path, grid: Grid, parts: Path, target: dict, conformal: dict, tags: dict) -> dict:
    """Assemble the finished tiles into the COG ``out`` (through a VRT, :func:`write_cog`) and its PNG preview
    (from the COG's overviews); ``tags`` are added to the COG's. ``target`` (``name``, ``unit``) and ``conformal``
    (``level``, ``half_width``) describe the model's prediction."""
    level = conformal.get("level")
    unit = target.get("unit", "")
    pct = int(round((level or 0) * 100))
    tags = {
        "target": target.get("name"),
        "unit": unit,
        "interval_level": level,
        "half_width": float(conformal.get("half_width", math.nan)),
        "crs": grid.crs if grid.crs.startswith("EPSG:") else CRS(grid.crs).name,
        **tags,
    }
    names = (f"{target.get('name')} ({unit})", f"lower {pct} %", f"upper {pct} %", AOA_DESCRIPTION)
    vrt = tiles_vrt(parts / "tiles.vrt", grid, parts, names, (unit, unit, unit, ""), tags)
    write_cog(out, vrt, grid)
    with gdal_cache(GDAL_CACHE_MB), rasterio.open(out) as src:
        cells = sum(int(np.isfinite(src.read(1, window=w)).sum()) for _, w in src.block_windows(1))
        preview = write_preview(out.with_suffix(".png"), read_preview(out), unit, level)
    return {"preview": str(preview), "cells_predicted": cells}
